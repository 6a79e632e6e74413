"""Readers of the deployment artifacts under ``deploy/`` for the tests that check them.

* :func:`read_containerfile`: the instructions of ``deploy/container/Containerfile`` per
  build stage (line continuations joined, comments dropped, ``ARG`` defaults substituted into
  ``FROM``), enough to check what each stage copies and runs without a container engine.
* :func:`build_k8scheck` / :func:`run_k8scheck`: the Go checker of ``deploy/k8s``
  (``deploy/k8scheck``, its own Go module), built once per session with the normal Go build
  cache (a cold build compiles k8s.io/api: about 40 s on 2 cores; warm, well under a second).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parent.parent
CONTAINERFILE = REPO_ROOT / "deploy" / "container" / "Containerfile"
CONTAINER_IGNORE = REPO_ROOT / "deploy" / "container" / "Containerfile.dockerignore"
K8S_DIR = REPO_ROOT / "deploy" / "k8s"
K8SCHECK_MODULE = REPO_ROOT / "deploy" / "k8scheck"
# A cold build downloads k8s.io/api and apimachinery from the Go module proxy and compiles
# them; bounded so a hung download fails the test instead of eating the suite's time.
BUILD_TIMEOUT_SECONDS = 240
RUN_TIMEOUT_SECONDS = 30


@dataclass
class Instruction:
    keyword: str  # upper case: FROM, COPY, RUN, ...
    args: str  # the rest of the (joined) line
    line: int  # where it starts in the file

    def flags(self) -> dict[str, str]:
        """``--name=value`` options at the start of the arguments (``COPY --from=build``)."""
        found = {}
        for word in self.args.split():
            if not word.startswith("--"):
                break
            name, _, value = word[2:].partition("=")
            found[name] = value
        return found

    def words(self) -> list[str]:
        """The arguments without the leading ``--`` options."""
        words = self.args.split()
        while words and words[0].startswith("--"):
            words.pop(0)
        return words

    def exec_form(self) -> list[str] | None:
        """The JSON array of an exec-form ENTRYPOINT/CMD/RUN, None for the shell form."""
        text = self.args.strip()
        if not text.startswith("["):
            return None
        value = json.loads(text)
        assert isinstance(value, list) and all(isinstance(v, str) for v in value), self.args
        return value


@dataclass
class Stage:
    base: str  # the image after ARG substitution
    name: str  # "" when the stage has no AS name
    instructions: list[Instruction] = field(default_factory=list)

    def all(self, keyword: str) -> list[Instruction]:
        return [i for i in self.instructions if i.keyword == keyword]


def read_containerfile(path: Path = CONTAINERFILE) -> tuple[dict[str, str], list[Stage]]:
    """The global ``ARG`` defaults and the build stages of a Containerfile."""
    logical: list[tuple[int, str]] = []
    pending = ""
    start = 0
    for number, raw in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        stripped = raw.strip()
        if not pending and (not stripped or stripped.startswith("#")):
            continue
        if pending and stripped.startswith("#"):
            continue  # a comment inside a continued instruction
        if not pending:
            start = number
        if stripped.endswith("\\"):
            pending += stripped[:-1] + " "
            continue
        logical.append((start, pending + stripped))
        pending = ""
    assert not pending, f"{path}: the last instruction ends with a continuation"

    args: dict[str, str] = {}
    stages: list[Stage] = []
    for number, text in logical:
        keyword, _, rest = text.partition(" ")
        keyword = keyword.upper()
        rest = rest.strip()
        if keyword == "ARG" and not stages:
            name, _, default = rest.partition("=")
            args[name] = default
            continue
        if keyword == "FROM":
            words = rest.split()
            words = [w for w in words if not w.startswith("--platform")]
            base = re.sub(
                r"\$\{(\w+)\}|\$(\w+)", lambda m: args[m.group(1) or m.group(2)], words[0]
            )
            name = words[2] if len(words) == 3 and words[1].upper() == "AS" else ""
            stages.append(Stage(base=base, name=name))
            continue
        assert stages, f"{path}:{number}: {keyword} before the first FROM"
        stages[-1].instructions.append(Instruction(keyword, rest, number))
    return args, stages


def ignore_allowlist(path: Path = CONTAINER_IGNORE) -> tuple[list[str], list[str]]:
    """(included, excluded) patterns of an allowlist ignore file (``*`` then ``!path``)."""
    lines = [
        line.strip()
        for line in path.read_text(encoding="utf-8").splitlines()
        if line.strip() and not line.strip().startswith("#")
    ]
    assert lines and lines[0] == "*", f"{path}: expected an allowlist that starts with '*'"
    included = [line[1:] for line in lines[1:] if line.startswith("!")]
    excluded = [line for line in lines[1:] if not line.startswith("!")]
    return included, excluded


def go_binary() -> str | None:
    return shutil.which("go")


def build_k8scheck(out_dir: Path) -> Path:
    """Build the checker into ``out_dir`` (the Go build cache makes a rebuild cheap)."""
    go = go_binary()
    assert go is not None
    binary = out_dir / "k8scheck"
    result = subprocess.run(
        [go, "build", "-trimpath", "-buildvcs=false", "-o", str(binary), "."],
        cwd=K8SCHECK_MODULE,
        capture_output=True,
        text=True,
        timeout=BUILD_TIMEOUT_SECONDS,
        env={**os.environ, "CGO_ENABLED": "0"},
        check=False,
    )
    assert result.returncode == 0, f"go build of deploy/k8scheck failed:\n{result.stderr}"
    return binary


@dataclass
class CheckResult:
    returncode: int
    stdout: str
    stderr: str

    def decoded(self) -> list[dict[str, Any]]:
        """The objects ``-json`` printed (only after a pass)."""
        data = json.loads(self.stdout)
        objects = data["objects"]
        assert isinstance(objects, list)
        return objects


def run_k8scheck(binary: Path, directory: Path, *, as_json: bool = False) -> CheckResult:
    argv = [str(binary), *(["-json"] if as_json else []), str(directory)]
    result = subprocess.run(
        argv, capture_output=True, text=True, timeout=RUN_TIMEOUT_SECONDS, check=False
    )
    return CheckResult(result.returncode, result.stdout, result.stderr)
