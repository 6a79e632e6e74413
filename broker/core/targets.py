"""The targets catalog (``config/targets.toml``): what agents may get credentials for.

Each ``[[target]]`` table becomes one :class:`~broker.core.model.Target`::

    [[target]]
    name = "demo-db"                 # 1-128 of [A-Za-z0-9._:-]; what agents ask for
    kind = "database"                # vault-token | database | pki | ssh
    description = "..."              # optional
    mount = "database"               # Vault mount and role (every kind but vault-token)
    role = "demo-readonly"
    policies = ["target-demo-db"]    # Vault policies of the per-task token
    system = "demo-postgres"         # lowercase name of the system behind it
    environment = "dev"              # lowercase; policies match it (e.g. "production")
    sensitivity = "internal"         # public | internal | confidential | restricted
    max_ttl = "15m"                  # hours/minutes/seconds: "1h", "15m", "90s", "1h30m"
    revocable = true                 # optional, default true; ssh must say false
    legacy = false                   # optional: a standing static secret (short caps; its
                                     # policies may be no other target's)
    max_live_per_identity = 2        # optional: live credentials of it per agent (0: no cap)
    params = { domain = "..." }      # optional, kind-specific (see _PARAMS)

Errors name the entry and the key (``targets: target[2] ("demo-ssh").max_ttl: ...``) and stop
start-up (on a hot reload, the old catalog stays in force). Parsing is pure: the file is read
by ``broker.adapters.config_files.load_target_catalog``.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from datetime import timedelta
from types import MappingProxyType
from typing import Any, TypeVar

from broker.core.model import MAX_LIVE_LIMIT, Sensitivity, Target, TargetKind
from broker.errors import BadRequestError, ConfigurationError

_Choice = TypeVar("_Choice", TargetKind, Sensitivity)

_REQUIRED = ("name", "kind", "policies", "system", "environment", "sensitivity", "max_ttl")
_OPTIONAL = (
    "description",
    "mount",
    "role",
    "revocable",
    "legacy",
    "params",
    "max_live_per_identity",
)
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:-]{0,127}")
# Lowercase only: policies compare environments as strings, and "Production" must not slip
# past a rule about "production".
_LOWER_NAME = re.compile(r"[a-z0-9][a-z0-9._-]{0,63}")
_VAULT_PATH_SEGMENT = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,127}")
_DURATION = re.compile(r"(?:(\d{1,3})h)?(?:(\d{1,5})m)?(?:(\d{1,6})s)?")
# Vault caps the per-task token role at 24 h (config/dev/openbao/setup.toml), and a request
# is at most a day.
_MAX_TTL = timedelta(hours=24)
_DNS_LABEL = r"[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?"
_DNS_NAME = re.compile(rf"(?=.{{1,253}}$){_DNS_LABEL}(?:\.{_DNS_LABEL})+")
_PRINCIPALS = re.compile(r"[A-Za-z0-9._-]{1,64}(?:,[A-Za-z0-9._-]{1,64}){0,31}")
# Kind-specific parameters the minting adapters read (broker/adapters/kinds/), with the shape
# each must have. Anything else is a typo or a setting no adapter would honour.
_PARAMS: Mapping[TargetKind, Mapping[str, tuple[re.Pattern[str], str]]] = {
    TargetKind.VAULT_TOKEN: {},
    TargetKind.DATABASE: {},
    # Certificates are issued for <task>.<workflow>.<domain>.
    TargetKind.PKI: {"domain": (_DNS_NAME, "a lowercase DNS name such as agents.example.org")},
    # The SSH principals (user names) the certificate is valid for.
    TargetKind.SSH: {
        "valid_principals": (_PRINCIPALS, "comma-separated user names such as deploy,demo")
    },
}


def parse_target_catalog(data: Mapping[str, Any]) -> Mapping[str, Target]:
    """The catalog, by target name, from the parsed TOML document."""
    unknown = sorted(set(data) - {"target"})
    if unknown:
        raise ConfigurationError(
            f"targets: unknown top-level key(s) {unknown}; expected [[target]]"
        )
    entries = data.get("target", [])
    if not isinstance(entries, list) or not entries:
        raise ConfigurationError(
            "targets: no [[target]] tables: a broker with no targets can issue nothing"
        )
    catalog: dict[str, Target] = {}
    for index, entry in enumerate(entries):
        target = _parse_target(index, entry)
        if target.name in catalog:
            raise ConfigurationError(
                f"targets: target[{index}].name: {target.name!r} is defined twice"
            )
        catalog[target.name] = target
    _check_legacy_isolated(catalog)
    return MappingProxyType(catalog)


def _check_legacy_isolated(catalog: Mapping[str, Target]) -> None:
    """A legacy target is isolated: no other target's task token carries any of its Vault
    policies. Otherwise its standing secret could be had through the other target, outside
    the legacy caps and unseen by the burn-down report (``GET /v1/reports/legacy``)."""
    for target in catalog.values():
        if not target.legacy:
            continue
        for other in catalog.values():
            shared = sorted(set(target.policies) & set(other.policies))
            if other is not target and shared:
                raise ConfigurationError(
                    f"targets: legacy target {target.name!r} shares Vault policies {shared} "
                    f"with target {other.name!r}; a legacy target's policies must be its own, "
                    "so its standing secret is reached through it alone"
                )


def _parse_target(index: int, entry: Any) -> Target:
    where = f"targets: target[{index}]"
    if not isinstance(entry, Mapping):
        raise ConfigurationError(f"{where} must be a table")
    if isinstance(entry.get("name"), str):
        where = f"{where} ({entry['name']!r})"
    missing = [key for key in _REQUIRED if key not in entry]
    if missing:
        raise ConfigurationError(f"{where}: missing key(s) {missing}")
    extra = sorted(set(entry) - set(_REQUIRED) - set(_OPTIONAL))
    if extra:
        raise ConfigurationError(
            f"{where}: unknown key(s) {extra}; allowed {sorted((*_REQUIRED, *_OPTIONAL))}"
        )

    name = _string(entry, "name", where, _NAME, "1-128 characters of [A-Za-z0-9._:-]")
    kind = _choice(entry, "kind", where, TargetKind)
    sensitivity = _choice(entry, "sensitivity", where, Sensitivity)
    system = _string(entry, "system", where, _LOWER_NAME, "a lowercase name of [a-z0-9._-]")
    environment = _string(
        entry, "environment", where, _LOWER_NAME, "a lowercase name of [a-z0-9._-]"
    )
    policies = _policies(entry, where)
    max_ttl = _duration(entry, where)
    description = entry.get("description", "")
    if not isinstance(description, str) or not description.isprintable():
        raise ConfigurationError(f"{where}.description must be printable text")
    revocable = _flag(entry, "revocable", where, default=True)
    legacy = _flag(entry, "legacy", where, default=False)
    if kind is TargetKind.SSH and revocable:
        raise ConfigurationError(
            f"{where}.revocable: an ssh certificate cannot be revoked before it expires; set "
            "revocable = false so its TTL is clamped hard"
        )

    if kind is TargetKind.VAULT_TOKEN:
        for key in ("mount", "role"):
            if key in entry:
                raise ConfigurationError(
                    f"{where}.{key}: a vault-token target has no {key}; its token carries the "
                    "target's policies"
                )
        mount = role = ""
    else:
        mount = _string(entry, "mount", where, _VAULT_PATH_SEGMENT, "a Vault mount name")
        role = _string(entry, "role", where, _VAULT_PATH_SEGMENT, "a Vault role name")
    params = _params(entry, kind, where)
    live_cap = entry.get("max_live_per_identity", 0)
    if (
        not isinstance(live_cap, int)
        or isinstance(live_cap, bool)
        or not 0 <= live_cap <= MAX_LIVE_LIMIT
    ):
        raise ConfigurationError(
            f"{where}.max_live_per_identity must be an integer 0..{MAX_LIVE_LIMIT} (0: no "
            f"per-target cap), got {live_cap!r}"
        )

    try:
        return Target(
            name=name,
            kind=kind,
            policies=policies,
            system=system,
            environment=environment,
            sensitivity=sensitivity,
            max_ttl=max_ttl,
            mount=mount,
            role=role,
            revocable=revocable,
            legacy=legacy,
            description=description,
            params=MappingProxyType(params),
            max_live_per_identity=live_cap,
        )
    except (ValueError, BadRequestError) as exc:  # pragma: no cover - mirrored above
        # The checks above mirror Target's own; this keeps a future rule from escaping as a
        # bare ValueError without the entry's name.
        raise ConfigurationError(f"{where}: {exc}") from None


def _string(
    entry: Mapping[str, Any], key: str, where: str, shape: re.Pattern[str], expected: str
) -> str:
    if key not in entry:
        raise ConfigurationError(f"{where}: missing key {key!r}")
    value = entry[key]
    if not isinstance(value, str) or shape.fullmatch(value) is None:
        raise ConfigurationError(f"{where}.{key} must be {expected}, got {value!r}")
    return value


def _choice(entry: Mapping[str, Any], key: str, where: str, enum: type[_Choice]) -> _Choice:
    value = entry[key]
    try:
        return enum(value)
    except ValueError:
        raise ConfigurationError(
            f"{where}.{key} must be one of {[member.value for member in enum]}, got {value!r}"
        ) from None


def _policies(entry: Mapping[str, Any], where: str) -> tuple[str, ...]:
    value = entry["policies"]
    if (
        not isinstance(value, list)
        or not value
        or not all(isinstance(item, str) and _VAULT_PATH_SEGMENT.fullmatch(item) for item in value)
    ):
        raise ConfigurationError(
            f"{where}.policies must be a non-empty list of Vault policy names, got {value!r}"
        )
    if "root" in value:
        raise ConfigurationError(f"{where}.policies: a task token never carries the root policy")
    if len(set(value)) != len(value):
        raise ConfigurationError(f"{where}.policies lists a policy twice: {value!r}")
    return tuple(value)


def _duration(entry: Mapping[str, Any], where: str) -> timedelta:
    value = entry["max_ttl"]
    match = _DURATION.fullmatch(value) if isinstance(value, str) and value else None
    if match is None:
        raise ConfigurationError(
            f'{where}.max_ttl must be a duration such as "15m", "90s" or "1h30m", got {value!r}'
        )
    hours, minutes, seconds = (int(part) if part else 0 for part in match.groups())
    duration = timedelta(hours=hours, minutes=minutes, seconds=seconds)
    if not timedelta(0) < duration <= _MAX_TTL:
        raise ConfigurationError(
            f"{where}.max_ttl must be more than 0 and at most 24h, got {value!r}"
        )
    return duration


def _flag(entry: Mapping[str, Any], key: str, where: str, *, default: bool) -> bool:
    value = entry.get(key, default)
    if not isinstance(value, bool):
        raise ConfigurationError(f"{where}.{key} must be true or false, got {value!r}")
    return value


def _params(entry: Mapping[str, Any], kind: TargetKind, where: str) -> dict[str, str]:
    value = entry.get("params", {})
    if not isinstance(value, Mapping):
        raise ConfigurationError(f"{where}.params must be a table")
    allowed = _PARAMS[kind]
    params: dict[str, str] = {}
    for key, item in value.items():
        if key not in allowed:
            raise ConfigurationError(
                f"{where}.params.{key}: not a parameter of kind {kind.value}; "
                f"allowed {sorted(allowed) or 'none'}"
            )
        shape, expected = allowed[key]
        if not isinstance(item, str) or shape.fullmatch(item) is None:
            raise ConfigurationError(f"{where}.params.{key} must be {expected}, got {item!r}")
        params[key] = item
    return params
