"""What the benchmarks that run a broker process share: its environment on the local stack,
starting it, waiting until it is ready, client TLS with a minted SVID, and the statistics.

Not a benchmark itself (``make bench`` runs ``bench/bench_*.py`` only)."""

from __future__ import annotations

import asyncio
import os
import ssl
import subprocess
import sys
from pathlib import Path
from typing import IO

import aiohttp

from broker.devstack import REPO_ROOT, DevStack, StackEndpoints


def percentile(values: list[float], q: float) -> float:
    """The ``q`` quantile (nearest rank) of ``values``."""
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of process ``pid`` so far (from /proc)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def broker_env(endpoints: StackEndpoints, **settings: str) -> dict[str, str]:
    """This process's environment plus the settings that point a broker at the stack."""
    return {
        **os.environ,
        "SPIFFE_ENDPOINT_SOCKET": f"unix://{endpoints.spire_agent_socket}",
        "TASKLEASE_SPIFFE__WORKLOAD_API_SOCKET": f"unix://{endpoints.spire_agent_socket}",
        "TASKLEASE_VAULT__ADDR": endpoints.openbao_addr,
        "TASKLEASE_REDIS__URL": endpoints.redis_url,
        "TASKLEASE_LOG_LEVEL": "warning",
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
