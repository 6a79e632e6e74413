"""The policy directory and the targets catalog on disk: the one place that reads them.

Core parses and validates texts (:class:`broker.core.policy.CedarPolicyEngine`,
:func:`broker.core.targets.parse_target_catalog`); this adapter reads the files, and gives
each set a digest and a cheap signature so ``broker.policy_reload`` can watch them without a
file-watching dependency:

* :func:`policy_dir_signature` / :func:`file_signature`: names, sizes and modification times
  (``stat`` only). A poll compares signatures and reads nothing while they are unchanged.
* ``digest``: SHA-256 over the names and contents. A changed signature with an unchanged
  digest (a ``touch``, an editor rewriting the same bytes) is no change.

Error messages are those start-up has always shown (``policy directory '...' cannot be read:
...``, ``targets file '...' cannot be read: ...``).
"""

from __future__ import annotations

import hashlib
import tomllib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

from broker.core.model import Target
from broker.core.policy import SCHEMA_FILE, CedarPolicyEngine, WorkingHours
from broker.core.targets import parse_target_catalog
from broker.errors import ConfigurationError

POLICY_GLOB = "*.cedar"

# (name, size, mtime in ns) per file; a missing file is (name, -1, -1).
Signature = tuple[tuple[str, int, int], ...]


@dataclass(frozen=True, slots=True)
class PolicyFiles:
    """The texts of a policy directory: ``*.cedar`` by path (sorted) and the schema."""

    policies: Mapping[str, str]
    schema: str
    schema_source: str
    digest: str

    def engine(self, hours: WorkingHours | None = None) -> CedarPolicyEngine:
        """Parse and validate these texts (raises :class:`ConfigurationError`)."""
        return CedarPolicyEngine(
            policies=self.policies,
            schema=self.schema,
            schema_source=self.schema_source,
            hours=hours,
        )


@dataclass(frozen=True, slots=True)
class TargetsFile:
    """The parsed targets catalog and the digest of the file it came from."""

    catalog: Mapping[str, Target]
    digest: str


def read_policy_dir(policy_dir: Path) -> PolicyFiles:
    """Read ``<dir>/*.cedar`` and ``<dir>/schema.cedarschema`` (not parsed yet)."""
    schema_path = policy_dir / SCHEMA_FILE
    try:
        schema = schema_path.read_text(encoding="utf-8")
        policies = {
            str(path): path.read_text(encoding="utf-8")
            for path in sorted(policy_dir.glob(POLICY_GLOB))
        }
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigurationError(
            f"policy directory {str(policy_dir)!r} cannot be read: {type(exc).__name__}: {exc}"
        ) from None
    digest = _digest([(str(schema_path), schema), *policies.items()])
    return PolicyFiles(
        policies=policies, schema=schema, schema_source=str(schema_path), digest=digest
    )


def load_policy_engine(policy_dir: Path, *, hours: WorkingHours | None = None) -> CedarPolicyEngine:
    """Build the engine from ``<dir>/*.cedar`` and ``<dir>/schema.cedarschema``."""
    return read_policy_dir(policy_dir).engine(hours)


def read_targets_file(path: Path) -> TargetsFile:
    """Read and parse ``targets.toml``; a missing or unreadable file is a ConfigurationError."""
    try:
        text = path.read_text(encoding="utf-8")
        data = tomllib.loads(text)
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
        raise ConfigurationError(
            f"targets file {str(path)!r} cannot be read: {type(exc).__name__}: {exc}"
        ) from None
    return TargetsFile(catalog=parse_target_catalog(data), digest=_digest([(str(path), text)]))


def load_target_catalog(path: Path) -> Mapping[str, Target]:
    """Read and parse ``targets.toml``; a missing or unreadable file stops start-up."""
    return read_targets_file(path).catalog


def policy_dir_signature(policy_dir: Path) -> Signature:
    """What ``stat`` says about the schema and every ``*.cedar`` of ``policy_dir``."""
    try:
        paths = sorted(policy_dir.glob(POLICY_GLOB))
    except OSError:
        paths = []
    return file_signature([policy_dir / SCHEMA_FILE, *paths])


def file_signature(paths: Iterable[Path]) -> Signature:
    """Name, size and modification time of each path; a path that cannot be read counts as
    missing (a change like any other: the read that follows reports why)."""
    signature: list[tuple[str, int, int]] = []
    for path in paths:
        try:
            stat = path.stat()
        except OSError:
            signature.append((str(path), -1, -1))
        else:
            signature.append((str(path), stat.st_size, stat.st_mtime_ns))
    return tuple(signature)


def _digest(items: Iterable[tuple[str, str]]) -> str:
    digest = hashlib.sha256()
    for name, text in items:
        for part in (name, text):
            data = part.encode("utf-8")
            # Length-prefixed, so moving bytes from one file into the next changes the digest.
            digest.update(len(data).to_bytes(8, "big"))
            digest.update(data)
    return digest.hexdigest()
