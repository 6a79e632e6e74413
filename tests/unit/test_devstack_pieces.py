"""Pieces of the dev stack: placeholder filling, durations, free ports, and how a server
process is started (its own session; it dies with the process that started it)."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from broker import devstack
from broker.devstack import _fill, _seconds, free_port


def test_placeholders_are_filled_but_vault_templates_are_kept() -> None:
    step = {
        "url": "postgresql://{{username}}:{{password}}@127.0.0.1:{pg_port}/demo",
        "keys": "{jwt_pubkeys}",
        "nested": [{"td": "spiffe://{trust_domain}/x"}],
        "flag": True,
    }
    filled = _fill(
        step, {"{pg_port}": "5432", "{jwt_pubkeys}": ["PEM"], "{trust_domain}": "t.test"}
    )
    assert filled == {
        "url": "postgresql://{{username}}:{{password}}@127.0.0.1:5432/demo",
        "keys": ["PEM"],
        "nested": [{"td": "spiffe://t.test/x"}],
        "flag": True,
    }


def test_durations() -> None:
    assert [_seconds("90"), _seconds("30s"), _seconds("5m"), _seconds("1h")] == [90, 30, 300, 3600]


def test_free_port_with_a_free_neighbour() -> None:
    port = free_port(also_next=True)
    assert 1024 < port < 65535


def test_a_server_runs_in_its_own_session_and_dies_with_the_process_that_started_it(
    tmp_path: Path,
) -> None:
    """A stack server gets SIGKILL when the process that started it dies (killed, so no
    clean-up runs): nothing of a crashed test session or `make dev` is left behind."""
    starter = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sys, time\n"
            "from pathlib import Path\n"
            "from broker.devstack import ManagedProcess\n"
            "server = ManagedProcess('sleeper', ['sleep', '60'], Path(sys.argv[1]))\n"
            "server.start()\n"
            "print(server.popen.pid, flush=True)\n"
            "time.sleep(60)\n",
            str(tmp_path / "sleeper.log"),
        ],
        stdout=subprocess.PIPE,
    )
    assert starter.stdout is not None
    pid = int(starter.stdout.readline())
    try:
        assert os.getsid(pid) == pid  # its own session (and process group)
        comm = Path(f"/proc/{pid}/comm")
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and comm.read_text().strip() != "sleep":
            time.sleep(0.02)  # setpriv (if used) execs the server under the same pid
        assert comm.read_text().strip() == "sleep"
        starter.kill()
        starter.wait(timeout=10)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and _running(pid):
            time.sleep(0.05)
        assert not _running(pid)
    finally:
        starter.kill()
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


def _running(pid: int) -> bool:
    """Alive and not a zombie waiting for its (dead) parent's reaper."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except FileNotFoundError:
        return False
    return state != "Z"


def test_a_service_user_is_taken_on_through_setpriv_when_there_is_one() -> None:
    """Dropping to a service user in ``subprocess`` itself makes Python fork without vfork,
    which runs the fork handlers of the test process's threads in the child (a PostgreSQL
    start crashed that way under load); setpriv does it in the command line instead."""
    argv = devstack._dying_with_parent(["postgres", "-D", "data"], "root")
    if devstack._SETPRIV is not None:
        assert argv == [
            devstack._SETPRIV,
            "--reuid=0",
            "--regid=0",
            "--clear-groups",
            "--pdeathsig",
            "KILL",
            "--",
            "postgres",
            "-D",
            "data",
        ]
        assert devstack._user_switch("root") == {}
    else:
        assert argv == ["postgres", "-D", "data"]
        assert devstack._user_switch("root") == {
            "user": "root",
            "group": "root",
            "extra_groups": [],
        }
    assert devstack._user_switch(None) == {}
