"""The Helm chart under helm/moe-cluster, checked offline as a user would deploy it.

Helm's own Go SDK (bound by helm-python-sdk, no helm binary) lints and renders the chart for the
value sets below; every rendered manifest must validate in strict mode against the Kubernetes API
schemas of the oldest supported and of a current Kubernetes release (kubernetes-validate). The
structural tests then check what the schemas cannot: selectors, probes, security settings, the
NetworkPolicy, the workers' shard assignment (run through a real shell) and name lengths.
"""

from __future__ import annotations

import ast
import copy
import functools
import inspect
import json
import os
import re
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

helm = pytest.importorskip("helm_python")
kubernetes_validate = pytest.importorskip("kubernetes_validate")
jsonschema = pytest.importorskip("jsonschema")
yaml = pytest.importorskip("yaml")

CHART = Path(__file__).resolve().parent.parent / "helm" / "moe-cluster"
RELEASE = "moe"
NAMESPACE = "llm"
MODEL = {"model": {"path": "Qwen1.5-MoE-A2.7B"}}
# The chart's kubeVersion floor and the newest release kubernetes-validate knows.
KUBE_VERSIONS = ("1.25.0", kubernetes_validate.latest_version())

TLS = {
    "tls": {"enabled": True, "serverSecret": "moe-tls", "caSecret": "moe-ca"},
    "probes": {"type": "exec"},
    "auth": {"tokenSecret": "moe-token"},
}
VALUE_SETS = {
    "defaults": {},
    "replicas-per-shard-2": {
        "expertWorkers": {"replicasPerShard": 2},
        "router": {"onExpertLoss": "degrade", "forwarders": 4},
    },
    "four-shards": {"expertWorkers": {"numShards": 4, "replicasPerShard": 2, "fronts": 2}},
    "tls": TLS,
    "monitoring": {
        "monitoring": {
            "serviceMonitor": {"enabled": True, "labels": {"release": "prometheus"}},
            "podMonitor": {"enabled": True, "labels": {"release": "prometheus"}},
        }
    },
    "hpa": {
        "expertWorkers": {
            "numShards": 4,
            "autoscaling": {"enabled": True, "minReplicas": 4, "maxReplicas": 12},
        }
    },
    "pvc-existing": {"model": {"storage": {"type": "pvc", "pvc": {"existingClaim": "weights"}}}},
    "host-path": {
        "model": {"storage": {"type": "hostPath", "hostPath": {"path": "/var/lib/models"}}}
    },
    "static-discovery": {"router": {"discovery": "static"}, "expertWorkers": {"numShards": 3}},
    "exec-probes-everything-off": {
        "probes": {"type": "exec"},
        "networkPolicy": {"enabled": False},
        "dashboard": {"enabled": False},
        "tests": {"enabled": False},
        "router": {"pdb": {"enabled": False}},
        "expertWorkers": {"pdb": {"enabled": False}},
        "serviceAccount": {"create": False, "name": "moe-router"},
        "rbac": {"create": False},
    },
}

# Template file name prefix of every kind: one resource per template, named after its kind.
KIND_PREFIX = {
    "ConfigMap": "configmap-",
    "Deployment": "deployment-",
    "HorizontalPodAutoscaler": "hpa-",
    "NetworkPolicy": "networkpolicy-",
    "PersistentVolumeClaim": "pvc-",
    "Pod": "test-",
    "PodDisruptionBudget": "pdb-",
    "PodMonitor": "podmonitor-",
    "Role": "role-",
    "RoleBinding": "rolebinding-",
    "Service": "service-",
    "ServiceAccount": "serviceaccount",
    "ServiceMonitor": "servicemonitor-",
    "StatefulSet": "statefulset-",
}
SELECTOR_KEYS = {
    "app.kubernetes.io/name",
    "app.kubernetes.io/instance",
    "app.kubernetes.io/component",
}


def merged(*layers: dict) -> dict:
    """Deep merge of value layers, later ones winning."""
    out: dict = {}
    for layer in layers:
        for key, value in layer.items():
            if isinstance(value, dict) and isinstance(out.get(key), dict):
                out[key] = merged(out[key], value)
            else:
                out[key] = copy.deepcopy(value)
    return out


@functools.cache
def _chart():
    return helm.Chart.load(str(CHART))


@functools.cache
def _render(values_json: str, release: str) -> tuple[tuple[str, str], ...]:
    rendered = _chart().render(
        json.loads(values_json), name=release, namespace=NAMESPACE, is_install=True
    )
    return tuple(sorted(rendered.items()))


def render_files(values: dict, release: str = RELEASE) -> dict[str, str]:
    """Template path -> rendered text, NOTES.txt included."""
    return dict(_render(json.dumps(merged(MODEL, values), sort_keys=True), release))


def render(values: dict, release: str = RELEASE) -> list[tuple[str, dict]]:
    """(template file name, manifest) of every rendered Kubernetes object."""
    docs = []
    for path, text in render_files(values, release).items():
        if path.endswith("NOTES.txt"):
            continue
        for doc in yaml.safe_load_all(text):
            if doc:
                docs.append((Path(path).name, doc))
    return docs


def only(docs: list[tuple[str, dict]], kind: str) -> dict:
    found = [doc for _, doc in docs if doc["kind"] == kind]
    assert len(found) == 1, f"expected one {kind}, rendered {len(found)}"
    return found[0]


def render_error(values: dict) -> str:
    with pytest.raises(helm.HelmError) as caught:
        _chart().render(merged(MODEL, values), name=RELEASE, namespace=NAMESPACE)
    return str(caught.value)


def pod_specs(docs):
    """(kind, name, pod spec, pod labels) of every workload and pod."""
    for _, doc in docs:
        if doc["kind"] in ("Deployment", "StatefulSet"):
            template = doc["spec"]["template"]
            yield doc["kind"], doc["metadata"]["name"], template["spec"], template["metadata"]
        elif doc["kind"] == "Pod":
            yield doc["kind"], doc["metadata"]["name"], doc["spec"], doc["metadata"]


def matches(selector: dict, labels: dict) -> bool:
    assert set(selector) <= {"matchLabels"}, f"only matchLabels selectors expected: {selector}"
    return all(labels.get(k) == v for k, v in selector.get("matchLabels", {}).items())


def component_pods(docs, component: str) -> dict:
    """Pod template labels of the router or the worker workload."""
    kind = {"router": "Deployment", "expert-worker": "StatefulSet"}[component]
    return only(docs, kind)["spec"]["template"]["metadata"]["labels"]


# --- lint, render, API validation -------------------------------------------------------------


@pytest.mark.parametrize("name", VALUE_SETS)
def test_lint_is_clean(name):
    report = helm.lint(str(CHART), merged(MODEL, VALUE_SETS[name]), strict=True)
    problems = [m for m in report["messages"] if m["severity"] >= 2]
    assert not problems and not report["errors"], problems or report["errors"]


# prometheus-operator CRDs are not in the Kubernetes schemas: the fields the chart uses, checked
# against the CRD's names (monitoring.coreos.com/v1) so a misspelt field fails.
_ENDPOINT = {
    "type": "object",
    "additionalProperties": False,
    "required": ["port"],
    "properties": {
        "port": {"type": "string"},
        "path": {"type": "string"},
        "interval": {"type": "string", "pattern": "^([0-9]+(ms|s|m|h))+$"},
        "scrapeTimeout": {"type": "string", "pattern": "^([0-9]+(ms|s|m|h))+$"},
    },
}


def _monitor_schema(endpoints_key: str) -> dict:
    return {
        "type": "object",
        "required": ["apiVersion", "kind", "metadata", "spec"],
        "properties": {
            "apiVersion": {"const": "monitoring.coreos.com/v1"},
            "spec": {
                "type": "object",
                "additionalProperties": False,
                "required": ["selector", endpoints_key],
                "properties": {
                    "selector": {"type": "object"},
                    "namespaceSelector": {
                        "type": "object",
                        "additionalProperties": False,
                        "properties": {
                            "any": {"type": "boolean"},
                            "matchNames": {"type": "array", "items": {"type": "string"}},
                        },
                    },
                    endpoints_key: {"type": "array", "minItems": 1, "items": _ENDPOINT},
                },
            },
        },
    }


MONITOR_SCHEMAS = {
    "ServiceMonitor": _monitor_schema("endpoints"),
    "PodMonitor": _monitor_schema("podMetricsEndpoints"),
}


def _validate(manifest_json: str, version: str) -> str | None:
    """None when valid, else a readable error naming the object and the field."""
    manifest = json.loads(manifest_json)
    name = f"{manifest['kind']}/{manifest['metadata']['name']}"
    try:
        if manifest["kind"] in MONITOR_SCHEMAS:
            jsonschema.validate(manifest, MONITOR_SCHEMAS[manifest["kind"]])
        else:
            kubernetes_validate.validate(manifest, version, strict=True)
    except jsonschema.ValidationError as err:
        where = "/".join(str(p) for p in err.absolute_path)
        return f"{name} at {where!r}: {err.message}"
    except kubernetes_validate.SchemaNotFoundError as err:
        return f"{name}: {err.message}"
    return None


@functools.cache
def _validated(version: str) -> dict[str, str | None]:
    """Every distinct manifest of every value set, validated once against one version."""
    unique = {
        json.dumps(doc, sort_keys=True)
        for values in VALUE_SETS.values()
        for _, doc in render(values)
    }
    return {manifest: _validate(manifest, version) for manifest in unique}


@pytest.mark.parametrize("version", KUBE_VERSIONS)
@pytest.mark.parametrize("name", VALUE_SETS)
def test_manifests_validate_against_kubernetes_schemas(name, version):
    results = _validated(version)
    errors = [results[json.dumps(doc, sort_keys=True)] for _, doc in render(VALUE_SETS[name])]
    errors = [e for e in errors if e]
    assert not errors, "\n".join(errors)


@pytest.mark.parametrize("name", VALUE_SETS)
def test_one_resource_per_template_named_after_its_kind(name):
    per_file: dict[str, list[str]] = {}
    for template, doc in render(VALUE_SETS[name]):
        per_file.setdefault(template, []).append(doc["kind"])
        assert doc["metadata"]["namespace"] == NAMESPACE or doc["kind"] == "ConfigMap"
    for template, kinds in per_file.items():
        assert len(kinds) == 1, f"{template} renders {kinds}"
        assert template.startswith(KIND_PREFIX[kinds[0]]), f"{template} holds a {kinds[0]}"


def _schema_node(schema: dict, node: dict) -> dict:
    while "$ref" in node or "allOf" in node:
        if "$ref" in node:
            node = schema["definitions"][node["$ref"].rsplit("/", 1)[1]]
        else:
            node = node["allOf"][0]
    return node


def test_every_value_is_in_the_schema_and_every_schema_key_has_a_default():
    schema = json.loads((CHART / "values.schema.json").read_text())
    defaults = yaml.safe_load((CHART / "values.yaml").read_text())

    def walk(values: dict, node: dict, path: str) -> None:
        props = node.get("properties")
        if props is None:  # a Kubernetes object passed through (affinity, securityContext, ...)
            return
        assert node.get("additionalProperties") is False, f"{path or '.'} accepts unknown keys"
        for key, value in values.items():
            assert key in props, f"{path}{key} is not in values.schema.json"
            child = _schema_node(schema, props[key])
            if isinstance(value, dict):
                walk(value, child, f"{path}{key}.")
        missing = set(props) - set(values) - {"global"}
        assert not missing, f"schema keys without a default in values.yaml: {path}{missing}"

    walk(defaults, schema, "")


# --- the schema and the chart's own checks reject bad values ----------------------------------


@pytest.mark.parametrize(
    ("values", "expected"),
    [
        ({"expertWorkers": {"replicasPerShard": -1}}, "/expertWorkers/replicasPerShard"),
        ({"router": {"replicas": -2}}, "/router/replicas"),
        ({"expertWorkers": {"numShards": 0}}, "/expertWorkers/numShards"),
        ({"model": {"path": ""}}, "/model/path"),
        ({"model": {"path": None}}, "missing property 'path'"),
        ({"model": {"path": "../etc"}}, "/model/path"),
        ({"replicas": 3}, "additional properties 'replicas' not allowed"),
        ({"router": {"gpu": 1}}, "additional properties 'gpu' not allowed"),
        ({"model": {"precision": "int4"}}, "/model/precision"),
        ({"model": {"storage": {"type": "nfs"}}}, "/model/storage/type"),
        ({"router": {"ports": {"grpc": 70000}}}, "/router/ports/grpc"),
        ({"expertWorkers": {"pdb": {"maxUnavailable": "half"}}}, "/expertWorkers/pdb"),
    ],
)
def test_schema_rejects_bad_values_readably(values, expected):
    message = render_error(values)
    assert "values don't meet the specifications of the schema" in message
    assert expected in message, message
    lint = helm.lint(str(CHART), merged(MODEL, values))
    assert any(expected in error for error in lint["errors"]), lint["errors"]


def test_model_path_has_no_default():
    with pytest.raises(helm.HelmValuesError, match="/model/path"):
        _chart().render({}, name=RELEASE, namespace=NAMESPACE)


@pytest.mark.parametrize(
    ("values", "expected"),
    [
        ({"tls": {"enabled": True, "serverSecret": "s"}}, "tls.enabled needs probes.type=exec"),
        ({"tls": {"enabled": True}, "probes": {"type": "exec"}}, "needs tls.serverSecret"),
        ({"model": {"storage": {"type": "hostPath"}}}, "needs model.storage.hostPath.path"),
        (
            {"expertWorkers": {"numShards": 4, "autoscaling": {"enabled": True, "minReplicas": 6}}},
            "must be multiples of expertWorkers.numShards",
        ),
        (
            {
                "router": {"discovery": "static"},
                "expertWorkers": {"autoscaling": {"enabled": True}},
            },
            "needs router.discovery=kubernetes",
        ),
        ({"rbac": {"create": False}}, "needs rbac.create=true"),
    ],
)
def test_contradicting_values_fail_with_a_message(values, expected):
    assert expected in render_error(values)


# --- structure that the API schemas cannot check ----------------------------------------------


@pytest.mark.parametrize("name", VALUE_SETS)
def test_selectors_hold_only_immutable_labels_and_pick_their_own_pods(name):
    docs = render(VALUE_SETS[name])
    router, workers = component_pods(docs, "router"), component_pods(docs, "expert-worker")
    selectors = []
    for _, doc in docs:
        spec = doc.get("spec", {})
        if doc["kind"] in ("Deployment", "StatefulSet", "PodDisruptionBudget", "ServiceMonitor"):
            selectors.append((doc, spec["selector"]))
        elif doc["kind"] in ("NetworkPolicy", "PodMonitor"):
            selectors.append((doc, spec.get("podSelector", spec.get("selector"))))
        elif doc["kind"] == "Service":
            selectors.append((doc, {"matchLabels": spec["selector"]}))
    assert selectors
    for doc, selector in selectors:
        keys = set(selector["matchLabels"])
        assert {"app.kubernetes.io/name", "app.kubernetes.io/instance"} <= keys <= SELECTOR_KEYS, (
            f"{doc['kind']}/{doc['metadata']['name']} selects by {sorted(keys)}"
        )
        component = selector["matchLabels"]["app.kubernetes.io/component"]
        target, other = (router, workers) if component == "router" else (workers, router)
        assert matches(selector, target) and not matches(selector, other), doc["metadata"]["name"]
    for _, doc in docs:
        if doc["kind"] in ("Deployment", "StatefulSet"):
            assert matches(doc["spec"]["selector"], doc["spec"]["template"]["metadata"]["labels"])


@pytest.mark.parametrize("name", VALUE_SETS)
def test_every_container_is_locked_down_and_has_resources(name):
    values = merged(MODEL, VALUE_SETS[name])
    specs = list(pod_specs(render(VALUE_SETS[name])))
    assert {kind for kind, *_ in specs} >= {"Deployment", "StatefulSet"}
    for kind, pod, spec, _ in specs:
        assert spec["securityContext"]["runAsNonRoot"] is True, pod
        assert spec["securityContext"]["seccompProfile"]["type"] == "RuntimeDefault", pod
        assert spec.get("hostNetwork") is not True and spec.get("hostPID") is not True, pod
        for container in spec["containers"] + spec.get("initContainers", []):
            where = f"{pod}/{container['name']}"
            security = container["securityContext"]
            assert security["allowPrivilegeEscalation"] is False, where
            assert security.get("privileged") is not True, where
            assert security["readOnlyRootFilesystem"] is True, where
            assert security["capabilities"]["drop"] == ["ALL"], where
            assert "add" not in security["capabilities"], where
            resources = container["resources"]
            assert resources.get("requests") and resources.get("limits"), where
            assert "memory" in resources["limits"], where
            mounts = {m["mountPath"] for m in container["volumeMounts"]}
            assert "/tmp" in mounts, f"{where}: read-only root needs a writable /tmp"
            if kind == "Pod":  # the helm test pod runs once; it has no probes
                continue
            gpu = values.get("gpu", {}).get("resourceName", "nvidia.com/gpu")
            assert resources["limits"][gpu] >= 1 and resources["requests"][gpu] >= 1, where
            _check_probes(
                container, where, exec_probes=values.get("probes", {}).get("type") == "exec"
            )


def _check_probes(container: dict, where: str, exec_probes: bool) -> None:
    grpc_port = next(p["containerPort"] for p in container["ports"] if p["name"] == "grpc")
    for kind in ("startupProbe", "livenessProbe", "readinessProbe"):
        probe = container[kind]
        if exec_probes:
            command = probe["exec"]["command"]
            assert command[:2] == ["python", "-c"] and command[3] == str(grpc_port), where
            assert "grpc_health.v1" in command[2], where
        else:
            assert probe["grpc"]["port"] == grpc_port, f"{where} {kind} probes another port"
    startup = container["startupProbe"]
    budget = startup["periodSeconds"] * startup["failureThreshold"]
    assert budget >= 600, f"{where}: {budget} s is short for loading weights"


@pytest.mark.parametrize("name", ["defaults", "tls", "hpa"])
def test_network_policy_admits_only_the_router_to_the_workers(name):
    docs = render(VALUE_SETS[name])
    policy = only(docs, "NetworkPolicy")["spec"]
    router, workers = component_pods(docs, "router"), component_pods(docs, "expert-worker")
    assert matches(policy["podSelector"], workers) and not matches(policy["podSelector"], router)
    assert "Ingress" in policy["policyTypes"]
    worker = only(docs, "StatefulSet")["spec"]["template"]["spec"]["containers"][0]
    worker_ports = {p["name"] for p in worker["ports"]}
    rules = {}
    for rule in policy["ingress"]:
        assert rule.get("from") and rule.get("ports"), f"rule open to everything: {rule}"
        for port in rule["ports"]:
            assert port["port"] in worker_ports, f"policy names unknown port {port['port']}"
            rules[port["port"]] = rule["from"]
    assert set(rules) == {"grpc", "metrics"}
    (peer,) = rules["grpc"]
    assert set(peer) == {"podSelector"}, f"gRPC port also open to {peer}"
    assert matches(peer["podSelector"], router) and not matches(peer["podSelector"], workers)
    (scraper,) = rules["metrics"]
    assert scraper["namespaceSelector"] == {
        "matchLabels": {"kubernetes.io/metadata.name": "monitoring"}
    }


def _expand_kubernetes_vars(text: str, env: dict[str, str]) -> str:
    """Kubernetes' expansion of command and args: $$ -> $, $(VAR) -> its value if defined."""

    def replace(match: re.Match) -> str:
        if match.group(0) == "$$":
            return "$"
        return env.get(match.group(1), match.group(0))

    return re.sub(r"\$\$|\$\(([A-Za-z_][A-Za-z0-9_]*)\)", replace, text)


@pytest.mark.parametrize(
    ("num_shards", "replicas_per_shard"), [(1, 1), (2, 1), (4, 2), (3, 3), (8, 1)]
)
def test_worker_shard_is_its_ordinal_modulo_num_shards(tmp_path, num_shards, replicas_per_shard):
    """Runs the worker's start command in a shell, with a stand-in for moe-expert-worker."""
    docs = render(
        {"expertWorkers": {"numShards": num_shards, "replicasPerShard": replicas_per_shard}}
    )
    sts = only(docs, "StatefulSet")
    replicas = sts["spec"]["replicas"]
    assert replicas == num_shards * replicas_per_shard
    container = sts["spec"]["template"]["spec"]["containers"][0]
    stand_in = tmp_path / "moe-expert-worker"
    stand_in.write_text('#!/bin/sh\nprintf "%s\\n" "$@"\n')
    stand_in.chmod(0o755)
    shards = []
    for ordinal in range(replicas):
        env = {"POD_NAME": f"{sts['metadata']['name']}-{ordinal}"}
        argv = [_expand_kubernetes_vars(a, env) for a in container["command"] + container["args"]]
        done = subprocess.run(
            argv,
            env={"PATH": f"{tmp_path}:/usr/bin:/bin", **env},
            capture_output=True,
            text=True,
            timeout=10,
            check=True,
        )
        args = done.stdout.splitlines()
        assert args[0] == "serve" and args[args.index("--model") + 1] == (
            "/models/Qwen1.5-MoE-A2.7B"
        )
        shards.append(args[args.index("--shard") + 1])
    assert shards == [f"{k % num_shards}/{num_shards}" for k in range(replicas)]


def test_worker_start_command_refuses_a_pod_name_without_ordinal(tmp_path):
    container = only(render({}), "StatefulSet")["spec"]["template"]["spec"]["containers"][0]
    argv = [_expand_kubernetes_vars(a, {}) for a in container["command"] + container["args"]]
    done = subprocess.run(
        argv, env={"PATH": "/usr/bin:/bin", "POD_NAME": "worker"}, capture_output=True, text=True
    )
    assert done.returncode == 2 and "no ordinal" in done.stderr


def test_names_fit_kubernetes_limits_with_the_longest_release_name():
    release = ("a-very-long-release-name-" * 3)[:53]  # Helm's limit
    assert len(release) == 53
    values = merged(VALUE_SETS["monitoring"], VALUE_SETS["hpa"])
    docs = render(values, release=release)
    seen = set()
    for _, doc in docs:
        name = doc["metadata"]["name"]
        assert len(name) <= 63 and re.fullmatch(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?", name), name
        assert (doc["kind"], name) not in seen, f"two {doc['kind']}s named {name}"
        seen.add((doc["kind"], name))
        for label in doc["metadata"].get("labels", {}).values():
            assert len(str(label)) <= 63, label
    sts = only(docs, "StatefulSet")
    # The controller-revision-hash label is "<name>-<10 chars>": the name must stay <= 52.
    assert len(sts["metadata"]["name"]) <= 52
    assert len(sts["spec"]["serviceName"]) <= 63
    names = {doc["metadata"]["name"] for _, doc in docs}
    assert len({n for n in names if n.endswith("-router")}) == 1


def test_router_watches_exactly_the_worker_pods():
    docs = render({})
    args = only(docs, "Deployment")["spec"]["template"]["spec"]["containers"][0]["args"]
    assert args[args.index("--discovery") + 1] == "kubernetes"
    assert args[args.index("--namespace") + 1] == NAMESPACE
    selector = dict(pair.split("=") for pair in args[args.index("--selector") + 1].split(","))
    assert matches({"matchLabels": selector}, component_pods(docs, "expert-worker"))
    assert not matches({"matchLabels": selector}, component_pods(docs, "router"))
    role, binding = only(docs, "Role"), only(docs, "RoleBinding")
    assert role["rules"] == [
        {"apiGroups": [""], "resources": ["pods"], "verbs": ["get", "list", "watch"]}
    ]
    router_pod = only(docs, "Deployment")["spec"]["template"]["spec"]
    assert binding["roleRef"]["name"] == role["metadata"]["name"]
    assert binding["subjects"] == [
        {
            "kind": "ServiceAccount",
            "name": router_pod["serviceAccountName"],
            "namespace": NAMESPACE,
        }
    ]
    assert router_pod["automountServiceAccountToken"] is True
    worker_pod = only(docs, "StatefulSet")["spec"]["template"]["spec"]
    assert worker_pod["automountServiceAccountToken"] is False


def test_static_discovery_lists_every_worker_pod_by_dns_name():
    docs = render(VALUE_SETS["static-discovery"])
    args = only(docs, "Deployment")["spec"]["template"]["spec"]["containers"][0]["args"]
    assert "--discovery" not in args
    sts = only(docs, "StatefulSet")
    headless = next(
        doc
        for _, doc in docs
        if doc["kind"] == "Service" and doc["spec"].get("clusterIP") == "None"
    )
    assert sts["spec"]["serviceName"] == headless["metadata"]["name"]
    expected = [
        f"{sts['metadata']['name']}-{k}.{headless['metadata']['name']}.{NAMESPACE}"
        f".svc.cluster.local:50061"
        for k in range(3)
    ]
    assert args[args.index("--workers") + 1].split(",") == expected


def test_autoscaler_owns_the_worker_replica_count():
    docs = render(VALUE_SETS["hpa"])
    sts, hpa = only(docs, "StatefulSet"), only(docs, "HorizontalPodAutoscaler")
    assert "replicas" not in sts["spec"]
    target = hpa["spec"]["scaleTargetRef"]
    assert (target["kind"], target["name"]) == ("StatefulSet", sts["metadata"]["name"])
    assert (hpa["spec"]["minReplicas"], hpa["spec"]["maxReplicas"]) == (4, 12)
    assert all(
        doc["kind"] != "HorizontalPodAutoscaler" for _, doc in render(VALUE_SETS["defaults"])
    )


def _model_volume(spec: dict) -> dict:
    return next(v for v in spec["volumes"] if v["name"] == "models")


@pytest.mark.parametrize(
    ("name", "claim", "created"),
    [("defaults", "moe-moe-cluster-models", True), ("pvc-existing", "weights", False)],
)
def test_model_volume_from_a_claim_is_mounted_read_only(name, claim, created):
    docs = render(VALUE_SETS[name])
    for kind, pod, spec, _ in pod_specs(docs):
        if kind == "Pod":
            assert "models" not in {v["name"] for v in spec["volumes"]}
            continue
        assert _model_volume(spec)["persistentVolumeClaim"] == {
            "claimName": claim,
            "readOnly": True,
        }
        mount = next(m for m in spec["containers"][0]["volumeMounts"] if m["name"] == "models")
        assert mount == {"name": "models", "mountPath": "/models", "readOnly": True}, pod
    claims = [doc for _, doc in docs if doc["kind"] == "PersistentVolumeClaim"]
    assert [c["metadata"]["name"] for c in claims] == ([claim] if created else [])
    if created:
        assert claims[0]["metadata"]["annotations"]["helm.sh/resource-policy"] == "keep"


def test_model_volume_from_a_host_path():
    for kind, _, spec, _ in pod_specs(render(VALUE_SETS["host-path"])):
        if kind != "Pod":
            volume = _model_volume(spec)
            assert volume["hostPath"] == {"path": "/var/lib/models", "type": "Directory"}


def sdk_keywords(script: str) -> set[str]:
    """Keyword arguments of the moe_client.Client(...) call in script; each must exist."""
    from moe_client import Client

    (call,) = [
        node
        for node in ast.walk(ast.parse(script))
        if isinstance(node, ast.Call) and getattr(node.func, "attr", None) == "Client"
    ]
    keywords = {k.arg for k in call.keywords}
    assert keywords <= set(inspect.signature(Client).parameters), keywords
    return keywords


def test_tls_and_token_flags_name_files_mounted_from_the_secrets():
    docs = render(TLS)
    for kind, pod, spec, _ in pod_specs(docs):
        volumes = {v["name"]: v for v in spec["volumes"]}
        container = spec["containers"][0]
        mounted = {}
        for mount in container["volumeMounts"]:
            secret = volumes[mount["name"]].get("secret")
            if secret:
                assert mount["readOnly"] is True
                for item in secret["items"]:
                    mounted[f"{mount['mountPath']}/{item['path']}"] = (
                        secret["secretName"],
                        item["key"],
                    )
        if kind == "Pod":  # a client: the CA and the token, never the server key
            assert set(mounted.values()) == {("moe-ca", "ca.crt"), ("moe-token", "token")}
            script = container["command"][2]
            compile(script, "test-connection", "exec")
            for path in re.findall(r'"(/etc/moe-cluster/[^"]+)"', script):
                assert path in mounted, path
            assert sdk_keywords(script) == {"tls_ca", "token_file"}
            continue
        args = container["args"]
        expected = {
            "--tls-cert": ("moe-tls", "tls.crt"),
            "--tls-key": ("moe-tls", "tls.key"),
            "--tls-ca": ("moe-ca", "ca.crt"),
            "--auth-token-file": ("moe-token", "token"),
        }
        for flag, source in expected.items():
            assert mounted[args[args.index(flag) + 1]] == source, f"{pod} {flag}"
        assert "--insecure" not in args and "--worker-tls-server-name" not in args
    for kind, _, spec, _ in pod_specs(render({})):
        if kind != "Pod":  # the servers refuse plaintext unless told --insecure
            plain = spec["containers"][0]["args"]
            assert "--insecure" in plain
            assert not {"--tls-cert", "--auth-token-file", "--worker-tls-server-name"} & set(plain)


def test_router_checks_a_configured_name_in_the_workers_certificates():
    docs = render(merged(TLS, {"tls": {"workerServerName": "expert-worker.llm.svc"}}))
    router = only(docs, "Deployment")["spec"]["template"]["spec"]["containers"][0]["args"]
    assert router[router.index("--worker-tls-server-name") + 1] == "expert-worker.llm.svc"
    workers = only(docs, "StatefulSet")["spec"]["template"]["spec"]["containers"][0]["args"]
    assert "--worker-tls-server-name" not in workers


def test_monitors_scrape_the_metrics_ports():
    docs = render(VALUE_SETS["monitoring"])
    service_monitor, pod_monitor = only(docs, "ServiceMonitor"), only(docs, "PodMonitor")
    router_service = next(
        doc
        for _, doc in docs
        if doc["kind"] == "Service" and doc["metadata"]["name"].endswith("-router")
    )
    assert matches(service_monitor["spec"]["selector"], router_service["metadata"]["labels"])
    assert service_monitor["metadata"]["labels"]["release"] == "prometheus"
    service_ports = {p["name"]: p["port"] for p in router_service["spec"]["ports"]}
    assert service_monitor["spec"]["endpoints"][0]["port"] == "metrics"
    assert service_ports["metrics"] == 9090
    workers = only(docs, "StatefulSet")["spec"]["template"]
    assert matches(pod_monitor["spec"]["selector"], workers["metadata"]["labels"])
    ports = {p["name"]: p["containerPort"] for p in workers["spec"]["containers"][0]["ports"]}
    assert pod_monitor["spec"]["podMetricsEndpoints"][0]["port"] == "metrics"
    assert ports["metrics"] == 9091
    kinds = {doc["kind"] for _, doc in render({})}
    assert not kinds & {"ServiceMonitor", "PodMonitor"}, "monitors are off by default"


def test_dashboard_configmap_carries_the_sidecar_label_and_queries_moe_metrics():
    config_map = only(render({}), "ConfigMap")
    assert config_map["metadata"]["labels"]["grafana_dashboard"] == "1"
    dashboard = json.loads(config_map["data"]["moe-cluster.json"])
    assert dashboard == json.loads((CHART / "dashboards" / "moe-cluster.json").read_text())
    targets = [t for p in dashboard["panels"] for t in p.get("targets", [])]
    assert targets
    for target in targets:
        names = set(re.findall(r"\b[a-z_:][a-z0-9_:]*(?=\{|\[)", target["expr"]))
        assert names and all(n.startswith("moe_") for n in names), target["expr"]
    kinds = {p["type"] for p in dashboard["panels"]}
    assert {"timeseries", "heatmap", "state-timeline"} <= kinds


def test_helm_test_pod_calls_the_router_through_the_sdk():
    docs = render({})
    pod = only(docs, "Pod")
    assert pod["metadata"]["annotations"]["helm.sh/hook"] == "test"
    container = pod["spec"]["containers"][0]
    assert container["command"][:2] == ["python", "-c"]
    script = container["command"][2]
    compile(script, "test-connection", "exec")
    router_service = next(
        doc["metadata"]["name"]
        for _, doc in docs
        if doc["kind"] == "Service" and doc["metadata"]["name"].endswith("-router")
    )
    assert f'"{router_service}.{NAMESPACE}.svc:50051"' in script
    assert "moe_client.Client(" in script and ".info()" in script
    assert "generate(token_ids=[1, 2, 3], max_new_tokens=2)" in script


def test_notes_tell_how_to_reach_the_router():
    notes = render_files({})["moe-cluster/templates/NOTES.txt"]
    assert "kubectl -n llm port-forward svc/moe-moe-cluster-router 50051:50051" in notes
    assert "helm test moe -n llm" in notes
    assert sdk_keywords(re.search(r'python -c "(.*)"', notes).group(1)) == set()
    secured = render_files(TLS)["moe-cluster/templates/NOTES.txt"]
    example = re.search(r'python -c "(.*)"', secured).group(1)
    assert sdk_keywords(example) == {"tls_ca", "token_file"}
    assert "get secret moe-ca -o jsonpath='{.data.ca\\.crt}'" in secured
    assert "get secret moe-token -o jsonpath='{.data.token}'" in secured


# --- the exec health probe against a real gRPC health server ----------------------------------


def test_exec_probe_reports_the_grpc_health_status():
    grpc = pytest.importorskip("grpc")
    health = pytest.importorskip("grpc_health.v1.health")
    health_pb2 = pytest.importorskip("grpc_health.v1.health_pb2")
    health_pb2_grpc = pytest.importorskip("grpc_health.v1.health_pb2_grpc")

    sts = only(render({"probes": {"type": "exec"}}), "StatefulSet")
    command = sts["spec"]["template"]["spec"]["containers"][0]["readinessProbe"]["exec"]["command"]
    script, timeout = command[2], command[4]

    server = grpc.server(ThreadPoolExecutor(max_workers=2))
    servicer = health.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:

        def probe() -> int:
            done = subprocess.run(
                [sys.executable, "-c", script, str(port), timeout],
                capture_output=True,
                timeout=30,
                env={**os.environ, "PYTHONDONTWRITEBYTECODE": "1"},
            )
            return done.returncode

        servicer.set("", health_pb2.HealthCheckResponse.NOT_SERVING)
        assert probe() == 1
        servicer.set("", health_pb2.HealthCheckResponse.SERVING)
        assert probe() == 0
    finally:
        server.stop(grace=None)


@pytest.mark.parametrize("name", VALUE_SETS)
def test_the_components_accept_every_argument_the_chart_passes(name):
    from expert_worker.main import build_parser as worker_parser
    from router.main import build_parser as router_parser
    from router.main import config_from_args

    docs = render(VALUE_SETS[name])
    router = only(docs, "Deployment")["spec"]["template"]["spec"]["containers"][0]
    args = router_parser().parse_args(router["args"])  # SystemExit on an unknown option
    config = config_from_args(args)
    values = VALUE_SETS[name].get("router", {})
    assert config.on_expert_loss.value == values.get("onExpertLoss", "fail")
    assert config.forwarders == values.get("forwarders", 0)
    grace = only(docs, "Deployment")["spec"]["template"]["spec"]["terminationGracePeriodSeconds"]
    assert 0 < args.grace < grace  # the drain ends before the kubelet kills
    worker = only(docs, "StatefulSet")["spec"]["template"]["spec"]["containers"][0]
    # the container runs a shell that adds --shard from the pod ordinal
    args = worker_parser().parse_args(["serve", "--shard", "0/1", *worker["args"]])
    assert args.grace > 0
    assert args.fronts == VALUE_SETS[name].get("expertWorkers", {}).get("fronts", 0)
