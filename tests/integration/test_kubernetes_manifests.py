"""The Kubernetes manifests (deploy/kubernetes): each overlay renders with `kubectl kustomize`,
validates offline against the Kubernetes schemas (`kubernetes-validate`, which bundles them),
and agrees with the broker itself: probe paths are routes it serves on the port it listens on,
its configuration and every BROKER_* variable load with its own settings loader, the policies
ConfigMap is the repository's policies and passes `broker policy check --strict` and `broker
policy test`, and no secret value is written anywhere."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml

from broker.settings import load_settings

ROOT = Path(__file__).resolve().parents[2]
KUSTOMIZE = ROOT / "deploy" / "kubernetes"
OVERLAYS = ("development", "production")
KUBERNETES_VERSION = "1.32"
BROKER = str(Path(sys.executable).with_name("broker"))
# `make kubectl` puts Debian's there where PATH has none new enough
KUBECTL = str(Path(sys.executable).with_name("kubectl"))


def render(overlay: str) -> list[dict[str, Any]]:
    kubectl = KUBECTL if os.access(KUBECTL, os.X_OK) else shutil.which("kubectl")
    assert kubectl, "kubectl is not installed (`make kubectl` installs it; make test runs it)"
    done = subprocess.run(
        [
            kubectl,
            "kustomize",
            "--load-restrictor",
            "LoadRestrictionsNone",  # the policies ConfigMap is made from policies/ itself
            str(KUSTOMIZE / "overlays" / overlay),
        ],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    return [doc for doc in yaml.safe_load_all(done.stdout) if doc]


def by_kind(docs: list[dict[str, Any]], kind: str, name: str | None = None) -> dict[str, Any]:
    [found] = [
        d
        for d in docs
        if d["kind"] == kind and (name is None or d["metadata"]["name"].startswith(name))
    ]
    return found


@pytest.fixture(scope="module", params=OVERLAYS)
def rendered(request: pytest.FixtureRequest) -> tuple[str, list[dict[str, Any]]]:
    return request.param, render(request.param)


def test_every_object_validates_against_the_kubernetes_schemas(rendered: Any) -> None:
    _, docs = rendered
    kinds = {d["kind"] for d in docs}
    assert {
        "Deployment",
        "Service",
        "ServiceAccount",
        "ConfigMap",
        "PodDisruptionBudget",
        "HorizontalPodAutoscaler",
        "NetworkPolicy",
        "Ingress",
    } <= kinds
    for doc in docs:
        kubernetes_validate.validate(doc, KUBERNETES_VERSION, strict=True)
    broken = by_kind(docs, "Deployment")
    broken = {**broken, "spec": {**broken["spec"], "replicaz": 2}}
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(broken, KUBERNETES_VERSION, strict=True)


def _container(docs: list[dict[str, Any]]) -> dict[str, Any]:
    [container] = by_kind(docs, "Deployment")["spec"]["template"]["spec"]["containers"]
    return container


def _config(docs: list[dict[str, Any]]) -> dict[str, Any]:
    return yaml.safe_load(by_kind(docs, "ConfigMap", "broker-config")["data"]["broker.yaml"])


def test_probes_and_port_are_the_brokers_own(rendered: Any) -> None:
    from broker.openapi import OPERATIONS

    _, docs = rendered
    container = _container(docs)
    served = {op.path for op in OPERATIONS if op.method == "get"}
    assert container["livenessProbe"]["httpGet"]["path"] == "/healthz" in served
    assert container["readinessProbe"]["httpGet"]["path"] == "/readyz" in served
    [port] = container["ports"]
    assert port["containerPort"] == _config(docs)["http"]["port"]
    security = container["securityContext"]
    assert security["readOnlyRootFilesystem"] is True
    assert security["allowPrivilegeEscalation"] is False
    assert security["capabilities"]["drop"] == ["ALL"]
    pod = by_kind(docs, "Deployment")["spec"]["template"]["spec"]
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["automountServiceAccountToken"] is False
    assert container["resources"]["requests"] and container["resources"]["limits"]


def test_the_configuration_and_every_variable_load_with_the_brokers_loader(
    rendered: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    overlay, docs = rendered
    config = tmp_path / "broker.yaml"
    config.write_text(yaml.safe_dump(_config(docs)))
    for key in list(os.environ):
        if key.startswith("BROKER_"):
            monkeypatch.delenv(key)
    for variable in _container(docs)["env"]:
        if "value" in variable:
            monkeypatch.setenv(variable["name"], variable["value"])
        else:  # a Secret's value: any non-empty string stands in for it here
            assert set(variable["valueFrom"]) == {"secretKeyRef"}, variable
            monkeypatch.setenv(variable["name"], "stand-in-" + variable["name"].lower())
    settings = load_settings(config)
    assert settings.http.port == _config(docs)["http"]["port"]
    assert str(settings.audit.file) == "/var/log/broker/audit.jsonl"  # BROKER_AUDIT__FILE
    if overlay == "production":
        assert settings.state.sentinel is not None and settings.state.min_replica_acks >= 1
        assert settings.http.workers >= 2
        assert by_kind(docs, "Deployment")["spec"]["replicas"] >= 3
        assert by_kind(docs, "HorizontalPodAutoscaler")["spec"]["minReplicas"] >= 3
    # Unknown keys are refused by the same loader (the check can fail).
    config.write_text(yaml.safe_dump({**_config(docs), "statte": {}}))
    with pytest.raises(ValueError):
        load_settings(config)


def test_the_policies_configmap_is_the_repositorys_and_passes_its_checks(
    rendered: Any, tmp_path: Path
) -> None:
    _, docs = rendered
    policies = by_kind(docs, "ConfigMap", "broker-policies")
    assert policies["metadata"]["name"] == "broker-policies"  # stable: hot reload, no rollout
    directory = tmp_path / "policies"
    directory.mkdir()
    for name, text in policies["data"].items():
        assert text == (ROOT / "policies" / name).read_text(), f"{name} drifted from policies/"
        (directory / name).write_text(text)
    shipped = {p.name for p in (ROOT / "policies").glob("*.yaml")}
    assert set(policies["data"]) == shipped
    shutil.copytree(ROOT / "policies" / "tests", directory / "tests")
    config = tmp_path / "broker.yaml"
    config.write_text(yaml.safe_dump(_config(docs)))
    env = {k: v for k, v in os.environ.items() if not k.startswith("BROKER_")}
    for args in (["check", "--strict", "--config", str(config)], ["test"]):
        done = subprocess.run(
            [BROKER, "policy", *args, "--dir", str(directory)],
            capture_output=True,
            text=True,
            env=env,
            timeout=120,
            check=False,
        )
        assert done.returncode == 0, done.stdout + done.stderr


def test_no_secret_value_is_written_anywhere(rendered: Any) -> None:
    _, docs = rendered
    assert not [d for d in docs if d["kind"] == "Secret"]
    for variable in _container(docs)["env"]:
        if any(word in variable["name"] for word in ("SECRET", "PASSWORD", "TOKEN")):
            assert "value" not in variable or variable["name"].endswith("_FILE"), variable
    config = _config(docs)
    assert config["state"].get("password_ref", "env:").startswith(("env:", "file:"))
    for backend in config["secret_backends"]:
        auth = backend.get("auth") or {}
        assert "token" not in auth and "secret_id" not in auth  # references only (..._ref)


def test_metrics_and_admin_routes_are_not_routed_from_outside(rendered: Any) -> None:
    _, docs = rendered
    paths = [
        p["path"]
        for rule in by_kind(docs, "Ingress")["spec"]["rules"]
        for p in rule["http"]["paths"]
    ]
    assert paths and not any(
        "/metrics".startswith(p.rstrip("/") or "/") or p.startswith(("/metrics", "/v1/admin"))
        for p in paths
    )
    policy = by_kind(docs, "NetworkPolicy")["spec"]
    assert policy["policyTypes"] == ["Ingress"] and policy["ingress"][0]["from"]
