"""The Kubernetes manifests (deploy/k8s), checked statically with the Go checker and the broker.

``deploy/k8scheck`` (Go, its own module) decodes every manifest strictly into its k8s.io/api
type (the SPIRE ClusterSPIFFEID into a typed struct of its own) and applies the security rules;
these tests build it, run it on the shipped manifests (which must pass) and on copies broken
one way each (which must fail with that problem: the checker is no no-op). Then the broker
itself reads what the ConfigMaps hold, as the pod would: broker.toml through
``broker.config`` (every key a real setting), the roles, the target catalog and the Cedar
policy set through the broker's own loaders; and the ports, paths, identity and image agree
across the Deployment, the Service, the NetworkPolicy, the ConfigMap, the OpenBao set-up and
the Containerfile.

Needs Go (1.26, a prerequisite: SPIRE is built with it); without it these tests fail.
"""

from __future__ import annotations

import os
import re
import shutil
import tomllib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from broker.adapters.config_files import read_policy_dir, read_targets_file
from broker.config import Settings, load_settings
from broker.core.oidc import parse_oidc_issuers
from broker.core.policy import WorkingHours
from broker.core.roles import parse_role_map
from broker.errors import ConfigurationError
from tests.deploy_files import (
    K8S_DIR,
    REPO_ROOT,
    build_k8scheck,
    go_binary,
    read_containerfile,
    run_k8scheck,
)

Objects = list[dict[str, Any]]


@pytest.fixture(scope="module")
def k8scheck(tmp_path_factory: pytest.TempPathFactory) -> Path:
    if go_binary() is None:
        # Go is a prerequisite of the project (SPIRE is built with it): never skipped.
        pytest.fail(
            "Go is not installed here (the checker of deploy/k8s is a Go program; README, "
            "Prerequisites)",
            pytrace=False,
        )
    return build_k8scheck(tmp_path_factory.mktemp("k8scheck"))


@pytest.fixture(scope="module")
def objects(k8scheck: Path) -> Objects:
    result = run_k8scheck(k8scheck, K8S_DIR, as_json=True)
    assert result.returncode == 0, result.stderr
    return result.decoded()


def _one(objects: Objects, kind: str, name: str) -> dict[str, Any]:
    found: list[dict[str, Any]] = [
        o["object"] for o in objects if o["kind"] == kind and o["name"] == name
    ]
    assert len(found) == 1, f"{kind} {name}: found {len(found)}"
    return found[0]


def _broker_container(objects: Objects) -> dict[str, Any]:
    spec = _one(objects, "Deployment", "tasklease")["spec"]["template"]["spec"]
    containers: list[dict[str, Any]] = [c for c in spec["containers"] if c["name"] == "broker"]
    assert len(containers) == 1
    return containers[0]


def _mounts(objects: Objects) -> dict[str, str]:
    """ConfigMap name -> where the broker container mounts it."""
    spec = _one(objects, "Deployment", "tasklease")["spec"]["template"]["spec"]
    volumes = {v["name"]: v for v in spec["volumes"]}
    mounts = {}
    for mount in _broker_container(objects)["volumeMounts"]:
        volume = volumes[mount["name"]]
        if "configMap" in volume:
            mounts[volume["configMap"]["name"]] = mount["mountPath"]
    return mounts


# ---- the checker


def test_shipped_manifests_pass(k8scheck: Path) -> None:
    result = run_k8scheck(k8scheck, K8S_DIR)
    assert result.returncode == 0, result.stderr
    assert "all checks passed" in result.stderr


def test_every_manifest_is_decoded(objects: Objects) -> None:
    kinds = sorted((o["kind"], o["name"]) for o in objects)
    assert kinds == [
        ("ClusterSPIFFEID", "tasklease-broker"),
        ("ConfigMap", "tasklease-config"),
        ("ConfigMap", "tasklease-policies"),
        ("Deployment", "tasklease"),
        ("Namespace", "tasklease"),
        ("NetworkPolicy", "tasklease"),
        ("PodDisruptionBudget", "tasklease"),
        ("Service", "tasklease"),
        ("ServiceAccount", "tasklease"),
    ]
    # The typed decoding kept what the YAML says (Quantity, IntOrString and friends).
    container = _broker_container(objects)
    assert container["resources"]["limits"]["memory"] == "512Mi"
    assert container["securityContext"]["capabilities"]["drop"] == ["ALL"]


def _replace(old: str, new: str, *, count: int = 1) -> Callable[[str], str]:
    def edit(text: str) -> str:
        assert text.count(old) >= count, f"{old!r} is not in the manifest any more"
        return text.replace(old, new)

    return edit


def _drop_block(start: str, end: str) -> Callable[[str], str]:
    """Remove the lines from the one containing ``start`` up to (without) the one with ``end``."""

    def edit(text: str) -> str:
        lines = text.splitlines(keepends=True)
        first = next(i for i, line in enumerate(lines) if start in line)
        last = next(i for i in range(first + 1, len(lines)) if end in lines[i])
        return "".join(lines[:first] + lines[last:])

    return edit


SECRET_WITH_DATA = """---
apiVersion: v1
kind: Secret
metadata:
  name: tasklease-redis
  namespace: tasklease
stringData:
  url: redis://redis.redis.svc:6379/0
"""

# (file, edit, what the checker must say). Each copy is broken in exactly one way.
BROKEN: dict[str, tuple[str, Callable[[str], str], str]] = {
    "misspelled field": (
        "deployment.yaml",
        _replace("readOnlyRootFilesystem: true", "readOnlyRootFilesytem: true"),
        'unknown field "spec.template.spec.containers[0].securityContext.readOnlyRootFilesytem"',
    ),
    "field in the wrong case": (
        "serviceaccount.yaml",
        _replace("automountServiceAccountToken: false", "AutomountServiceAccountToken: false"),
        'unknown field "AutomountServiceAccountToken"',
    ),
    "mistyped field": (
        "deployment.yaml",
        _replace("  replicas: 2", '  replicas: "two"'),
        "cannot unmarshal string into Go struct field DeploymentSpec.spec.replicas",
    ),
    "duplicate key": (
        "poddisruptionbudget.yaml",
        _replace("  maxUnavailable: 1\n", "  maxUnavailable: 1\n  maxUnavailable: 2\n"),
        'key "maxUnavailable" already set in map',
    ),
    "unknown kind": (
        "service.yaml",
        _replace("kind: Service", "kind: Servic"),
        'no kind "Servic" is registered',
    ),
    "misspelled ClusterSPIFFEID field": (
        "clusterspiffeid.yaml",
        _replace("  spiffeIDTemplate:", "  spiffeIdTemplate:"),
        'unknown field "spec.spiffeIdTemplate"',
    ),
    "runAsNonRoot false": (
        "deployment.yaml",
        _replace("runAsNonRoot: true", "runAsNonRoot: false", count=2),
        "runAsNonRoot must be true",
    ),
    "runs as root": (
        "deployment.yaml",
        _replace("runAsUser: 10001", "runAsUser: 0", count=2),
        "runAsUser must be a non-zero numeric uid",
    ),
    "writable root filesystem": (
        "deployment.yaml",
        _replace("readOnlyRootFilesystem: true", "readOnlyRootFilesystem: false"),
        "readOnlyRootFilesystem must be true",
    ),
    "privilege escalation": (
        "deployment.yaml",
        _replace("allowPrivilegeEscalation: false", "allowPrivilegeEscalation: true"),
        "allowPrivilegeEscalation must be false",
    ),
    "capabilities kept": (
        "deployment.yaml",
        _replace('drop: ["ALL"]', 'drop: ["NET_RAW"]'),
        "capabilities.drop must contain ALL",
    ),
    "no seccomp profile": (
        "deployment.yaml",
        _replace("type: RuntimeDefault", "type: Unconfined", count=2),
        "seccompProfile must be RuntimeDefault",
    ),
    "missing readiness probe": (
        "deployment.yaml",
        _drop_block("readinessProbe:", "lifecycle:"),
        "container broker: no readinessProbe",
    ),
    "probe over plain HTTP": (
        "deployment.yaml",
        _replace("scheme: HTTPS", "scheme: HTTP", count=3),
        "livenessProbe scheme must be HTTPS",
    ),
    "no memory limit": (
        "deployment.yaml",
        _replace("              memory: 512Mi\n", ""),
        "resources.limits.memory is not set",
    ),
    "one replica": (
        "deployment.yaml",
        _replace("  replicas: 2", "  replicas: 1"),
        "replicas 1: at least 2",
    ),
    "latest image": (
        "deployment.yaml",
        _replace("image: tasklease:0.1.0", "image: tasklease:latest"),
        ":latest is not a version",
    ),
    "Secret with data": (
        "serviceaccount.yaml",
        lambda text: text + SECRET_WITH_DATA,
        "Secret tasklease/tasklease-redis: a Secret with data",
    ),
    "password in the ConfigMap": (
        "configmap.yaml",
        _replace("    [redis]\n", '    [redis]\n    url = "redis://:hunter2@redis:6379/0"\n'),
        "data[broker.toml] has a password in a URL",
    ),
    "literal secret in the environment": (
        "deployment.yaml",
        _replace(
            "            - name: TASKLEASE_SENTINEL_PASSWORD\n"
            "              valueFrom:\n"
            "                secretKeyRef:\n"
            "                  name: tasklease-redis\n"
            "                  key: sentinel-password\n",
            "            - name: TASKLEASE_SENTINEL_PASSWORD\n              value: hunter2\n",
        ),
        "env TASKLEASE_SENTINEL_PASSWORD has a literal value",
    ),
    "egress anywhere": (
        "networkpolicy.yaml",
        lambda text: text + "    - ports:\n        - protocol: TCP\n          port: 443\n",
        "egress[3] allows every destination",
    ),
    "Service port that is no container port": (
        "service.yaml",
        _replace("targetPort: https", "targetPort: 9443"),
        "targetPort 9443 is no container port",
    ),
    "ClusterSPIFFEID for every pod": (
        "clusterspiffeid.yaml",
        _drop_block("  podSelector:", "  workloadSelectorTemplates:"),
        "spec.podSelector is empty: it would select every pod",
    ),
    "Workload API without the CSI driver": (
        "deployment.yaml",
        _replace("driver: csi.spiffe.io", "driver: example.com/other"),
        "no csi.spiffe.io volume",
    ),
    "manifest left out of the kustomization": (
        "kustomization.yaml",
        _replace("  - networkpolicy.yaml\n", ""),
        "networkpolicy.yaml: not listed in kustomization.yaml resources",
    ),
}


@pytest.mark.parametrize("case", sorted(BROKEN))
def test_broken_copies_fail(case: str, k8scheck: Path, tmp_path: Path) -> None:
    file, edit, expected = BROKEN[case]
    broken = tmp_path / "k8s"
    shutil.copytree(K8S_DIR, broken)
    path = broken / file
    path.write_text(edit(path.read_text()))
    result = run_k8scheck(k8scheck, broken)
    assert result.returncode == 1, f"{case}: the checker passed a broken copy\n{result.stderr}"
    assert expected in result.stderr, result.stderr


def test_unreadable_directory_is_a_usage_error(k8scheck: Path, tmp_path: Path) -> None:
    result = run_k8scheck(k8scheck, tmp_path / "missing")
    assert result.returncode == 2


# ---- what the broker reads from the ConfigMaps


@pytest.fixture
def mounted(objects: Objects, tmp_path: Path) -> dict[str, Path]:
    """The ConfigMaps written out as the pod sees them: ConfigMap name -> directory."""
    dirs = {}
    for name in _mounts(objects):
        directory = tmp_path / name
        directory.mkdir()
        for key, value in _one(objects, "ConfigMap", name)["data"].items():
            (directory / key).write_text(value, encoding="utf-8")
        dirs[name] = directory
    return dirs


@pytest.fixture
def pod_settings(
    objects: Objects, mounted: dict[str, Path], monkeypatch: pytest.MonkeyPatch
) -> Settings:
    """The broker's settings as the pod would load them: the mounted broker.toml, the
    Deployment's literal TASKLEASE_* variables, and stand-ins for the ones from Secrets."""
    for name in list(os.environ):
        if name.startswith("TASKLEASE_"):
            monkeypatch.delenv(name)
    container = _broker_container(objects)
    for env in container["env"]:
        if env["name"].startswith("TASKLEASE_") and "value" in env:
            monkeypatch.setenv(env["name"], env["value"])
        elif env["name"].startswith("TASKLEASE_"):
            monkeypatch.setenv(env["name"], "redis://:stand-in@/0")
    config_dir = _mounts(objects)["tasklease-config"]
    broker_toml = os.environ["TASKLEASE_CONFIG"]
    assert broker_toml.startswith(config_dir + "/")
    monkeypatch.setenv(
        "TASKLEASE_CONFIG",
        str(mounted["tasklease-config"] / broker_toml.removeprefix(config_dir + "/")),
    )
    return load_settings()


def _in_mount(objects: Objects, mounted: dict[str, Path], path: Path) -> Path:
    """Where a path the pod uses lies in the written-out ConfigMaps."""
    for name, mount_path in _mounts(objects).items():
        if path == Path(mount_path):
            return mounted[name]
        if path.is_relative_to(mount_path):
            return mounted[name] / path.relative_to(mount_path)
    raise AssertionError(f"{path} is in no mounted ConfigMap")


def test_broker_toml_loads_with_every_key_a_setting(
    pod_settings: Settings, mounted: dict[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    settings = pod_settings
    # Every section forbids unknown keys, so a load proves each key is a real setting; and a
    # bogus one really is refused.
    broker_toml = mounted["tasklease-config"] / "broker.toml"
    raw = tomllib.loads(broker_toml.read_text())
    assert {"server", "spiffe", "vault", "redis", "audit", "policy"} <= set(raw)
    bogus = broker_toml.with_name("bogus.toml")
    bogus.write_text(broker_toml.read_text().replace("[server]\n", "[server]\nhots = 'x'\n"))
    monkeypatch.setenv("TASKLEASE_CONFIG", str(bogus))
    with pytest.raises(ConfigurationError, match=r"server\.hots"):
        load_settings()

    assert settings.server.host == "0.0.0.0"  # reachable by the Service and the probes
    assert settings.vault.auth_method == "jwt-svid"  # no OpenBao secret on the broker
    assert settings.vault.token is None
    assert settings.vault.addr.startswith("https://")
    assert settings.spiffe.workload_api_socket == ""  # SPIFFE_ENDPOINT_SOCKET, from the CSI
    assert not settings.redis.insecure_allow_degraded_durability
    assert not settings.audit.insecure_allow_no_durable_sink
    # Behind Sentinel the acknowledgement a failover keeps is `replicas` (README, Durability).
    assert settings.redis.sentinels
    assert settings.redis.durability == "replicas"
    # No secret in the file: the Redis URL and the Sentinels' password come from the Secret.
    assert "url" not in raw["redis"]
    assert "token" not in raw["vault"]


def test_secrets_come_from_a_secret(objects: Objects, pod_settings: Settings) -> None:
    env = {e["name"]: e for e in _broker_container(objects)["env"]}
    for name in ("TASKLEASE_REDIS__URL", pod_settings.redis.sentinel_password_env):
        assert "secretKeyRef" in env[name].get("valueFrom", {}), name
    assert env["SPIFFE_ENDPOINT_SOCKET"]["value"].startswith("unix:///")


def test_paths_point_into_the_mounted_configmaps(
    objects: Objects, mounted: dict[str, Path], pod_settings: Settings
) -> None:
    settings = pod_settings
    for path in (settings.identities_file, settings.targets_file):
        assert path.is_absolute()
        assert _in_mount(objects, mounted, path).is_file(), path
    policy_dir = _in_mount(objects, mounted, settings.policy_dir)
    assert policy_dir == mounted["tasklease-policies"]
    # A whole-directory mount (no subPath), so reloads see the files change.
    for mount in _broker_container(objects)["volumeMounts"]:
        assert "subPath" not in mount


def test_identities_targets_and_policies_load_with_the_broker_loaders(
    objects: Objects, mounted: dict[str, Path], pod_settings: Settings
) -> None:
    settings = pod_settings
    identities = tomllib.loads(_in_mount(objects, mounted, settings.identities_file).read_text())
    roles = parse_role_map({k: v for k, v in identities.items() if k != "oidc_issuer"})
    parse_oidc_issuers(identities.get("oidc_issuer", []))
    assert roles.workload_rules
    for rule in roles.workload_rules:
        assert str(rule.pattern).startswith(f"spiffe://{settings.spiffe.trust_domain}/"), rule
    catalog = read_targets_file(_in_mount(objects, mounted, settings.targets_file)).catalog
    assert catalog
    policy = settings.policy
    hours = WorkingHours(
        start_hour_utc=policy.working_hours_start_utc,
        end_hour_utc=policy.working_hours_end_utc,
        days=frozenset(policy.working_days),
    )
    engine = read_policy_dir(_in_mount(objects, mounted, settings.policy_dir)).engine(hours)
    assert engine.policies


def test_policies_configmap_is_the_default_policy_set(objects: Objects) -> None:
    shipped = _one(objects, "ConfigMap", "tasklease-policies")["data"]
    source = REPO_ROOT / "config" / "policies"
    default = {
        p.name: p.read_text(encoding="utf-8")
        for p in sorted(source.iterdir())
        if p.is_file() and p.suffix in {".cedar", ".cedarschema"}
    }
    assert sorted(shipped) == sorted(default), (
        "deploy/k8s/policies-configmap.yaml lists other files"
    )
    for name, text in default.items():
        assert shipped[name] == text, (
            f"{name} in deploy/k8s/policies-configmap.yaml differs from config/policies/{name}"
        )


# ---- agreement across objects and files


def test_the_broker_port_agrees_everywhere(objects: Objects, pod_settings: Settings) -> None:
    port = pod_settings.server.port
    container = _broker_container(objects)
    by_name = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert list(by_name.values()) == [port]

    def resolve(value: int | str) -> int:
        return by_name[value] if isinstance(value, str) else value

    for probe in ("startupProbe", "livenessProbe", "readinessProbe"):
        assert resolve(container[probe]["httpGet"]["port"]) == port, probe
    [service_port] = _one(objects, "Service", "tasklease")["spec"]["ports"]
    assert service_port["port"] == port
    assert resolve(service_port["targetPort"]) == port
    ingress = _one(objects, "NetworkPolicy", "tasklease")["spec"]["ingress"]
    assert [resolve(p["port"]) for rule in ingress for p in rule["ports"]] == [port]


def test_the_broker_spiffe_id_is_the_one_openbao_trusts(
    objects: Objects, pod_settings: Settings
) -> None:
    template = _one(objects, "ClusterSPIFFEID", "tasklease-broker")["spec"]["spiffeIDTemplate"]
    setup = tomllib.loads((REPO_ROOT / "config" / "dev" / "openbao" / "setup.toml").read_text())
    vault = pod_settings.vault
    role_path = f"auth/{vault.jwt_mount}/role/{vault.jwt_role}"
    [role] = [step["data"] for step in setup["step"] if step["path"] == role_path]
    assert template.replace("{{ .TrustDomain }}", "{trust_domain}") == role["bound_subject"]
    assert role["bound_audiences"] == [vault.jwt_audience]


def test_image_and_user_match_the_containerfile(objects: Objects) -> None:
    deployment = _one(objects, "Deployment", "tasklease")
    container = _broker_container(objects)
    version = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())["project"]["version"]
    assert container["image"] == f"tasklease:{version}"
    _, stages = read_containerfile()
    final = stages[-1]
    [user] = final.all("USER")
    uid, _, gid = user.args.partition(":")
    security = deployment["spec"]["template"]["spec"]["securityContext"]
    assert (security["runAsUser"], security["runAsGroup"]) == (int(uid), int(gid))
    env = dict(re.findall(r"(\w+)=(\S+)", " ".join(i.args for i in final.all("ENV"))))
    deployment_env = {e["name"]: e.get("value") for e in container["env"]}
    assert deployment_env["TASKLEASE_CONFIG"] == env["TASKLEASE_CONFIG"]
    [entrypoint] = final.all("ENTRYPOINT")
    assert container.get("command") is None  # the image's `python -m broker`
    assert (entrypoint.exec_form() or [])[-2:] == ["-m", "broker"]
    assert container["args"] == ["serve"]
