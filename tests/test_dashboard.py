"""The Grafana dashboard queries only metrics and labels that the components export.

The router's and a worker's metrics are built in process on fresh registries and every recording
method is called once, so that each labelled series exists; then every PromQL expression of every
panel and every template variable of helm/moe-cluster/dashboards/moe-cluster.json must name
exposed series (`_bucket`, `_sum`, `_count` only where the metric is a histogram, `_total` where
it is a counter) and use only their labels, or the labels Prometheus adds to each target.
"""

from __future__ import annotations

import json
import re
from collections import defaultdict
from pathlib import Path

import grpc
import pytest
import torch

from expert_worker.metrics import WorkerMetrics
from router.metrics import RouterMetrics

CHART = Path(__file__).resolve().parent.parent / "helm" / "moe-cluster"
DASHBOARD = CHART / "dashboards" / "moe-cluster.json"
# labels Prometheus attaches from the scrape target (ServiceMonitor / PodMonitor)
TARGET_LABELS = {"namespace", "pod", "instance", "job", "service", "container", "endpoint"}
PROMQL_WORDS = {"by", "without", "on", "ignoring", "group_left", "group_right", "bool", "offset"}


def exercised_router() -> RouterMetrics:
    metrics = RouterMetrics(moe_layers=[1, 3], num_experts=4)
    with metrics.request("Generate") as record:
        record.prompt_tokens(3)
        record.tokens(1)
        record.tokens(2)
    metrics.set_queue(waiting=1, running=2)
    metrics.record_step(sequences=2, tokens=5, seconds=0.01)
    metrics.record_step_failure()
    metrics.record_graph_step()
    metrics.record_graph_capture(0.1)
    metrics.record_expert_tokens(1, torch.bincount(torch.tensor([0, 2, 1, 3]), minlength=4))
    metrics.record_layer(1, 0.002)
    metrics.record_dispatch("10.0.0.1:50052", 100)
    metrics.record_combine("10.0.0.1:50052", 200, 0.001)
    metrics.record_worker_failure("10.0.0.1:50052", grpc.StatusCode.UNAVAILABLE)
    metrics.record_retry("10.0.0.1:50052")
    metrics.set_worker_healthy("10.0.0.1:50052", True)
    return metrics


def exercised_worker() -> WorkerMetrics:
    metrics = WorkerMetrics(resident_weight_bytes=1 << 20, device="cpu")
    with metrics.request("Forward"):
        metrics.record_batch(tokens=3, expert_tokens=5, seconds=0.001)
    return metrics


def exported() -> tuple[dict[str, set[str]], dict[str, str]]:
    """-> (label names of each exposed sample name, the type of each metric family)."""
    labels: dict[str, set[str]] = defaultdict(set)
    types: dict[str, str] = {}
    for metrics in (exercised_router(), exercised_worker()):
        for family in metrics.registry.collect():
            types[family.name] = family.type
            for sample in family.samples:
                labels[sample.name] |= set(sample.labels)
    return dict(labels), types


def queries(dashboard: dict) -> list[tuple[str, str, str]]:
    """(where, PromQL expression, legend format) of every panel target, rows included."""
    found = []

    def walk(panels: list[dict]) -> None:
        for panel in panels:
            for target in panel.get("targets", []):
                found.append((panel["title"], target["expr"], target.get("legendFormat", "")))
            walk(panel.get("panels", []))

    walk(dashboard["panels"])
    return found


def label_values_queries(dashboard: dict) -> list[tuple[str, str, str]]:
    """(variable, metric, label) of every label_values(...) template variable."""
    found = []
    for variable in dashboard["templating"]["list"]:
        query = variable.get("query")
        text = query.get("query", "") if isinstance(query, dict) else str(query or "")
        for metric, label in re.findall(r"label_values\(\s*(\w+)\s*,\s*(\w+)\s*\)", text):
            found.append((variable["name"], metric, label))
    return found


def strip_strings(expr: str) -> str:
    return re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)


def selectors(expr: str) -> list[tuple[str, list[str]]]:
    """(metric, labels its matchers use) of each `metric{...}` selector."""
    out = []
    for metric, body in re.findall(r"([a-zA-Z_:][\w:]*)\s*\{([^}]*)\}", strip_strings(expr)):
        out.append((metric, re.findall(r"(\w+)\s*(?:=~|!~|!=|=)", body)))
    return out


def metric_names(expr: str) -> set[str]:
    """Every series name the expression reads: identifiers that are not functions, keywords,
    label names inside braces or grouping clauses, or durations."""
    text = strip_strings(expr)
    text = re.sub(r"\{[^}]*\}", "", text)  # matchers
    text = re.sub(r"\b(?:by|without|on|ignoring)\s*\([^)]*\)", "", text)  # grouping labels
    text = re.sub(r"\[[^\]]*\]", "", text)  # range durations
    names = set()
    for match in re.finditer(r"[a-zA-Z_:][\w:]*", text):
        word = match.group(0)
        after = text[match.end() :].lstrip()
        if after.startswith("(") or word in PROMQL_WORDS:
            continue  # a function or an aggregation
        if re.fullmatch(r"\d.*", word):
            continue
        names.add(word)
    return names


def grouping_labels(expr: str) -> set[str]:
    labels = set()
    for group in re.findall(r"\b(?:by|without|on|ignoring)\s*\(([^)]*)\)", strip_strings(expr)):
        labels |= {name.strip() for name in group.split(",") if name.strip()}
    return labels


def family_of(sample: str, types: dict[str, str]) -> str | None:
    """The family a sample name belongs to, checking the suffix fits the family's type."""
    if sample in types and types[sample] in ("gauge", "unknown"):
        return sample
    for suffix, kinds in (
        ("_total", ("counter",)),
        ("_bucket", ("histogram",)),
        ("_sum", ("histogram", "summary")),
        ("_count", ("histogram", "summary")),
    ):
        base = sample.removesuffix(suffix)
        if base != sample and types.get(base) in kinds:
            return base
    return None


@pytest.fixture(scope="module")
def dashboard() -> dict:
    return json.loads(DASHBOARD.read_text())


def test_every_queried_metric_is_exported_with_the_right_type(dashboard):
    labels, types = exported()
    targets = queries(dashboard)
    assert len(targets) > 10
    for where, expr, _ in targets:
        names = metric_names(expr)
        assert names, f"{where}: no metric in {expr}"
        for name in names:
            assert family_of(name, types), f"{where}: {name} is not exported ({expr})"
            assert name in labels, f"{where}: no {name} series after recording ({expr})"


def test_every_label_a_panel_uses_is_on_its_metrics(dashboard):
    labels, _ = exported()
    for where, expr, legend in queries(dashboard):
        for metric, used in selectors(expr):
            unknown = set(used) - labels[metric] - TARGET_LABELS
            assert not unknown, f"{where}: {metric} has no label {unknown} ({expr})"
        available = set().union(*(labels[name] for name in metric_names(expr))) | TARGET_LABELS
        grouped = grouping_labels(expr)
        assert not grouped - available, f"{where}: grouped by {grouped - available} ({expr})"
        shown = set(re.findall(r"\{\{\s*(\w+)\s*\}\}", legend))
        assert shown <= grouped | TARGET_LABELS, f"{where}: legend shows {shown - grouped}"


def test_template_variables_read_exported_labels(dashboard):
    labels, _ = exported()
    variables = label_values_queries(dashboard)
    assert {name for name, _, _ in variables} == {"namespace", "layer"}
    for name, metric, label in variables:
        assert metric in labels, f"${name} reads {metric}, which is not exported"
        assert label in labels[metric] | TARGET_LABELS, f"${name}: {metric} has no {label}"


def test_the_chart_ships_this_dashboard_file():
    template = (CHART / "templates" / "configmap-dashboard.yaml").read_text()
    assert '.Files.Get "dashboards/moe-cluster.json"' in template
