"""The container image and the Kubernetes manifests, checked offline (SPEC §9).

Every manifest is validated against the Kubernetes JSON schemas bundled in the
`kubernetes-validate` wheel (strict: unknown fields fail) for pinned Kubernetes
versions; KEDA's objects, which have no bundled schema, against a structural schema
of their own here. The rest ties the manifests to the code: probes hit routes the
apps really serve, grace periods cover the drain, selectors match pod labels,
Services reach real container ports, env names are ones common/config.py reads, one
image everywhere, args the `fanout` CLI accepts, and a non-root, pinned Dockerfile.
No network, no cluster: `kubectl kustomize` is used when present, else skipped.
"""

from __future__ import annotations

import copy
import json
import re
import shlex
import shutil
import subprocess
import tomllib
from collections.abc import Iterator
from functools import cache
from pathlib import Path
from typing import Any, cast
from urllib.parse import urlsplit

import jsonschema  # type: ignore[import-untyped]
import kubernetes_validate  # type: ignore[import-untyped]
import pytest
import yaml  # type: ignore[import-untyped]

from common.cli import _parser
from common.config import ConfigError, Settings
from common.transport.keys import CONSUMER_GROUP, Keys

ROOT = Path(__file__).resolve().parents[2]
K8S = ROOT / "k8s"
# The oldest Kubernetes the manifests support and the newest whose schemas ship with
# kubernetes-validate==1.37.0 (pinned in the dev extra).
KUBERNETES_VERSIONS = ("1.31", "1.37")
# Files in k8s/ deliberately left out of the base kustomization (k8s/README.md).
NOT_IN_BASE = {"secret.example.yaml", "ingress.example.yaml"}
PROBE_ROLES = ("node", "worker")
SECRET = "s" * 32

Doc = dict[str, Any]
WORKLOAD_KINDS = ("Deployment", "StatefulSet", "Job")


# -- loading ---------------------------------------------------------------------------


@cache
def _files() -> dict[str, tuple[Doc, ...]]:
    """Every YAML document under k8s/, by path relative to k8s/."""
    found: dict[str, tuple[Doc, ...]] = {}
    for path in sorted(K8S.rglob("*.yaml")) + sorted(K8S.rglob("*.yml")):
        docs = tuple(d for d in yaml.safe_load_all(path.read_text()) if d)
        found[path.relative_to(K8S).as_posix()] = docs
    return found


def _objects(*files: str) -> list[Doc]:
    """The Kubernetes objects (not kustomizations) of the given files, or of all files."""
    chosen = files or tuple(_files())
    return [d for f in chosen for d in _files()[f] if d.get("kind") != "Kustomization"]


def _kustomization(folder: str) -> Doc:
    docs = _files()[f"{folder}/kustomization.yaml" if folder else "kustomization.yaml"]
    assert len(docs) == 1
    return docs[0]


@cache
def _rendered(folder: str = "") -> tuple[Doc, ...]:
    """A minimal `kustomize build` of what this repository's kustomizations use:
    resources (files and folders) and the image override (generated ConfigMaps are
    left out: no check depends on them). Any other feature fails loudly, so that it
    gets a matching check here."""
    k = _kustomization(folder)
    unsupported = set(k) - {"apiVersion", "kind", "resources", "images", "configMapGenerator"}
    assert not unsupported, f"teach tests/deploy/test_k8s.py::_rendered about {unsupported}"
    docs: list[Doc] = []
    for entry in k.get("resources", []):
        rel = f"{folder}/{entry}" if folder else entry
        if (K8S / rel).is_dir():
            docs.extend(_rendered(rel))
        else:
            docs.extend(copy.deepcopy(_objects(rel)))
    for override in k.get("images", []):
        for container in (c for d in docs for c in _containers(d)):
            name, _, _ = container["image"].partition(":")
            if name == override["name"]:
                tag = override.get("newTag", container["image"].partition(":")[2])
                container["image"] = f"{override.get('newName', name)}:{tag}"
    return tuple(docs)


def _named(docs: list[Doc] | tuple[Doc, ...], kind: str, name: str | None = None) -> list[Doc]:
    return [
        d for d in docs if d["kind"] == kind and (name is None or d["metadata"]["name"] == name)
    ]


def _one(docs: list[Doc] | tuple[Doc, ...], kind: str, name: str | None = None) -> Doc:
    found = _named(docs, kind, name)
    assert len(found) == 1, f"expected one {kind} {name or ''}, found {len(found)}"
    return found[0]


def _pod_template(doc: Doc) -> Doc:
    if doc["kind"] in WORKLOAD_KINDS:
        return cast(Doc, doc["spec"]["template"])
    return {}


def _containers(doc: Doc) -> list[Doc]:
    spec = _pod_template(doc).get("spec", {})
    return [*spec.get("initContainers", []), *spec.get("containers", [])]


def _workloads(docs: list[Doc] | tuple[Doc, ...] | None = None) -> list[Doc]:
    return [d for d in (docs if docs is not None else _objects()) if d["kind"] in WORKLOAD_KINDS]


def _fanout_containers() -> Iterator[tuple[Doc, Doc]]:
    """(workload, container) for every container that runs the fanout image."""
    for workload in _workloads(_rendered()):
        for container in _containers(workload):
            yield workload, container


def _selects(selector: dict[str, str], labels: dict[str, str]) -> bool:
    return all(labels.get(key) == value for key, value in selector.items())


# -- what the code says ----------------------------------------------------------------


class _RecordingEnv(dict[str, str]):
    """An environment that remembers every variable Settings.from_env looked up."""

    def __init__(self) -> None:
        super().__init__()
        self.asked: set[str] = set()

    def get(self, key: str, default: Any = None) -> Any:
        self.asked.add(key)
        return super().get(key, default)


@cache
def _config_names() -> frozenset[str]:
    env = _RecordingEnv()
    Settings.from_env(env)
    assert len(env.asked) > 20
    return frozenset(env.asked)


@cache
def _routes(role: str) -> frozenset[str]:
    """GET routes of a node app or of a worker's health app, from their real routers."""
    if role == "node":
        from node.app import create_app

        app = create_app(Settings.from_env({"FANOUT_JWT_SECRET": SECRET}))
    else:
        from worker.health import health_app

        # The app only keeps these for its handlers; building the router needs neither.
        app = health_app(cast(Any, None), cast(Any, None))
    return frozenset(
        route.resource.canonical
        for route in app.router.routes()
        if route.method == "GET" and route.resource is not None
    )


def _config_map() -> dict[str, str]:
    return cast(dict[str, str], _one(_rendered(), "ConfigMap", "fanout-config")["data"])


def _example_secret(name: str) -> dict[str, str]:
    return cast(dict[str, str], _one(_objects("secret.example.yaml"), "Secret", name)["stringData"])


def _settings() -> Settings:
    """The settings the pods get from the ConfigMap (a valid JWT secret stands in for
    the Secret, which the repository does not ship)."""
    return Settings.from_env({**_config_map(), "FANOUT_JWT_SECRET": SECRET})


def _cli(args: list[str]) -> Any:
    try:
        return _parser().parse_args(args)
    except SystemExit:
        pytest.fail(f"`fanout {shlex.join(args)}` is not a valid fanout command line")


def _container_port(container: Doc, port: int | str) -> int:
    """The number of a container port given by name or number (it must be declared)."""
    for declared in container.get("ports", []):
        if port in (declared.get("name"), declared["containerPort"]):
            return int(declared["containerPort"])
    raise AssertionError(f"container {container['name']} declares no port {port!r}")


def _quantity(value: str | int) -> float:
    units = {"m": 1e-3, "Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "k": 1e3, "M": 1e6, "G": 1e9}
    text = str(value)
    for suffix, factor in sorted(units.items(), key=lambda u: -len(u[0])):
        if text.endswith(suffix):
            return float(text[: -len(suffix)]) * factor
    return float(text)


# -- the Kubernetes schemas --------------------------------------------------------------


def _schema_cases() -> Iterator[Any]:
    for name, docs in _files().items():
        if any(d.get("kind") != "Kustomization" and "keda.sh" not in d["apiVersion"] for d in docs):
            for version in KUBERNETES_VERSIONS:
                yield pytest.param(name, version, id=f"{name}@{version}")


@pytest.mark.parametrize(("name", "version"), list(_schema_cases()))
def test_manifest_validates_against_the_kubernetes_schema(name: str, version: str) -> None:
    for doc in _objects(name):
        if doc["apiVersion"].startswith("keda.sh/"):
            continue  # a CRD: no bundled schema (see test_keda_objects_are_well_formed)
        try:
            kubernetes_validate.validate(doc, version, strict=True)
        except kubernetes_validate.ValidationError as exc:
            where = ".".join(str(p) for p in exc.path)
            pytest.fail(f"{name}: {doc['kind']}/{doc['metadata']['name']} {where}: {exc.message}")


def test_schemas_are_bundled_and_strict() -> None:
    available = {v.rsplit(".", 1)[0] for v in kubernetes_validate.utils.all_versions()}
    assert set(KUBERNETES_VERSIONS) <= available
    broken = copy.deepcopy(_one(_objects("node.yaml"), "Deployment"))
    broken["spec"]["template"]["spec"]["containers"][0]["imagePullPolcy"] = "Always"
    with pytest.raises(kubernetes_validate.ValidationError, match="imagePullPolcy"):
        kubernetes_validate.validate(broken, KUBERNETES_VERSIONS[0], strict=True)


# KEDA's CRDs are not bundled: a structural schema of the fields used here (keda.sh
# v1alpha1, KEDA 2.12+). Unknown fields fail, as a typo would be ignored by KEDA.
_INT = {"type": "integer", "minimum": 0}
_STR_MAP = {"type": "object", "additionalProperties": {"type": "string"}}
_HPA_RULES = {
    "type": "object",
    "additionalProperties": False,
    "properties": {
        "stabilizationWindowSeconds": {"type": "integer", "minimum": 0, "maximum": 3600},
        "selectPolicy": {"enum": ["Max", "Min", "Disabled"]},
        "policies": {
            "type": "array",
            "minItems": 1,
            "items": {
                "type": "object",
                "additionalProperties": False,
                "required": ["type", "value", "periodSeconds"],
                "properties": {
                    "type": {"enum": ["Pods", "Percent"]},
                    "value": {"type": "integer", "minimum": 1},
                    "periodSeconds": {"type": "integer", "minimum": 1, "maximum": 1800},
                },
            },
        },
    },
}
_METADATA = {
    "type": "object",
    "required": ["name"],
    "additionalProperties": False,
    "properties": {"name": {"type": "string"}, "labels": _STR_MAP, "annotations": _STR_MAP},
}
SCALED_OBJECT_SCHEMA = {
    "type": "object",
    "additionalProperties": False,
    "required": ["apiVersion", "kind", "metadata", "spec"],
    "properties": {
        "apiVersion": {"const": "keda.sh/v1alpha1"},
        "kind": {"const": "ScaledObject"},
        "metadata": _METADATA,
        "spec": {
            "type": "object",
            "additionalProperties": False,
            "required": ["scaleTargetRef", "triggers"],
            "properties": {
                "scaleTargetRef": {
                    "type": "object",
                    "additionalProperties": False,
                    "required": ["name"],
                    "properties": {
                        "apiVersion": {"type": "string"},
                        "kind": {"type": "string"},
                        "name": {"type": "string"},
                        "envSourceContainerName": {"type": "string"},
                    },
                },
                "pollingInterval": _INT,
                "cooldownPeriod": _INT,
                "initialCooldownPeriod": _INT,
                "idleReplicaCount": _INT,
                "minReplicaCount": _INT,
                "maxReplicaCount": _INT,
                "fallback": {
                    "type": "object",
                    "additionalProperties": False,
                    "required": ["failureThreshold", "replicas"],
                    "properties": {"failureThreshold": _INT, "replicas": _INT},
                },
                "advanced": {
                    "type": "object",
                    "additionalProperties": False,
                    "properties": {
                        "restoreToOriginalReplicaCount": {"type": "boolean"},
                        "horizontalPodAutoscalerConfig": {
                            "type": "object",
                            "additionalProperties": False,
                            "properties": {
                                "name": {"type": "string"},
                                "behavior": {
                                    "type": "object",
                                    "additionalProperties": False,
                                    "properties": {"scaleUp": _HPA_RULES, "scaleDown": _HPA_RULES},
                                },
                            },
                        },
                    },
                },
                "triggers": {
                    "type": "array",
                    "minItems": 1,
                    "items": {
                        "type": "object",
                        "additionalProperties": False,
                        "required": ["type", "metadata"],
                        "properties": {
                            "type": {"type": "string"},
                            "name": {
                                "type": "string",
                                "pattern": "^[a-z0-9]([-a-z0-9]*[a-z0-9])?$",
                            },
                            # KEDA reads trigger metadata as strings: a bare 25 fails.
                            "metadata": _STR_MAP,
                            "metricType": {"enum": ["AverageValue", "Value", "Utilization"]},
                            "useCachedMetrics": {"type": "boolean"},
                            "authenticationRef": {
                                "type": "object",
                                "additionalProperties": False,
                                "required": ["name"],
                                "properties": {
                                    "name": {"type": "string"},
                                    "kind": {
                                        "enum": [
                                            "TriggerAuthentication",
                                            "ClusterTriggerAuthentication",
                                        ]
                                    },
                                },
                            },
                        },
                    },
                },
            },
        },
    },
}
TRIGGER_AUTHENTICATION_SCHEMA = {
    "type": "object",
    "additionalProperties": False,
    "required": ["apiVersion", "kind", "metadata", "spec"],
    "properties": {
        "apiVersion": {"const": "keda.sh/v1alpha1"},
        "kind": {"const": "TriggerAuthentication"},
        "metadata": _METADATA,
        "spec": {
            "type": "object",
            "additionalProperties": False,
            "required": ["secretTargetRef"],
            "properties": {
                "secretTargetRef": {
                    "type": "array",
                    "minItems": 1,
                    "items": {
                        "type": "object",
                        "additionalProperties": False,
                        "required": ["parameter", "name", "key"],
                        "properties": {
                            "parameter": {"type": "string"},
                            "name": {"type": "string"},
                            "key": {"type": "string"},
                        },
                    },
                }
            },
        },
    },
}
# Trigger metadata each scaler type understands (KEDA docs), and the ones it requires.
KEDA_TRIGGER_METADATA = {
    "redis-streams": (
        {"stream", "consumerGroup"},
        {
            "stream", "consumerGroup", "lagCount", "activationLagCount", "pendingEntriesCount",
            "streamLength", "address", "addressFromEnv", "host", "hostFromEnv", "port",
            "portFromEnv", "usernameFromEnv", "passwordFromEnv", "databaseIndex", "enableTLS",
            "unsafeSsl",
        },
    ),
    "prometheus": (
        {"serverAddress", "query", "threshold"},
        {
            "serverAddress", "query", "threshold", "activationThreshold", "namespace",
            "ignoreNullValues", "unsafeSsl", "customHeaders", "queryParameters", "authModes",
        },
    ),
}  # fmt: skip
KEDA_AUTH_PARAMETERS = {"address", "host", "port", "username", "password"}


def _keda_objects() -> list[tuple[str, Doc]]:
    return [
        (name, doc)
        for name, docs in _files().items()
        for doc in docs
        if doc.get("apiVersion", "").startswith("keda.sh/")
    ]


def test_keda_objects_are_well_formed() -> None:
    schemas = {
        "ScaledObject": SCALED_OBJECT_SCHEMA,
        "TriggerAuthentication": TRIGGER_AUTHENTICATION_SCHEMA,
    }
    found = _keda_objects()
    assert {doc["kind"] for _, doc in found} == set(schemas)
    for name, doc in found:
        try:
            jsonschema.Draft202012Validator(schemas[doc["kind"]]).validate(doc)
        except jsonschema.ValidationError as exc:
            where = ".".join(str(p) for p in exc.path)
            pytest.fail(f"{name}: {doc['kind']} {where}: {exc.message}")
        if doc["kind"] != "ScaledObject":
            continue
        triggers = doc["spec"]["triggers"]
        assert len({t.get("name") for t in triggers}) == len(triggers), "trigger names repeat"
        for trigger in triggers:
            required, known = KEDA_TRIGGER_METADATA[trigger["type"]]
            keys = set(trigger["metadata"])
            assert required <= keys, f"{name}: {trigger['type']} lacks {required - keys}"
            assert keys <= known, f"{name}: unknown {trigger['type']} metadata {keys - known}"
            for key in keys & {"lagCount", "activationLagCount", "pendingEntriesCount"}:
                assert trigger["metadata"][key].isdigit(), f"{name}: {key} is not a count"


def test_autoscalers_target_the_worker_deployment_within_the_partitions() -> None:
    worker = _one(_objects("worker.yaml"), "Deployment")
    partitions = _settings().partitions
    scalers = [doc for _, doc in _keda_objects() if doc["kind"] == "ScaledObject"]
    hpas = _named(_objects(), "HorizontalPodAutoscaler")
    assert scalers and hpas
    for scaler in scalers + hpas:
        ref = scaler["spec"]["scaleTargetRef"]
        assert ref["name"] == worker["metadata"]["name"]
        assert (ref.get("kind", "Deployment"), ref.get("apiVersion", "apps/v1")) == (
            "Deployment",
            "apps/v1",
        )
        low = scaler["spec"].get("minReplicaCount", scaler["spec"].get("minReplicas"))
        high = scaler["spec"].get("maxReplicaCount", scaler["spec"].get("maxReplicas"))
        # At least one worker: it also sweeps expired sessions and reclaims dead
        # workers' entries. At most one per partition: more would own nothing.
        assert 1 <= low <= high <= partitions, scaler["metadata"]["name"]
    # With an autoscaler owning the count, `replicas` in the manifest would make every
    # `kubectl apply` reset it.
    assert "replicas" not in worker["spec"]


def test_scaled_object_reads_every_partition_stream_of_the_workers_group() -> None:
    scaled = _one(_rendered(), "ScaledObject")
    settings = _settings()
    keys = Keys(settings.namespace)
    streams = [t["metadata"]["stream"] for t in scaled["spec"]["triggers"]]
    expected = [keys.partition_stream(p) for p in range(settings.partitions)]
    assert sorted(streams) == sorted(expected), "one trigger per partition stream"
    auth = {d["metadata"]["name"]: d for d in _named(_rendered(), "TriggerAuthentication")}
    secret = _example_secret("fanout-keda-redis")
    for trigger in scaled["spec"]["triggers"]:
        assert trigger["type"] == "redis-streams"
        assert trigger["metadata"]["consumerGroup"] == CONSUMER_GROUP
        assert int(trigger["metadata"]["lagCount"]) > 0
        # KEDA runs in its own namespace: Redis comes from the TriggerAuthentication,
        # never from a literal short Service name that only resolves in ours.
        assert not {"address", "host"} & set(trigger["metadata"])
        ref = auth[trigger["authenticationRef"]["name"]]
        for target in ref["spec"]["secretTargetRef"]:
            assert target["parameter"] in KEDA_AUTH_PARAMETERS
            assert target["name"] == "fanout-keda-redis" and target["key"] in secret
    # KEDA reads a trigger's *FromEnv settings from the first container: keep it ours.
    worker = _one(_rendered(), "Deployment", "fanout-worker")
    assert _containers(worker)[0]["args"][0] == "worker"


def test_prometheus_scaling_counts_each_partition_once() -> None:
    from node.metrics import NodeMetrics

    exported = {metric.name for metric in NodeMetrics().registry.collect()}
    assert "fanout_queue_depth" in exported
    hpa = _one(_objects("alternatives/worker-hpa.yaml"), "HorizontalPodAutoscaler")
    assert hpa["spec"]["metrics"][0]["external"]["metric"]["name"] == "fanout_queue_depth"
    # Every node and worker exports the cluster's depth per partition: a bare sum()
    # would count each partition once per pod.
    scaled = _one(_objects("alternatives/worker-scaledobject-prometheus.yaml"), "ScaledObject")
    query = scaled["spec"]["triggers"][0]["metadata"]["query"]
    assert re.fullmatch(r"sum\(max by \(partition\) \(fanout_queue_depth(\{.*\})?\)\)", query)
    hpa_text = (K8S / "alternatives/worker-hpa.yaml").read_text()
    assert "max by (namespace, partition)" in hpa_text


# -- probes, ports, drain -------------------------------------------------------------


def test_probes_hit_endpoints_the_code_serves() -> None:
    checked = set()
    for workload, container in _fanout_containers():
        args = _cli(container["args"])
        if args.command not in PROBE_ROLES:
            assert not any(k.endswith("Probe") for k in container), workload["metadata"]["name"]
            continue
        listening = args.port
        probes = {k: v for k, v in container.items() if k.endswith("Probe")}
        assert probes["readinessProbe"]["httpGet"]["path"] == "/readyz"
        assert probes["livenessProbe"]["httpGet"]["path"] == "/healthz"
        for kind, probe in probes.items():
            get = probe["httpGet"]
            assert get["path"] in _routes(args.command), f"{args.command} {kind}: {get['path']}"
            assert _container_port(container, get["port"]) == listening, (
                f"{args.command} {kind} probes port {get['port']}, the process listens on "
                f"{listening}"
            )
        annotations = _pod_template(workload)["metadata"].get("annotations", {})
        if annotations.get("prometheus.io/scrape") == "true":
            assert int(annotations["prometheus.io/port"]) == listening
            assert annotations["prometheus.io/path"] in _routes(args.command)
        checked.add(args.command)
    assert checked == set(PROBE_ROLES)


def test_node_listens_where_the_service_and_probes_reach_it() -> None:
    for _, container in _fanout_containers():
        args = _cli(container["args"])
        if args.command == "node":
            # The CLI's default host, 127.0.0.1, is unreachable from outside the pod.
            assert args.host == "0.0.0.0"
            assert _container_port(container, args.port) == args.port


def _pre_stop_seconds(container: Doc) -> float:
    pre_stop = container.get("lifecycle", {}).get("preStop")
    if pre_stop is None:
        return 0.0
    if "sleep" in pre_stop:
        return float(pre_stop["sleep"]["seconds"])
    command = pre_stop["exec"]["command"]
    assert command[0] == "sleep" and len(command) == 2, f"unexpected preStop {command}"
    return float(command[1])


def test_grace_period_covers_pre_stop_and_drain() -> None:
    drain = _settings().drain_timeout
    roles = set()
    for workload, container in _fanout_containers():
        role = _cli(container["args"]).command
        if role not in PROBE_ROLES:
            continue
        grace = _pod_template(workload)["spec"]["terminationGracePeriodSeconds"]
        pre_stop = _pre_stop_seconds(container)
        if role == "node":
            # Endpoints and ingress controllers need a moment to stop sending new
            # connections before the node stops accepting them.
            assert pre_stop >= 3
            # node/main.py: the drain and the runner's cleanup share FANOUT_DRAIN_TIMEOUT.
            needed = pre_stop + drain
        else:
            # worker/main.py: batches get FANOUT_DRAIN_TIMEOUT, then leases are released.
            needed = pre_stop + drain
        assert grace > needed + 5, f"{role}: grace {grace}s, drain may take {needed}s"
        roles.add(role)
    assert roles == set(PROBE_ROLES)


def test_services_select_pods_and_target_their_ports() -> None:
    for folder in ("", "dev-deps"):
        docs = _rendered(folder)
        for service in _named(docs, "Service"):
            pods = [
                w for w in _workloads(docs) if _selects(service["spec"]["selector"], _labels(w))
            ]
            assert len(pods) == 1, f"Service {service['metadata']['name']} selects {len(pods)}"
            for port in service["spec"]["ports"]:
                target = port.get("targetPort", port["port"])
                assert any(_has_port(c, target) for c in _containers(pods[0])), (
                    f"Service {service['metadata']['name']}: no container port {target!r}"
                )
        for stateful in _named(docs, "StatefulSet"):
            governing = _one(docs, "Service", stateful["spec"]["serviceName"])
            assert governing["spec"].get("clusterIP") == "None"


def _labels(workload: Doc) -> dict[str, str]:
    return cast(dict[str, str], _pod_template(workload)["metadata"]["labels"])


def _has_port(container: Doc, port: int | str) -> bool:
    return any(port in (p.get("name"), p["containerPort"]) for p in container.get("ports", []))


def test_selectors_match_pod_labels() -> None:
    docs = _objects()
    for workload in _workloads(docs):
        if workload["kind"] == "Job":
            continue
        name = workload["metadata"]["name"]
        assert _selects(workload["spec"]["selector"]["matchLabels"], _labels(workload)), name
        for spread in _pod_template(workload)["spec"].get("topologySpreadConstraints", []):
            assert _selects(spread["labelSelector"]["matchLabels"], _labels(workload)), name
    for budget in _named(docs, "PodDisruptionBudget"):
        matched = [
            w
            for w in _workloads(docs)
            if _selects(budget["spec"]["selector"]["matchLabels"], _labels(w))
        ]
        assert [w["kind"] for w in matched] == ["Deployment"], budget["metadata"]["name"]
    # The node and worker pods differ in their labels: a Service or PDB of one never
    # picks the other up.
    node, worker = (_one(docs, "Deployment", n) for n in ("fanout-node", "fanout-worker"))
    assert not _selects(_labels(node), _labels(worker))


def test_ingress_example_routes_client_traffic_with_websocket_timeouts() -> None:
    ingress = _one(_objects("ingress.example.yaml"), "Ingress")
    base = _rendered()
    heartbeat = _settings().heartbeat
    annotations = ingress["metadata"]["annotations"]
    for key in ("proxy-read-timeout", "proxy-send-timeout"):
        # A proxied WebSocket quiet for longer than this is cut: it must outlast at
        # least two heartbeats (a peer is declared dead after 2x).
        assert int(annotations[f"nginx.ingress.kubernetes.io/{key}"]) > 2 * heartbeat
    node_routes = _routes("node")
    published = set()
    for rule in ingress["spec"]["rules"]:
        for path in rule["http"]["paths"]:
            backend = path["backend"]["service"]
            service = _one(base, "Service", backend["name"])
            port = backend["port"].get("name", backend["port"].get("number"))
            assert port in {p.get("name") for p in service["spec"]["ports"]} | {
                p["port"] for p in service["spec"]["ports"]
            }
            prefix = path["path"]
            served = {r for r in node_routes if r == prefix or r.startswith(prefix + "/")}
            assert served, f"the node serves nothing under {prefix}"
            published |= served
    assert "/ws" in published and "/metrics" not in published


# -- config, secrets, image, command line ---------------------------------------------


def test_env_names_are_read_by_the_config() -> None:
    names = _config_names()
    objects = {(d["kind"], d["metadata"]["name"]): d for d in _rendered()}
    objects.update({(d["kind"], d["metadata"]["name"]): d for d in _objects("secret.example.yaml")})
    for workload, container in _fanout_containers():
        where = f"{workload['metadata']['name']}/{container['name']}"
        for env in container.get("env", []):
            assert env["name"] in names, f"{where}: {env['name']} is read by nothing"
        for source in container.get("envFrom", []):
            kind, ref = (
                ("ConfigMap", source["configMapRef"])
                if "configMapRef" in source
                else ("Secret", source["secretRef"])
            )
            assert not ref.get("optional"), f"{where}: a missing {kind} must stop the pod"
            target = objects[(kind, ref["name"])]
            keys = set(target.get("data", {})) | set(target.get("stringData", {}))
            unknown = keys - names
            assert not unknown, f"{kind} {ref['name']}: {sorted(unknown)} read by nothing"
    # A key both in the ConfigMap and the Secret takes the Secret's value only if the
    # Secret comes later in envFrom.
    for _, container in _fanout_containers():
        order = ["configMapRef" in s for s in container["envFrom"]]
        assert order == sorted(order, reverse=True)


def test_config_values_pass_the_settings_check() -> None:
    settings = _settings()
    assert settings.partitions >= 1 and settings.drain_timeout > 0
    # The example Secret's placeholder is refused at start, so an unedited copy of the
    # example cannot go live; a real secret passes.
    example = _example_secret("fanout-secrets")
    with pytest.raises(ConfigError, match="FANOUT_JWT_SECRET"):
        Settings.from_env({**_config_map(), **example})
    Settings.from_env({**_config_map(), **example, "FANOUT_JWT_SECRET": SECRET})


def test_dev_dependencies_match_the_example_secret_and_the_pools() -> None:
    dev = _rendered("dev-deps")
    url = urlsplit(_example_secret("fanout-secrets")["FANOUT_DATABASE_URL"])
    postgres = _one(dev, "StatefulSet", "fanout-postgres")
    container = _containers(postgres)[0]
    env = {e["name"]: e for e in container["env"]}
    password_ref = env["POSTGRES_PASSWORD"]["valueFrom"]["secretKeyRef"]
    password = _one(dev, "Secret", password_ref["name"])["stringData"][password_ref["key"]]
    assert (url.username, url.password) == (env["POSTGRES_USER"]["value"], password)
    assert url.hostname == postgres["spec"]["serviceName"]
    assert url.path == f"/{env['POSTGRES_DB']['value']}"
    redis = _one(dev, "StatefulSet", "fanout-redis")
    assert urlsplit(_config_map()["FANOUT_REDIS_URL"]).hostname == redis["spec"]["serviceName"]
    # Acknowledged input must survive a Redis restart (README "Guarantees").
    assert "--appendonly yes" in shlex.join(_containers(redis)[0]["args"])
    # Every process holds up to FANOUT_DB_POOL_SIZE connections: the most nodes and
    # workers that can run at once, plus the migration Job, must fit.
    args = container["args"]
    max_connections = int(args[args.index("-c") + 1].removeprefix("max_connections="))
    node = _one(_rendered(), "Deployment", "fanout-node")
    workers = _one(_rendered(), "ScaledObject")["spec"]["maxReplicaCount"]
    processes = node["spec"]["replicas"] + node["spec"]["strategy"]["rollingUpdate"]["maxSurge"]
    processes += workers + 1 + 1  # a worker surging during a rollout, and the Job
    assert _settings().db_pool_size * processes < max_connections


def test_one_image_for_every_fanout_container() -> None:
    override = _one_item(_kustomization("")["images"])
    images = {c["image"] for _, c in _fanout_containers()}
    assert images == {f"{override.get('newName', override['name'])}:{override['newTag']}"}
    roles = {_cli(c["args"]).command for _, c in _fanout_containers()}
    assert roles == {"node", "worker", "migrate"}
    # The raw files name the image kustomize replaces, at the same release, so
    # `kubectl apply -f` and `-k` run the same version.
    resources = _kustomization("")["resources"]
    raw = {c["image"] for d in _objects(*resources) for c in _containers(d)}
    assert raw == {f"{override['name']}:{override['newTag']}"}
    # Third-party images (dev-deps/) are pinned to a release line, never latest.
    for workload in _workloads(_rendered("dev-deps")):
        for container in _containers(workload):
            _, _, tag = container["image"].partition(":")
            assert tag and tag != "latest", container["image"]


def _one_item(items: list[Doc]) -> Doc:
    assert len(items) == 1
    return items[0]


def test_commands_are_real_fanout_subcommands() -> None:
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    assert scripts["fanout"] == "common.cli:main"
    for workload, container in _fanout_containers():
        # The image's ENTRYPOINT is `fanout`: containers give only its arguments.
        assert container.get("command") in (None, ["fanout"]), workload["metadata"]["name"]
        _cli(container["args"])


def test_pods_run_locked_down_with_resources() -> None:
    uid, gid = _dockerfile_user()
    for workload in _workloads():
        pod = _pod_template(workload)["spec"]
        name = workload["metadata"]["name"]
        assert pod["securityContext"]["runAsNonRoot"] is True, name
        assert pod["securityContext"]["runAsUser"] > 0, name
        assert pod["securityContext"]["seccompProfile"]["type"] == "RuntimeDefault", name
        assert pod.get("automountServiceAccountToken") is False, name
        for container in _containers(workload):
            where = f"{name}/{container['name']}"
            security = container["securityContext"]
            assert security["allowPrivilegeEscalation"] is False, where
            assert security["readOnlyRootFilesystem"] is True, where
            assert security["capabilities"]["drop"] == ["ALL"], where
            resources = container["resources"]
            for kind in ("cpu", "memory"):
                request = _quantity(resources["requests"][kind])
                assert 0 < request <= _quantity(resources["limits"][kind]), f"{where} {kind}"
    for workload, _ in _fanout_containers():
        security = _pod_template(workload)["spec"]["securityContext"]
        assert (security["runAsUser"], security["runAsGroup"]) == (uid, gid)


def test_kustomizations_cover_the_manifests_and_name_no_namespace() -> None:
    base = _kustomization("")
    top_level = {name for name in _files() if "/" not in name} - {"kustomization.yaml"}
    assert set(base["resources"]) == top_level - NOT_IN_BASE
    assert not any(r.startswith(("alternatives", "dev-deps")) for r in base["resources"])
    dev = _kustomization("dev-deps")
    dev_files = {n.removeprefix("dev-deps/") for n in _files() if n.startswith("dev-deps/")}
    assert set(dev["resources"]) == dev_files - {"kustomization.yaml"}
    for generator in base.get("configMapGenerator", []):
        for entry in generator.get("files", []):
            assert (K8S / entry.rpartition("=")[2]).is_file(), entry
    for name, docs in _files().items():
        for doc in docs:
            assert "namespace" not in doc.get("metadata", {}), f"{name} names a namespace"
            assert doc.get("kind") != "Kustomization" or "namespace" not in doc, name


KUBECTL = shutil.which("kubectl")


@pytest.mark.skipif(KUBECTL is None, reason="kubectl (for `kubectl kustomize`) not installed")
@pytest.mark.parametrize(
    "folder",
    [
        "",
        "dev-deps",
        "alternatives/worker-hpa.yaml",
        "alternatives/worker-scaledobject-prometheus.yaml",
    ],
)
def test_kubectl_kustomize_renders_what_the_tests_check(folder: str, tmp_path: Path) -> None:
    root = K8S
    if folder.startswith("alternatives/"):
        # The documented swap: the alternative instead of the KEDA redis-streams file.
        root = tmp_path / "k8s"
        shutil.copytree(K8S, root)
        text = (root / "kustomization.yaml").read_text()
        (root / "kustomization.yaml").write_text(
            text.replace("- worker-scaledobject.yaml", f"- {folder}")
        )
    target = root / folder if folder and not folder.startswith("alternatives/") else root
    out = subprocess.run(
        [cast(str, KUBECTL), "kustomize", str(target)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert out.returncode == 0, out.stderr
    docs = [d for d in yaml.safe_load_all(out.stdout) if d]
    for doc in docs:
        if not doc["apiVersion"].startswith("keda.sh/"):
            kubernetes_validate.validate(doc, KUBERNETES_VERSIONS[-1], strict=True)
    names = sorted((d["kind"], d["metadata"]["name"]) for d in docs)
    if folder in ("", "dev-deps"):
        mine = sorted((d["kind"], d["metadata"]["name"]) for d in _rendered(folder))
        generated = {(d["kind"], d["metadata"]["name"]) for d in docs} - set(mine)
        assert all(kind == "ConfigMap" for kind, _ in generated), generated
        assert set(mine) <= set(names)
        if folder == "":
            images = {c["image"] for d in docs for c in _containers(d)}
            assert images == {c["image"] for _, c in _fanout_containers()}
    else:
        # Exactly one autoscaler for the workers: the alternative, not the default.
        autoscalers = [d for d in docs if d["kind"] in ("HorizontalPodAutoscaler", "ScaledObject")]
        assert autoscalers == list(_objects(folder))
        assert not any(kind == "TriggerAuthentication" for kind, _ in names)


# -- the Dockerfile --------------------------------------------------------------------


@cache
def _dockerfile() -> tuple[tuple[str, str], ...]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    lines: list[tuple[str, str]] = []
    pending = ""
    for raw in (ROOT / "Dockerfile").read_text().splitlines():
        stripped = raw.strip()
        if not pending and (not stripped or stripped.startswith("#")):
            continue
        if pending and stripped.startswith("#"):
            continue
        if stripped.endswith("\\"):
            pending += stripped[:-1] + " "
            continue
        full = pending + stripped
        pending = ""
        word, _, rest = full.partition(" ")
        lines.append((word.upper(), rest.strip()))
    assert not pending
    return tuple(lines)


def _stages() -> list[list[tuple[str, str]]]:
    stages: list[list[tuple[str, str]]] = []
    for instruction in _dockerfile():
        if instruction[0] == "FROM":
            stages.append([])
        if stages:
            stages[-1].append(instruction)
    return stages


def _dockerfile_user() -> tuple[int, int]:
    users = [args for word, args in _stages()[-1] if word == "USER"]
    assert users, "the runtime stage sets no USER: it would run as root"
    uid, _, gid = users[-1].partition(":")
    # Numeric: Kubernetes' runAsNonRoot cannot verify a user name.
    assert uid.isdigit() and gid.isdigit(), users[-1]
    assert int(uid) > 0 and int(gid) > 0
    return int(uid), int(gid)


def test_dockerfile_is_multi_stage_on_python_slim() -> None:
    args = dict(a.partition("=")[::2] for word, a in _dockerfile() if word == "ARG" and "=" in a)
    stages = _stages()
    assert len(stages) >= 2
    for stage in stages:
        base = stage[0][1].split()[0]
        base = re.sub(r"\$\{(\w+)\}", lambda m: args[m.group(1)], base)
        assert re.fullmatch(r"python:3\.11-slim(-\w+)?(@sha256:[0-9a-f]{64})?", base), base
    build = stages[0][0][1].split()
    assert build[-2].upper() == "AS"
    copies = [a for word, a in stages[-1] if word == "COPY"]
    assert any(a.startswith(f"--from={build[-1]} ") for a in copies)
    # The runtime stage installs nothing itself: no compilers or caches left behind.
    assert not any(word == "RUN" and "pip" in a for word, a in stages[-1])


def test_dockerfile_runs_fanout_as_the_pods_non_root_user() -> None:
    uid, gid = _dockerfile_user()
    final = _stages()[-1]
    entrypoint = [json.loads(a) for word, a in final if word == "ENTRYPOINT"]
    assert entrypoint == [["fanout"]], "exec form, so fanout is PID 1 and gets SIGTERM"
    cmd = [json.loads(a) for word, a in final if word == "CMD"]
    assert len(cmd) == 1
    default = _cli(cmd[0])
    assert (default.command, default.host) == ("node", "0.0.0.0")
    exposed = {int(p) for word, a in final if word == "EXPOSE" for p in a.split()}
    for _, container in _fanout_containers():
        args = _cli(container["args"])
        if args.command in PROBE_ROLES:
            assert args.port in exposed
    assert (uid, gid) == (10001, 10001)


def test_dockerfile_installs_the_pinned_project_without_extras() -> None:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    for requirement in project["dependencies"]:
        assert re.match(r"^[A-Za-z0-9_.-]+==[^,;]+(;.*)?$", requirement), requirement
    build = _stages()[0]
    copied = {src for word, a in build if word == "COPY" for src in a.split()[:-1]}
    assert {"pyproject.toml", "README.md"} <= copied
    runs = " && ".join(a for word, a in build if word == "RUN")
    installed = []
    for command in (shlex.split(c) for c in runs.split("&&")):
        if not command[0].endswith("/pip") or command[1] not in ("install", "wheel"):
            continue
        # Options that take a value: skip the value with the option.
        words = iter(command[2:])
        for word in words:
            if word in ("--wheel-dir", "-w"):
                next(words)
            elif not word.startswith("-"):
                installed.append(word)
        assert "-e" not in command and "--editable" not in command
    # Only the project itself, built from pyproject.toml and installed from its wheel:
    # not editable, without the dev or embedded extras, no unpinned extra package.
    assert installed == [".", "/wheels/fanout-*.whl"], installed
    assert "--only-binary=:all:" in runs


def test_dockerignore_keeps_the_context_to_what_the_image_copies() -> None:
    patterns = [
        line.strip()
        for line in (ROOT / ".dockerignore").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]
    assert patterns[0] == "**", "exclude everything, then allow what the build copies"
    allowed = {p[1:].rstrip("/") for p in patterns if p.startswith("!")}
    sources = {
        src.rstrip("/")
        for word, a in _stages()[0]
        if word == "COPY" and not a.startswith("--from")
        for src in a.split()[:-1]
    }
    assert sources <= allowed, sources - allowed
    for secret_prone in (".venv", ".git", ".fanout-data", "tests", "k8s"):
        assert secret_prone not in allowed
