"""Typed settings: ``config/broker.toml``, overridable by ``TASKLEASE_*`` environment variables.

The file is named by ``TASKLEASE_CONFIG`` (default ``config/broker.toml``). Nested keys map to
environment variables with ``__``: ``[vault] addr`` is ``TASKLEASE_VAULT__ADDR``. Environment
wins over the file. A bad setting stops start-up with a :class:`ConfigurationError` that names
the key and the variable that sets it; secrets are :class:`pydantic.SecretStr` and never shown.
"""

from __future__ import annotations

import ipaddress
import os
from pathlib import Path
from typing import Literal
from urllib.parse import parse_qsl, urlsplit

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SecretStr,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic_settings import (
    BaseSettings,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    TomlConfigSettingsSource,
)

from broker.core.model import MAX_LIVE_LIMIT
from broker.errors import ConfigurationError

DEFAULT_CONFIG_PATH = Path("config/broker.toml")
ENV_PREFIX = "TASKLEASE_"


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ServerSettings(_Section):
    """Where the broker listens. TLS with its own X.509-SVID is always on."""

    host: str = "127.0.0.1"
    port: int = Field(default=8443, ge=0, le=65535)
    # How long /readyz waits on each dependency before calling it down.
    readiness_timeout_seconds: float = Field(default=2.0, gt=0, le=30)
    # The event loop of `serve` and `dev`: uvloop (libuv; measured about 14 % less broker CPU
    # per issuance under load) or the standard library's asyncio loop.
    event_loop: Literal["uvloop", "asyncio"] = "uvloop"


class FederationSettings(_Section):
    """Another trust domain whose SVIDs the broker accepts, and where its bundle comes from.

    Exactly one source: a SPIFFE bundle file (re-read every minute) or a bundle endpoint with
    the https_web profile (refreshed on the bundle's refresh hint). Trust domains that the
    local SPIRE agent federates with arrive through the Workload API and need no entry here.
    """

    trust_domain: str
    bundle_file: str = ""
    endpoint_url: str = ""
    # PEM file of the CA that signs the endpoint's server certificate; empty: system roots.
    endpoint_ca_file: str = ""
    max_age_seconds: int | None = Field(default=None, gt=0)

    @model_validator(mode="after")
    def _exactly_one_source(self) -> FederationSettings:
        if bool(self.bundle_file) == bool(self.endpoint_url):
            raise ValueError("set exactly one of bundle_file and endpoint_url")
        if self.endpoint_url and not self.endpoint_url.startswith("https://"):
            raise ValueError("endpoint_url must be https:// (the https_web profile)")
        return self


class SpiffeSettings(_Section):
    """The broker's own workload identity and what it accepts from callers."""

    trust_domain: str = "tasklease.test"
    # Workload API socket, e.g. unix:///run/spire/agent.sock; empty = SPIFFE_ENDPOINT_SOCKET.
    workload_api_socket: str = ""
    # The audience callers' JWT-SVIDs must carry. Never empty (SECURITY.md 15).
    jwt_audience: str = "tasklease"
    # A trust bundle older than this is stale: its SVIDs are rejected (fail closed).
    bundle_max_age_seconds: int = Field(default=3600, gt=0)
    x509_clock_skew_seconds: int = Field(default=30, ge=0, le=300)
    jwt_leeway_seconds: int = Field(default=30, ge=0, le=300)
    jwt_max_lifetime_seconds: int = Field(default=3600, gt=0)
    max_chain_depth: int = Field(default=4, ge=1, le=8)
    federation: tuple[FederationSettings, ...] = ()

    @field_validator("jwt_audience")
    @classmethod
    def _audience_not_empty(cls, value: str) -> str:
        if not value.strip():
            raise ValueError("must not be empty: an empty audience would accept any JWT-SVID")
        return value


class VaultSettings(_Section):
    """OpenBao/Vault: where it is, how the broker logs in, how task tokens are minted."""

    addr: str = "http://127.0.0.1:8200"
    # jwt-svid: log in with the broker's own JWT-SVID (no long-lived secret on the broker).
    # token: a token of the broker's policy from `token` / TASKLEASE_VAULT__TOKEN (dev only).
    auth_method: Literal["jwt-svid", "token"] = "jwt-svid"
    jwt_mount: str = "spiffe-jwt"
    jwt_role: str = "tasklease-broker"
    jwt_audience: str = "openbao"
    token: SecretStr | None = None
    task_token_role: str = "tasklease-task"  # noqa: S105 - a role name, not a secret
    request_timeout_seconds: float = Field(default=5.0, gt=0, le=120)
    # Renew (re-login) when less than this fraction of the broker's token TTL is left.
    renew_at_fraction: float = Field(default=0.5, gt=0, lt=1)
    # The reconciler (one replica at a time) revokes task tokens the ledger does not know.
    reconcile_interval_seconds: int = Field(default=300, ge=10)
    # ... once they are older than this (a mint in flight is never cut short).
    reconcile_grace_seconds: int = Field(default=120, ge=30)
    # The reconciler's lock lease, renewed every third of it while a pass runs: a replica
    # killed mid-pass holds up the others for at most this long.
    reconcile_lock_ttl_seconds: int = Field(default=30, ge=3, le=600)
    # PEM CA that signs OpenBao's server certificate, trusted alone (by the broker's session
    # and by minting); empty: the system roots, for both.
    ca_file: str = ""
    # Task tokens and dynamic secrets travel on this connection: plain http is accepted only
    # to a loopback address (the dev stack), unless this is set (logged at every start).
    insecure_allow_plain_http: bool = False

    @model_validator(mode="after")
    def _token_when_token_auth(self) -> VaultSettings:
        if self.auth_method == "token" and self.token is None:
            raise ValueError("auth_method 'token' needs vault.token (TASKLEASE_VAULT__TOKEN)")
        return self

    @model_validator(mode="after")
    def _tls_unless_loopback(self) -> VaultSettings:
        parts = urlsplit(self.addr)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(
                f"vault.addr must be https://host[:port] (got scheme {parts.scheme!r})"
            )
        if parts.scheme == "http":
            if self.ca_file:
                raise ValueError("vault.ca_file is set, but vault.addr is http://: use https://")
            if not _is_loopback(parts.hostname) and not self.insecure_allow_plain_http:
                raise ValueError(
                    f"vault.addr is http:// to {parts.hostname!r}, which is not a loopback "
                    "address: task tokens and secrets would cross the network in plain text; "
                    "use https:// (or vault.insecure_allow_plain_http = true)"
                )
        return self

    @property
    def plain_http_off_loopback(self) -> bool:
        """True when the broker talks plain http to OpenBao beyond loopback (the insecure
        setting is in use and start-up logs it)."""
        parts = urlsplit(self.addr)
        return parts.scheme == "http" and not _is_loopback(parts.hostname or "")


class RedisSettings(_Section):
    """The shared ledger."""

    url: SecretStr = SecretStr("redis://127.0.0.1:6379/0")
    # Refuse to start on a Redis that evicts keys or does not persist, unless explicitly
    # configured to run degraded (with an alarm on /readyz and in the logs).
    insecure_allow_degraded_durability: bool = False
    socket_timeout_seconds: float = Field(default=2.0, gt=0, le=60)
    # What "durably acknowledged" means for the write a secret is returned on (SECURITY.md 32):
    # fsync: the AOF is fsynced (appendfsync always, or WAITAOF on Redis >= 7.2);
    # replicas: `WAIT durability_replicas` replicas hold the write;
    # none: no acknowledgement at all (only with insecure_allow_degraded_durability).
    durability: Literal["fsync", "replicas", "none"] = "fsync"
    durability_replicas: int = Field(default=1, ge=1, le=16)
    # How long WAIT / WAITAOF may block an issuance before it counts as not acknowledged.
    durability_timeout_ms: int = Field(default=1000, ge=1, le=30_000)
    # Shards of the due index. Every replica must use the same number: the ledger records it
    # in Redis and refuses a different one (items in other shards would never be swept).
    due_buckets: int = Field(default=16, ge=1, le=1024)
    # Redis Sentinel: "host:port" of each Sentinel and the name of the master they monitor.
    # With sentinels set, every client connects to the current master (and follows a
    # failover); `url` then only gives the master's password, username and database (its host
    # and port are not used). Empty: `url` is the one Redis.
    sentinels: tuple[str, ...] = ()
    sentinel_service: str = ""
    # The environment variable holding the Sentinels' own password (their `requirepass`);
    # empty: the Sentinels ask for none. Never the password itself.
    sentinel_password_env: str = ""
    # TLS, for a redis.url of rediss:// (then every connection is TLS: to Redis, and through
    # Sentinel to the master and to each Sentinel). PEM files, read again when they change:
    # the next connection uses the new ones. The server's certificate must name the host
    # connected to (through Sentinel: the address the Sentinels give, e.g. an IP SAN).
    # tls_ca_file: the CA that signs the servers' certificates (only it); empty: system roots.
    tls_ca_file: str = ""
    # The broker's client certificate and its key, for a Redis with `tls-auth-clients yes`:
    # both or neither (the key file is never read into a log or an error).
    tls_cert_file: str = ""
    tls_key_file: str = ""

    @model_validator(mode="after")
    def _no_acknowledgement_only_when_degraded(self) -> RedisSettings:
        if self.durability == "none" and not self.insecure_allow_degraded_durability:
            raise ValueError(
                "durability = 'none' returns secrets on writes Redis may lose; it needs "
                "insecure_allow_degraded_durability = true"
            )
        return self

    @field_validator("sentinels")
    @classmethod
    def _sentinel_addresses(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        for address in value:
            _host_and_port(address)
        return value

    @model_validator(mode="after")
    def _sentinels_with_their_service(self) -> RedisSettings:
        if self.sentinels and not self.sentinel_service.strip():
            raise ValueError(
                "redis.sentinels is set but redis.sentinel_service is empty: name the master "
                "the Sentinels monitor"
            )
        if self.sentinel_service and not self.sentinels:
            raise ValueError(
                "redis.sentinel_service is set but redis.sentinels is empty: list the "
                "Sentinels as host:port"
            )
        if self.sentinel_password_env and not self.sentinels:
            raise ValueError("redis.sentinel_password_env is set but redis.sentinels is empty")
        if self.sentinels:
            scheme = urlsplit(self.url.get_secret_value()).scheme
            if scheme not in ("redis", "rediss"):
                raise ValueError(
                    f"redis.url has scheme {scheme!r}; with redis.sentinels it is redis:// or "
                    "rediss:// (unix sockets through Sentinel are not supported)"
                )
        return self

    @model_validator(mode="after")
    def _tls_settings_fit_the_url(self) -> RedisSettings:
        parts = urlsplit(self.url.get_secret_value())
        # TLS is set here, with one rule for every connection: a URL query that weakens it
        # (ssl_cert_reqs=none …) would otherwise be ignored or, worse, obeyed.
        ssl_options = sorted({name for name, _ in parse_qsl(parts.query) if name.startswith("ssl")})
        if ssl_options:
            raise ValueError(
                f"redis.url sets {', '.join(ssl_options)}: TLS is configured with "
                "redis.tls_ca_file, redis.tls_cert_file and redis.tls_key_file, not in the URL"
            )
        files = {
            name: value
            for name, value in (
                ("tls_ca_file", self.tls_ca_file),
                ("tls_cert_file", self.tls_cert_file),
                ("tls_key_file", self.tls_key_file),
            )
            if value
        }
        if files and parts.scheme != "rediss":
            raise ValueError(
                f"redis.{', redis.'.join(files)} set, but redis.url is {parts.scheme}://, "
                "which is not TLS: use rediss://"
            )
        if bool(self.tls_cert_file) != bool(self.tls_key_file):
            raise ValueError(
                "set both redis.tls_cert_file and redis.tls_key_file (the client certificate "
                "and its key), or neither"
            )
        return self

    @property
    def tls(self) -> bool:
        """Whether every connection to Redis (and to its Sentinels) is TLS: rediss://."""
        return urlsplit(self.url.get_secret_value()).scheme == "rediss"

    @property
    def sentinel_addresses(self) -> tuple[tuple[str, int], ...]:
        """The Sentinels as (host, port) pairs."""
        return tuple(_host_and_port(address) for address in self.sentinels)


def _host_and_port(address: str) -> tuple[str, int]:
    """``host:port`` (``[v6]:port`` for IPv6) as a pair; ValueError naming the address."""
    host, _, port = address.rpartition(":")
    host = host.removeprefix("[").removesuffix("]")
    if not host or not port.isdecimal() or not 0 < int(port) < 65536:
        raise ValueError(f"{address!r} is not host:port (e.g. 10.0.0.5:26379)")
    return host, int(port)


class RevocationConfig(_Section):
    """The revocation engine: sweep cadence, retries, claim visibility, concurrency."""

    sweep_interval_seconds: float = Field(default=1.0, gt=0, le=60)
    max_attempts: int = Field(default=8, ge=1, le=1000)
    backoff_base_seconds: float = Field(default=1.0, gt=0)
    backoff_cap_seconds: float = Field(default=60.0, gt=0)
    failed_retry_interval_seconds: float = Field(default=300.0, gt=0)
    sweep_batch: int = Field(default=256, ge=1, le=10_000)
    visibility_seconds: float = Field(default=60.0, gt=0)
    concurrency: int = Field(default=16, ge=1, le=256)
    revoke_timeout_seconds: float = Field(default=10.0, gt=0)


class LedgerSettings(_Section):
    """How long the ledger keeps runs that are over (their history stays in the audit trail)."""

    # Days a run stays in the ledger after everything of it is over (it ended or reached its
    # deadline, and every credential issued in it expired); then it is deleted with its leases
    # and index entries (a `workflow.purged` audit event first). 0: kept forever (Redis grows
    # with every run: about 1 KB per credential).
    retention_days: int = Field(default=30, ge=0, le=3650)
    # How often a replica looks for runs to purge (one replica at a time, under a lock), and
    # at most how many runs one pass purges.
    purge_interval_seconds: float = Field(default=300.0, gt=0, le=86_400)
    purge_batch: int = Field(default=100, ge=1, le=10_000)


class IssuanceSettings(_Section):
    """Bounds on what one identity may hold, whatever the policy allows."""

    # At most this many live credentials (issued, not revoked, not expired) per workload
    # identity, across runs and targets; a request over it is refused with 429
    # limit_exceeded. 0 turns the limit off. A target may set a lower cap of its own
    # (max_live_per_identity in targets.toml).
    live_credentials_per_identity: int = Field(default=500, ge=0, le=MAX_LIVE_LIMIT)
    # At most this many credentials issued per workload identity per minute: a token bucket
    # that holds this many and refills at this rate (bursts up to it, then a steady pace). It
    # keeps one runaway or compromised agent from flooding OpenBao. 0 turns it off.
    credentials_per_identity_per_minute: int = Field(default=600, ge=0, le=MAX_LIVE_LIMIT)
    # At most this many workflow runs started per orchestrator identity per minute (a token
    # bucket, as above): every run is kept in Redis until its retention ends, so one runaway
    # or compromised orchestrator must not fill it. 0 turns it off.
    runs_per_identity_per_minute: int = Field(default=600, ge=0, le=MAX_LIVE_LIMIT)


class PolicySettings(_Section):
    """Policy lifecycle (hot reload) and the values policies see as context."""

    # How often the policy directory and the targets file are checked for changes (stat
    # only; read and validated when something changed). 0 turns polling off (SIGHUP still
    # reloads).
    reload_interval_seconds: float = Field(default=5.0, ge=0, le=3600)
    # The working window policies see as context.working_hours: [start, end) in UTC hours on
    # the ISO weekdays listed (1 Monday .. 7 Sunday); start > end wraps midnight; 0 and 24
    # mean the whole day.
    working_hours_start_utc: int = Field(default=6, ge=0, le=23)
    working_hours_end_utc: int = Field(default=20, ge=1, le=24)
    working_days: tuple[int, ...] = (1, 2, 3, 4, 5, 6, 7)
    # Continuous authorization: a re-evaluation of live leases that failed (e.g. Redis
    # unreachable) is retried after base · 2^(n-1) seconds, capped, jittered to [d/2, d].
    reevaluation_retry_base_seconds: float = Field(default=1.0, gt=0, le=3600)
    reevaluation_retry_cap_seconds: float = Field(default=60.0, gt=0, le=3600)
    # How often a replica checks whether another one has applied other decision inputs
    # (policy set, targets, roles, hours) after its own came into force; then it issues
    # nothing and is not ready until it loads them (broker/superseded.py). 0: never.
    superseded_check_seconds: float = Field(default=5.0, ge=0, le=600)

    @model_validator(mode="after")
    def _a_sane_retry(self) -> PolicySettings:
        if self.reevaluation_retry_base_seconds > self.reevaluation_retry_cap_seconds:
            raise ValueError(
                "reevaluation_retry_base_seconds must not exceed reevaluation_retry_cap_seconds"
            )
        return self

    @model_validator(mode="after")
    def _a_real_window(self) -> PolicySettings:
        if self.working_hours_start_utc == self.working_hours_end_utc:
            raise ValueError(
                "working_hours_start_utc equals working_hours_end_utc: an empty window "
                "(use 0 and 24 for the whole day)"
            )
        if not self.working_days or not set(self.working_days) <= set(range(1, 8)):
            raise ValueError("working_days must list ISO weekdays 1..7 (at least one)")
        return self


class AuditStdoutSettings(_Section):
    """The audit sink that writes each record as a structlog JSON line (``event``
    ``audit.record``) to the broker's log on stdout, for a log collector."""

    enabled: bool = True
    # A durable sink must hold a record before issuance goes on; stdout cannot say so.
    durable: bool = False


class AuditFileSettings(_Section):
    """The append-only JSONL audit file (one canonical record per line)."""

    # Empty: no file sink.
    path: str = ""
    durable: bool = True
    # always: write and fsync every record on its own; batch: one write and fsync per group
    # of records committed together (each record is on disk before it is acknowledged);
    # never: written to the OS only (lost on a power failure).
    fsync: Literal["always", "batch", "never"] = "batch"


class AuditRedisSettings(_Section):
    """The Redis stream the audit queries read (on the ledger's Redis)."""

    enabled: bool = True
    durable: bool = True
    # The stream of every record (one entry per group commit); per-run copies live in
    # `<stream>:run:<id>`.
    stream: str = Field(default="tl:audit", pattern=r"^[A-Za-z0-9:_.{}-]{1,64}$")
    # 0: the stream is never trimmed. Otherwise XADD MAXLEN ~ maxlen (verification then needs
    # `--allow-trimmed-head`).
    maxlen: int = Field(default=0, ge=0)
    # 0: entries are kept forever. Otherwise each group commit's XADD carries MINID ~ (now -
    # retention_days): older entries are dropped (Redis >= 6.2). With maxlen too, both apply.
    retention_days: int = Field(default=0, ge=0, le=3650)
    # How long a run's copy lives after its last write (at most retention_days when that is
    # set); while it does, the run's id is not given to a new run (workflow.id_retired).
    index_ttl_days: int = Field(default=90, ge=1, le=3650)


class AuditSettings(_Section):
    """The audit trail: the chain writer, its sinks and the limits of reported events."""

    # This process's writer id in the hash chain; empty: <host>-<pid>-<random>, new per start.
    writer_id: str = Field(default="", pattern=r"^[A-Za-z0-9._:-]{0,100}$")
    # Events waiting for the writer; a full queue refuses new events (503 on issuance).
    queue_size: int = Field(default=10_000, ge=16, le=1_000_000)
    # At most this many records per group commit (one write, one fsync, one Redis pipeline).
    batch_max: int = Field(default=256, ge=1, le=10_000)
    # An event not acknowledged by every durable sink within this time fails its request.
    record_timeout_seconds: float = Field(default=5.0, gt=0, le=60)
    # identity.rejected events recorded per second per process (the rest are counted into the
    # next one); 0 records none. Unauthenticated callers must not be able to flood the trail.
    identity_rejected_per_second: float = Field(default=20.0, ge=0, le=10_000)
    # POST /v1/events accepts reports about a credential or run this long after it ended.
    report_grace_seconds: int = Field(default=300, ge=0, le=86_400)
    # Without a durable sink nothing stops issuance when audit records are lost: refused
    # unless this is set (benchmarks, throwaway setups).
    insecure_allow_no_durable_sink: bool = False
    stdout: AuditStdoutSettings = AuditStdoutSettings()
    file: AuditFileSettings = AuditFileSettings()
    redis: AuditRedisSettings = AuditRedisSettings()

    @model_validator(mode="after")
    def _a_durable_sink(self) -> AuditSettings:
        durable = (
            (self.stdout.enabled and self.stdout.durable)
            or (bool(self.file.path) and self.file.durable)
            or (self.redis.enabled and self.redis.durable)
        )
        if not durable and not self.insecure_allow_no_durable_sink:
            raise ValueError(
                "no durable audit sink is enabled: credentials would be issued without a "
                "durable record (enable one, or set insecure_allow_no_durable_sink = true)"
            )
        return self


class ApprovalSettings(_Section):
    """Approvals (human-in-the-loop for requests policy answers needs_approval with)."""

    # How long an approval is good for from the moment it is requested (waiting for the
    # approvers and then for its use). A credential issued under it never outlives it.
    ttl_seconds: int = Field(default=3600, ge=1, le=7 * 24 * 3600)
    # How long decided, used and expired approvals stay readable after their expiry.
    retention_seconds: int = Field(default=7 * 24 * 3600, ge=60, le=366 * 24 * 3600)


class NotificationSettings(_Section):
    """Webhooks told when an approval is requested and when it is decided (JSON body,
    HMAC-SHA256 signature, retried with backoff, delivered in the background)."""

    # Where to POST: https, or http to a loopback address only. URLs of chat webhooks carry
    # secrets, so they are SecretStr and never logged (logs name scheme, host and a hash).
    webhook_urls: tuple[SecretStr, ...] = ()
    # The HMAC key comes from a file (mode 0600, e.g. a mounted secret) or from an
    # environment variable named here; it is never written inline in the TOML.
    webhook_secret_file: str = ""
    webhook_secret_env: str = ""
    # PEM CA bundle for the receivers' certificates; empty: the system roots.
    webhook_ca_file: str = ""
    timeout_seconds: float = Field(default=5.0, gt=0, le=60)
    max_attempts: int = Field(default=6, ge=1, le=20)
    backoff_base_seconds: float = Field(default=0.5, gt=0, le=60)
    backoff_cap_seconds: float = Field(default=30.0, gt=0, le=3600)
    # Undelivered deliveries kept in the outbox (a Redis stream shared by the replicas, in
    # flight and waiting for a retry included); when full, new notifications are dropped
    # (logged, counted) rather than making a request wait.
    queue_size: int = Field(default=1000, ge=1, le=100_000)
    concurrency: int = Field(default=4, ge=1, le=64)
    # A delivery held by a broker that stopped touching it (crashed, killed, stopped) for this
    # long is taken over by another broker (or the restarted one). Live brokers touch what
    # they hold every third of it, so it need not cover timeouts or backoff.
    visibility_seconds: float = Field(default=60.0, ge=1, le=3600)

    @field_validator("webhook_urls")
    @classmethod
    def _safe_urls(cls, urls: tuple[SecretStr, ...]) -> tuple[SecretStr, ...]:
        for index, url in enumerate(urls):
            parts = urlsplit(url.get_secret_value())
            host = parts.hostname or ""
            if parts.scheme == "https" and host:
                continue
            if parts.scheme == "http" and _is_loopback(host):
                continue
            raise ValueError(
                f"webhook_urls[{index}] must be https:// (or http:// to a loopback address), "
                f"got scheme {parts.scheme!r}"
            )
        return urls

    @model_validator(mode="after")
    def _one_secret_source(self) -> NotificationSettings:
        if self.webhook_urls and bool(self.webhook_secret_file) == bool(self.webhook_secret_env):
            raise ValueError(
                "webhooks need their HMAC secret from exactly one of webhook_secret_file and "
                "webhook_secret_env"
            )
        return self


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


class Settings(BaseSettings):
    """All broker settings."""

    model_config = SettingsConfigDict(
        env_prefix=ENV_PREFIX,
        env_nested_delimiter="__",
        extra="forbid",
        frozen=True,
    )

    server: ServerSettings = ServerSettings()
    spiffe: SpiffeSettings = SpiffeSettings()
    vault: VaultSettings = VaultSettings()
    redis: RedisSettings = RedisSettings()
    revocation: RevocationConfig = RevocationConfig()
    issuance: IssuanceSettings = IssuanceSettings()
    ledger: LedgerSettings = LedgerSettings()
    audit: AuditSettings = AuditSettings()
    policy: PolicySettings = PolicySettings()
    approvals: ApprovalSettings = ApprovalSettings()
    notifications: NotificationSettings = NotificationSettings()
    log_level: Literal["debug", "info", "warning", "error"] = "info"
    # Roles of workloads (SPIFFE ID patterns) and people (OIDC issuers and claims).
    identities_file: Path = Path("config/identities.toml")
    # Cedar policies (*.cedar) and their schema, validated at start-up.
    policy_dir: Path = Path("config/policies")
    # The catalog of targets agents may ask credentials for.
    targets_file: Path = Path("config/targets.toml")

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        """Init arguments, then environment, then the TOML file (lowest)."""
        toml_path = _config_path()
        sources: list[PydanticBaseSettingsSource] = [init_settings, env_settings]
        if toml_path is not None:
            sources.append(TomlConfigSettingsSource(settings_cls, toml_file=toml_path))
        return tuple(sources)


def _config_path() -> Path | None:
    named = os.environ.get(f"{ENV_PREFIX}CONFIG")
    if named:
        path = Path(named)
        if not path.is_file():
            raise ConfigurationError(
                f"{ENV_PREFIX}CONFIG names {str(path)!r}, which is not a readable file"
            )
        return path
    return DEFAULT_CONFIG_PATH if DEFAULT_CONFIG_PATH.is_file() else None


def load_settings() -> Settings:
    """Load and validate settings; raise :class:`ConfigurationError` naming each bad key."""
    try:
        return Settings()
    except ValidationError as exc:
        problems = []
        for error in exc.errors():
            dotted = ".".join(str(part) for part in error["loc"])
            env_name = ENV_PREFIX + "__".join(str(p) for p in error["loc"]).upper()
            problems.append(f"{dotted} ({env_name}): {error['msg']}")
        raise ConfigurationError("invalid settings: " + "; ".join(problems)) from None
    except ValueError as exc:  # TOML syntax errors surface as ValueError subclasses
        raise ConfigurationError(f"cannot read the configuration file: {exc}") from None
