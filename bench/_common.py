"""What the benchmarks share: a broker process's environment on the local stack, starting it,
waiting until it is ready, client TLS with a minted SVID, a private Redis, and the statistics.

Not a benchmark itself (``make bench`` runs ``bench/bench_*.py`` only)."""

from __future__ import annotations

import asyncio
import os
import secrets
import shutil
import ssl
import subprocess
import sys
import tempfile
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import IO, Any

import aiohttp

from broker.devstack import (
    REPO_ROOT,
    DevStack,
    ManagedProcess,
    StackEndpoints,
    free_port,
    redis_answers,
    wait_until,
)


def percentile(values: list[float], q: float) -> float:
    """The ``q`` quantile (nearest rank) of ``values``."""
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of process ``pid`` so far (from /proc)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def machine_busy_seconds() -> float:
    """Busy CPU time of the whole machine so far, every core summed (``/proc/stat``: user,
    nice, system, irq and softirq; idle, I/O wait and time stolen by the hypervisor are not
    this machine's work)."""
    fields = Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]
    user, nice, system, _idle, _iowait, irq, softirq = (int(value) for value in fields[:7])
    return (user + nice + system + irq + softirq) / os.sysconf("SC_CLK_TCK")


class CpuMeter:
    """CPU time spent during a measurement: the whole machine's and named processes'.

    ``start()`` then ``stop()``; ``spent`` maps ``"machine"`` and every name given to the
    seconds used in between (a process's children that are still running are not counted in
    its own figure: PostgreSQL's backends, for instance, are in ``machine`` only)."""

    def __init__(self, pids: dict[str, list[int]]) -> None:
        self._pids = pids
        self._before: dict[str, float] = {}
        self.spent: dict[str, float] = {}

    def _now(self) -> dict[str, float]:
        now = {name: sum(cpu_seconds(pid) for pid in pids) for name, pids in self._pids.items()}
        now["machine"] = machine_busy_seconds()
        return now

    def start(self) -> None:
        """Take the starting readings."""
        self._before = self._now()

    def stop(self) -> dict[str, float]:
        """Take the final readings; ``spent`` (also returned) holds the differences."""
        after = self._now()
        self.spent = {name: after[name] - self._before[name] for name in after}
        return self.spent


def broker_env(endpoints: StackEndpoints, **settings: str) -> dict[str, str]:
    """This process's environment plus the settings that point a broker at the stack."""
    return {
        **os.environ,
        "SPIFFE_ENDPOINT_SOCKET": f"unix://{endpoints.spire_agent_socket}",
        "TASKLEASE_SPIFFE__WORKLOAD_API_SOCKET": f"unix://{endpoints.spire_agent_socket}",
        "TASKLEASE_VAULT__ADDR": endpoints.openbao_addr,
        "TASKLEASE_REDIS__URL": endpoints.redis_url,
        "TASKLEASE_LOG_LEVEL": "warning",
        # One benchmark agent holds more live credentials, and is issued them faster, than the
        # default limits allow (500 live, 600 a minute); the largest limits keep the counts on
        # the measured path without refusing anything.
        "TASKLEASE_ISSUANCE__LIVE_CREDENTIALS_PER_IDENTITY": "1000000",
        "TASKLEASE_ISSUANCE__CREDENTIALS_PER_IDENTITY_PER_MINUTE": "1000000",
        "TASKLEASE_ISSUANCE__RUNS_PER_IDENTITY_PER_MINUTE": "1000000",
        **settings,
    }


def start_broker(
    env: dict[str, str], *, stdout: IO[bytes] | int = subprocess.DEVNULL, flags: str | None = None
) -> subprocess.Popen[bytes]:
    """``python -m broker serve`` as its own process. ``TASKLEASE_BENCH_PYFLAGS`` (e.g.
    ``-m cProfile -o /tmp/broker.prof``) is passed to Python unless ``flags`` is given."""
    pyflags = os.environ.get("TASKLEASE_BENCH_PYFLAGS", "") if flags is None else flags
    return subprocess.Popen(
        [sys.executable, *pyflags.split(), "-m", "broker", "serve"],
        cwd=REPO_ROOT,
        env=env,
        stdout=stdout,
        stderr=subprocess.DEVNULL,
    )


async def wait_ready(
    session: aiohttp.ClientSession, url: str, tls: ssl.SSLContext, *, attempts: int = 300
) -> None:
    """Poll ``/readyz`` every 0.1 s until it answers 200 (SystemExit after ``attempts``)."""
    for _ in range(attempts):
        try:
            async with session.get(f"{url}/readyz", ssl=tls) as ready:
                if ready.status == 200:
                    return
        except aiohttp.ClientError:
            pass
        await asyncio.sleep(0.1)
    raise SystemExit(f"the broker at {url} did not become ready")


async def wait_start_up_passes(
    session: aiohttp.ClientSession, url: str, tls: ssl.SSLContext, *, seconds: float = 60.0
) -> None:
    """Wait until the broker's start-up re-evaluation is behind it: a broker that finds no
    re-evaluation marker (a fresh stack) decides every live lease again, and
    ``2 * policy.superseded_check_seconds + 10`` s (20 s by default) later decides again the
    ones issued since (the follow-up, broker/continuous.py). A measurement taken meanwhile
    would charge that pass to whichever requests it fell among. Polls ``/metrics`` until
    ``tasklease_continuous_completed_total{scope="recent"}`` appears (SystemExit after
    ``seconds``)."""
    deadline = asyncio.get_running_loop().time() + seconds
    while asyncio.get_running_loop().time() < deadline:
        async with session.get(f"{url}/metrics", ssl=tls) as response:
            text = await response.text()
        if 'tasklease_continuous_completed_total{scope="recent"}' in text:
            return
        await asyncio.sleep(0.5)
    raise SystemExit(f"the broker at {url} did not finish its start-up re-evaluation")


async def drop_namespace(client: Any, namespace: str) -> None:
    """Delete every key of ``namespace`` (a benchmark's own ledger) from ``client``'s Redis,
    5 000 at a time."""
    keys = [key async for key in client.scan_iter(match=f"{namespace}:*", count=5000)]
    for start in range(0, len(keys), 5000):
        await client.unlink(*keys[start : start + 5000])


def svid_context(
    stack: DevStack, spiffe_id: str, workdir: Path, name: str, *, ttl_seconds: int = 3600
) -> ssl.SSLContext:
    """A client TLS context presenting a freshly minted X.509-SVID (PEM files in
    ``workdir``) and trusting the stack's bundle; the broker is checked by that bundle."""
    minted = stack.mint_x509_svid(spiffe_id, ttl_seconds=ttl_seconds)
    cert, key = workdir / f"{name}.pem", workdir / f"{name}-key.pem"
    cert.write_text(minted["svid"])
    key.write_text(minted["key"])
    context = ssl.create_default_context(cadata=minted["bundle"])
    context.check_hostname = False
    context.load_cert_chain(cert, key)
    return context


def _private_redis(directory: Path, *, appendfsync: str) -> tuple[ManagedProcess, str]:
    """A Redis of this benchmark's own on loopback (AOF on, no eviction, a password kept in a
    0600 file rather than on the command line)."""
    port, password = free_port(), secrets.token_urlsafe(24)
    conf = directory / "redis.conf"
    conf.touch(mode=0o600)
    conf.write_text(
        "\n".join(
            [
                "bind 127.0.0.1",
                f"port {port}",
                f"dir {directory}",
                "appendonly yes",
                f"appendfsync {appendfsync}",
                "auto-aof-rewrite-percentage 0",
                "maxmemory-policy noeviction",
                'save ""',
                f"requirepass {password}",
                "daemonize no",
                "",
            ]
        )
    )
    process = ManagedProcess("redis", ["redis-server", str(conf)], directory / "redis.log")
    process.start()

    def answers() -> bool:
        return redis_answers(port, password)

    wait_until(answers, what="the benchmark's Redis to answer PING", timeout=20, process=process)
    return process, f"redis://:{password}@127.0.0.1:{port}/0"


def with_redis(run: Callable[[str], Coroutine[Any, Any, None]], *, appendfsync: str) -> int:
    """``run(url)`` against ``TASKLEASE_BENCH_REDIS_URL`` if set, else against a private Redis
    started (and removed) for it with ``appendfsync``. Exit status 1 without redis-server."""
    url = os.environ.get("TASKLEASE_BENCH_REDIS_URL", "")
    if url:
        asyncio.run(run(url))
        return 0
    if shutil.which("redis-server") is None:
        sys.stdout.write("redis-server is not installed and TASKLEASE_BENCH_REDIS_URL is unset\n")
        return 1
    directory = Path(tempfile.mkdtemp(prefix="tl-bench-redis-"))
    process, url = _private_redis(directory, appendfsync=appendfsync)
    try:
        asyncio.run(run(url))
    finally:
        process.stop()
        shutil.rmtree(directory, ignore_errors=True)
    return 0
