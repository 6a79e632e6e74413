"""The container recipe (deploy/container), checked without a container engine.

There is no Docker or Podman on the machines this suite runs on, so the image is not built
here; these tests hold the Containerfile to what the image must be: a wheel of this repository
installed with the exact pins of requirements/constraints.txt in a build stage, a final
Python 3.11 slim (Debian 12) stage that runs no command of its own, a non-root numeric user,
``python -m broker serve`` as the entrypoint, settings from a mounted file, no secret, and a
build context that holds what the COPY instructions need and nothing else. The Kubernetes
manifests are checked by tests/integration/test_deploy_k8s.py (with the Go checker).
"""

from __future__ import annotations

import fnmatch
import re
import tomllib
from pathlib import Path

import pytest

from tests.deploy_files import (
    CONTAINERFILE,
    REPO_ROOT,
    Stage,
    ignore_allowlist,
    read_containerfile,
)

SECRET_NAME = re.compile(r"(?i)(PASSWORD|PASSWD|SECRET|TOKEN|PRIVATE_?KEY|API_?KEY|CREDENTIAL)")


@pytest.fixture(scope="module")
def stages() -> list[Stage]:
    return read_containerfile()[1]


def _final(stages: list[Stage]) -> Stage:
    return stages[-1]


def _copy_sources(stage: Stage) -> list[str]:
    """Sources of the COPY instructions that read the build context (not another stage)."""
    sources = []
    for copy in stage.all("COPY"):
        if "from" in copy.flags():
            continue
        words = copy.words()
        assert len(words) >= 2, f"line {copy.line}: COPY needs a source and a destination"
        sources.extend(words[:-1])
    return sources


def test_two_stages_build_then_run_on_python_311_slim_bookworm(stages: list[Stage]) -> None:
    assert len(stages) == 2, [s.base for s in stages]
    build, final = stages
    assert build.name == "build"
    for stage in stages:
        # Python 3.11 on Debian 12 (bookworm), the slim variant: the version pyproject allows.
        assert re.fullmatch(r"python:3\.11-slim-bookworm(@sha256:[0-9a-f]{64})?", stage.base), (
            stage.base
        )
    requires = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())["project"]
    assert requires["requires-python"] == ">=3.11"
    # The final stage takes only the virtual environment from the build stage.
    copies = final.all("COPY")
    assert [c.flags().get("from") for c in copies] == ["build"]
    assert copies[0].words() == ["/opt/tasklease/venv", "/opt/tasklease/venv"]


def test_the_final_stage_runs_no_command(stages: list[Stage]) -> None:
    """Nothing runs in the image at build time past the build stage: no shell, no package
    manager, no pip; and no HEALTHCHECK (Kubernetes probes over HTTPS)."""
    final = _final(stages)
    assert final.all("RUN") == []
    assert final.all("HEALTHCHECK") == []
    assert final.all("ADD") == []


def test_the_wheel_is_installed_with_the_exact_pins(stages: list[Stage]) -> None:
    build = stages[0]
    runs = " ".join(run.args for run in build.all("RUN"))
    assert "pip wheel --no-deps --wheel-dir /wheels ." in runs
    install = re.search(r"/opt/tasklease/venv/bin/pip install (.+?) &&", runs)
    assert install is not None, runs
    options = install.group(1).split()
    # Only the constraints file's versions, and only prebuilt wheels for the dependencies (no
    # sdist's setup code runs at build time).
    assert options[options.index("-c") + 1] == "requirements/constraints.txt"
    assert "--only-binary=:all:" in options
    assert options[-1] == "/wheels/tasklease-*.whl"
    # pip leaves the runtime environment once it has done its work.
    assert "pip uninstall --yes pip setuptools" in runs
    constraints = (REPO_ROOT / "requirements" / "constraints.txt").read_text().splitlines()
    pins = [line for line in constraints if line.strip() and not line.startswith("#")]
    assert pins and all(re.fullmatch(r"[A-Za-z0-9_.\-\[\]]+==[\w.+\-]+", p) for p in pins), (
        "requirements/constraints.txt must pin every package exactly"
    )


def test_copy_sources_exist_and_are_in_the_build_context(stages: list[Stage]) -> None:
    sources = [s for stage in stages for s in _copy_sources(stage)]
    assert sorted(sources) == sorted(
        ["pyproject.toml", "README.md", "requirements/constraints.txt", "broker"]
    )
    included, excluded = ignore_allowlist()
    for source in sources:
        assert (REPO_ROOT / source).exists(), f"COPY {source}: not in the repository"
        assert source in included, (
            f"COPY {source}: the ignore file (Containerfile.dockerignore) leaves it out of the "
            "build context"
        )
    # The context holds nothing the COPY instructions do not read (.git, .venv, logs).
    assert sorted(included) == sorted(sources)
    assert "**/__pycache__" in excluded
    # What the wheel is built from: pyproject's readme and the packages it finds.
    project = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())
    assert project["project"]["readme"] in sources
    assert project["tool"]["setuptools"]["packages"]["find"]["include"] == ["broker*"]
    assert (REPO_ROOT / "broker" / "__main__.py").is_file()


def test_ignore_patterns_keep_caches_out() -> None:
    _, excluded = ignore_allowlist()
    for cached in ("broker/__pycache__", "broker/core/__pycache__", "broker/cli.pyc"):
        assert any(fnmatch.fnmatch(cached, p.replace("**/", "*")) for p in excluded), cached


def test_entrypoint_is_python_m_broker_serve(stages: list[Stage]) -> None:
    final = _final(stages)
    [entrypoint] = final.all("ENTRYPOINT")
    [cmd] = final.all("CMD")
    argv = entrypoint.exec_form()
    assert argv == ["/opt/tasklease/venv/bin/python", "-m", "broker"], (
        "ENTRYPOINT must be the exec form running the broker module (no shell)"
    )
    assert cmd.exec_form() == ["serve"]


def test_runs_as_a_numeric_non_root_user(stages: list[Stage]) -> None:
    [user] = _final(stages).all("USER")
    uid, _, gid = user.args.partition(":")
    assert uid.isdecimal() and gid.isdecimal(), f"USER {user.args}: numeric uid:gid"
    assert int(uid) > 0 and int(gid) > 0


def test_settings_from_a_mounted_file_and_no_secret_in_the_image(stages: list[Stage]) -> None:
    env: dict[str, str] = {}
    for stage in stages:
        for instruction in stage.all("ENV"):
            for name, value in re.findall(r"(\w+)=(\S+)", instruction.args):
                env[name] = value
    final_env = dict(
        re.findall(r"(\w+)=(\S+)", " ".join(i.args for i in _final(stages).all("ENV")))
    )
    assert final_env["TASKLEASE_CONFIG"] == "/etc/tasklease/config/broker.toml"
    assert Path(final_env["TASKLEASE_CONFIG"]).is_absolute()
    assert final_env["PYTHONDONTWRITEBYTECODE"] == "1"  # the root filesystem is read-only
    args, _ = read_containerfile()
    for name in [*env, *args, *(i.args.split("=")[0] for s in stages for i in s.all("ARG"))]:
        assert not SECRET_NAME.search(name), f"{name}: no secret in ENV or ARG"
    text = CONTAINERFILE.read_text()
    assert not re.search(r"://[^/@\s]*:[^/@\s]+@", text), "a password in a URL"
    assert "PRIVATE KEY" not in text
