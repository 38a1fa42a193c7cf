"""The deployment files: dashboards, alert rules, Prometheus and compose configs, images.

Offline checks: the committed dashboards are what deploy/grafana/generate.py makes, every
metric a dashboard or alert names is one server/metrics.py defines, promtool accepts and
unit-tests the rules, docker-compose accepts the cluster. The last test runs the real thing:
a shard fed by the demo, scraped by the Prometheus that .ci/run starts with
deploy/prometheus/ci.yml, and every panel and alert expression must return data.

Tools that come from Debian (promtool, prometheus, docker-compose) are installed by .ci/run:
without them a test fails under CI (CI=true) and is skipped, with the reason, elsewhere.
"""
from __future__ import annotations

import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path
from urllib.error import HTTPError, URLError
from urllib.parse import urlencode
from urllib.request import urlopen

import pytest
import yaml

from optserve import local

ROOT = Path(__file__).resolve().parents[1]
DEPLOY = ROOT / "deploy"
DASHBOARDS = DEPLOY / "grafana" / "dashboards"
ALERTS = DEPLOY / "prometheus" / "alerts.yml"
IN_CI = bool(os.environ.get("CI"))

PROMETHEUS = "http://127.0.0.1:9090"   # started by .ci/run
METRICS_PORT = 9464                    # what deploy/prometheus/ci.yml scrapes
CI_SCRAPE_JOB = "optserve-ci"


def missing(reason: str):
    """A tool or service this test needs is not here: a failure in CI, a skip elsewhere."""
    if IN_CI:
        pytest.fail(f"{reason} (CI must provide it: see .ci/run)")
    pytest.skip(reason)


def tool(name: str, package: str) -> str:
    path = shutil.which(name)
    if path is None:
        missing(f"{name} is not installed (apt-get install {package})")
    return path


def run(*cmd: str) -> subprocess.CompletedProcess:
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, \
        f"{' '.join(cmd)} exited {proc.returncode}:\n{proc.stdout}\n{proc.stderr}"
    return proc


# --- PromQL, just enough to check names and find an expression's metric side -----------------

# Label matchers, range selectors and strings hold no metric names; neither do the label lists
# of by/without/on/ignoring/group_left/group_right.
_NOISE = re.compile(r'"(?:[^"\\]|\\.)*"|\'(?:[^\'\\]|\\.)*\'|\{[^}]*\}|\[[^\]]*\]'
                    r'|\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)')
_TOKEN = re.compile(r"(?P<number>\d+(?:\.\d*)?(?:[eE][-+]?\d+)?[smhdwy]*)"
                    r"|(?P<name>[a-zA-Z_:][a-zA-Z0-9_:]*)(?P<call>\s*\()?")
_KEYWORDS = {"and", "or", "unless", "offset", "bool", "inf", "nan"}


def metric_names(expr: str) -> set[str]:
    """Metric names an expression selects: identifiers that are neither functions,
    aggregations, keywords, label names nor numbers."""
    names = set()
    for m in _TOKEN.finditer(_NOISE.sub(" ", expr)):
        name = m.group("name")
        if name and not m.group("call") and name.lower() not in _KEYWORDS:
            names.add(name)
    return names


def _top_level(expr: str):
    """Yields (index, char) of the characters outside parentheses, braces, brackets, strings."""
    depth, quote = 0, None
    for i, c in enumerate(expr):
        if quote:
            if c == quote and expr[i - 1] != "\\":
                quote = None
        elif c in "\"'`":
            quote = c
        elif c in "([{":
            depth += 1
        elif c in ")]}":
            depth -= 1
        elif depth == 0:
            yield i, c


def metric_sides(expr: str) -> list[str]:
    """What an alert measures, without its threshold: `A > 2` -> [A];
    `A == 0 or absent(B)` -> [A, B]. Each must return data from a healthy, busy shard."""
    text = expr.strip()
    # Split at top-level `or`.
    cuts = [i for i, _ in _top_level(text) if re.match(r"\sor\s", text[i:i + 4])]
    parts = [text[a:b].strip() for a, b in zip([0] + [i + 3 for i in cuts], cuts + [len(text)])]
    sides = []
    for part in parts:
        top = dict(_top_level(part))
        comparisons = [i for i in top if part[i] in "<>=!" and (
            part[i] in "<>" or part[i + 1:i + 2] == "=") and part[i - 1:i] not in "<>=!"]
        if comparisons:
            part = part[:comparisons[-1]].strip()
        absent = re.fullmatch(r"absent\s*\((.*)\)", part, re.S)
        sides.append(absent.group(1).strip() if absent else part)
    return sides


def test_promql_helpers():
    assert metric_names('sum by (training_job, le) '
                        '(rate(optserve_stepz_total{training_job=~"$training_job"}[5m])) > 0'
                        ) == {"optserve_stepz_total"}
    assert metric_names("topk(10, optserve_weight_norm) > 10 * clamp_min(x offset 1h, 1e-3)"
                        ) == {"optserve_weight_norm", "x"}
    assert metric_sides('sum by (job) (rate(a{code!="OK"}[5m])) > 0') == [
        'sum by (job) (rate(a{code!="OK"}[5m]))']
    assert metric_sides("a > 10 * clamp_min(a offset 1h, 1)") == ["a"]
    assert metric_sides("(a - a) != 0") == ["(a - a)"]
    assert metric_sides('up{job=~"x"} == 0 or absent(b)') == ['up{job=~"x"}', "b"]
    assert metric_sides("histogram_quantile(0.99, a)") == ["histogram_quantile(0.99, a)"]


# --- what the deploy files contain -------------------------------------------------------------

def load_generator():
    if importlib.util.find_spec("grafana_foundation_sdk") is None:
        missing("grafana-foundation-sdk is not installed (Python 3.11+, the dev extra)")
    spec = importlib.util.spec_from_file_location("generate", DEPLOY / "grafana" / "generate.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def dashboards() -> dict[str, dict]:
    return {p.name: json.loads(p.read_text()) for p in sorted(DASHBOARDS.glob("*.json"))}


def panel_targets(dashboard: dict):
    """(panel title, expr) of every query of every panel, rows' panels included."""
    for panel in dashboard["panels"]:
        for inner in [panel] + panel.get("panels", []):
            for target in inner.get("targets", []):
                yield inner["title"], target["expr"]


def alert_rules() -> list[dict]:
    return [rule for group in yaml.safe_load(ALERTS.read_text())["groups"]
            for rule in group["rules"] if "alert" in rule]


def exported_names() -> set[str]:
    """The series names a shard can export, from server/metrics.py's ShardMetrics."""
    from optserve.server.metrics import ShardMetrics
    suffixes = {"counter": ("_total",), "histogram": ("_bucket", "_sum", "_count"),
                "gauge": ("",)}
    return {family.name + suffix for family in ShardMetrics().registry.collect()
            for suffix in suffixes[family.type]}


def test_dashboards_match_their_generator(tmp_path):
    """The committed JSON is what deploy/grafana/generate.py makes now."""
    load_generator().write(tmp_path)
    fresh = {p.name: p.read_text() for p in tmp_path.glob("*.json")}
    committed = {p.name: p.read_text() for p in DASHBOARDS.glob("*.json")}
    assert fresh.keys() == committed.keys(), "dashboard files differ"
    stale = [name for name in fresh if fresh[name] != committed[name]]
    assert not stale, (f"{stale} differ from what the generator makes: run "
                       f"`.venv/bin/python deploy/grafana/generate.py` and commit the result")


def test_dashboards_use_the_training_job_variable_and_the_provisioned_datasource():
    datasource = yaml.safe_load(
        (DEPLOY / "grafana/provisioning/datasources/prometheus.yml").read_text())["datasources"][0]
    provider = yaml.safe_load(
        (DEPLOY / "grafana/provisioning/dashboards/optserve.yml").read_text())["providers"][0]
    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    assert f"./deploy/grafana/dashboards:{provider['options']['path']}:ro" in \
        compose["services"]["grafana"]["volumes"]
    titles = {d["title"] for d in dashboards().values()}
    assert titles == {"optserve / optimizer health", "optserve / service"}
    for dashboard in dashboards().values():
        (job,) = dashboard["templating"]["list"]
        assert job["name"] == "training_job"
        assert job["query"] == "label_values(optserve_job_version, training_job)"
        for panel in dashboard["panels"]:
            if panel["type"] != "row":
                assert panel["datasource"]["uid"] == datasource["uid"], panel["title"]
                assert panel["fieldConfig"]["defaults"].get("unit"), f"{panel['title']}: no unit"


def test_dashboards_and_alerts_name_only_exported_metrics():
    """A typo in a metric name gives an empty panel or an alert that never fires: catch it here."""
    known = exported_names() | {"up"}
    used = {}
    for name, dashboard in dashboards().items():
        for title, expr in panel_targets(dashboard):
            used[f"{name}: {title}: {expr}"] = metric_names(expr)
    for rule in alert_rules():
        used[f"alert {rule['alert']}: {rule['expr']}"] = metric_names(rule["expr"])
    assert len(used) > 20
    empty = [where for where, names in used.items() if not names]
    assert not empty, f"expressions that select no metric: {empty}"
    unknown = {where: sorted(names - known) for where, names in used.items() if names - known}
    assert not unknown, f"names not in server/metrics.py: {json.dumps(unknown, indent=2)}"


def test_images_copy_every_package_folder():
    """`pip install .` in the images needs each folder [tool.setuptools] package-dir maps."""
    tomllib = pytest.importorskip("tomllib")
    package_dir = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"][
        "package-dir"]
    for dockerfile in ("shard.Dockerfile", "worker.Dockerfile"):
        text = (DEPLOY / dockerfile).read_text()
        for folder in set(package_dir.values()) | {"pyproject.toml", "README.md"}:
            assert re.search(rf"^COPY .*\b{re.escape(folder)}\b", text, re.M), \
                f"{dockerfile} does not COPY {folder}"
        assert re.search(r"^USER (?!root)", text, re.M), f"{dockerfile} runs as root"


def test_one_cuda_major_everywhere():
    """The image's CUDA, its CuPy wheel, the `cuda` extra and CI's NVRTC check agree: a
    kernel CI compiled with one major and a shard ran with another would be two binaries."""
    tomllib = pytest.importorskip("tomllib")
    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    image = (DEPLOY / "shard.Dockerfile").read_text()
    majors = {
        "image": re.search(r"^FROM nvidia/cuda:(\d+)\.", image, re.M).group(1),
        "image cupy": re.search(r"cupy-cuda(\d+)x", image).group(1),
        "cuda extra": re.search(r"cupy-cuda(\d+)x", " ".join(extras["cuda"])).group(1),
        "nvrtc-check cupy": re.search(r"cupy-cuda(\d+)x", " ".join(extras["nvrtc-check"])).group(1),
        "nvrtc-check nvrtc": re.search(r"nvidia-cuda-nvrtc>=(\d+),<(\d+)",
                                       " ".join(extras["nvrtc-check"])).group(1),
    }
    assert len(set(majors.values())) == 1, majors
    assert re.search(r"^RUN optserve compile-kernels --arch .*\b90\b", image, re.M), \
        "the image does not warm the kernel cache for Hopper"


# --- the tools' own checks ----------------------------------------------------------------------

def test_promtool_checks_and_unit_tests_the_alert_rules():
    promtool = tool("promtool", "prometheus")
    run(promtool, "check", "rules", str(ALERTS.relative_to(ROOT)))
    run(promtool, "test", "rules", "deploy/prometheus/alerts_test.yml")


@pytest.mark.parametrize("config", ["prometheus.yml", "ci.yml"])
def test_promtool_checks_the_prometheus_config(config):
    promtool = tool("promtool", "prometheus")
    # rule_files are relative to the config's folder, so this works from anywhere.
    run(promtool, "check", "config", f"deploy/prometheus/{config}")
    # A standard scrape, as a kube-prometheus ServiceMonitor does it: the shard's labels
    # need no honor_labels (the real-Prometheus test checks what a scrape makes of them).
    for scrape in yaml.safe_load((DEPLOY / "prometheus" / config).read_text())["scrape_configs"]:
        assert "honor_labels" not in scrape, f"{config}: {scrape['job_name']} sets honor_labels"


def test_promtool_cases_tell_the_training_job_from_the_scrape_job(tmp_path):
    """The promtool cases can fail: the rules with the training job read from `job` (the
    scrape job, "optserve" on every series) no longer pass them."""
    promtool = tool("promtool", "prometheus")
    text = ALERTS.read_text()
    assert "training_job" in text
    (tmp_path / "alerts.yml").write_text(text.replace("training_job", "job"))
    shutil.copy(DEPLOY / "prometheus" / "alerts_test.yml", tmp_path)
    proc = subprocess.run([promtool, "test", "rules", "alerts_test.yml"], cwd=tmp_path,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0, proc.stdout
    assert "OptserveSkippedSteps" in proc.stdout + proc.stderr


@pytest.mark.parametrize("files", [["docker-compose.yml"],
                                   ["docker-compose.yml", "deploy/compose.gpu.yml"]])
def test_docker_compose_accepts_the_cluster(files):
    compose = tool("docker-compose", "docker-compose")
    run(compose, *[arg for f in files for arg in ("-f", f)], "config", "-q")


# --- the real thing: a busy shard scraped by a real Prometheus ----------------------------------

def prom_query(expr: str) -> list:
    try:
        with urlopen(f"{PROMETHEUS}/api/v1/query?{urlencode({'query': expr})}", timeout=10) as r:
            body = json.load(r)
    except HTTPError as e:  # a bad query: show Prometheus' reason
        raise AssertionError(f"{expr}: {e} {e.read().decode()}") from None
    assert body["status"] == "success", body
    return body["data"]["result"]


def prometheus_scraping_ci_target():
    """Waits for the Prometheus of .ci/run and its scrape target (discovery takes a few
    seconds after start); fails (CI) or skips when it is not there."""
    start = time.monotonic()
    while True:
        try:
            with urlopen(f"{PROMETHEUS}/api/v1/targets", timeout=2) as r:
                targets = json.load(r)["data"]["activeTargets"]
        except (URLError, OSError) as e:
            if time.monotonic() - start > (30 if IN_CI else 2):
                missing(f"no Prometheus on {PROMETHEUS} ({e}): start one with "
                        f"`prometheus --config.file=deploy/prometheus/ci.yml "
                        f"--web.listen-address=127.0.0.1:9090 --storage.tsdb.path=$(mktemp -d)`")
        else:
            if any(t["labels"].get("job") == CI_SCRAPE_JOB for t in targets):
                return
            if time.monotonic() - start > 30:
                missing(f"the Prometheus on {PROMETHEUS} does not run deploy/prometheus/ci.yml")
        time.sleep(0.5)


@pytest.fixture(scope="module")
def busy_shard(tmp_path_factory):
    """A shard with metrics on :9464 that the demo trained three jobs on (sync, one per
    optimizer), plus a small async job that sent one NaN gradient: every kind of series a
    shard exports now exists. Yields the training jobs' names."""
    prometheus_scraping_ci_target()
    log = tmp_path_factory.mktemp("shard") / "shard.log"
    shard = local.start(local.shard_command("--metrics-port", str(METRICS_PORT), "--device", "cpu"),
                        log, cwd=ROOT)
    try:
        demo = subprocess.run(
            [sys.executable, "-m", "optserve", "demo", "--servers", shard.address, "--workers", "1",
             "--rank", "0", "--steps", "40", "--optimizers", "adamw,adamp,adafactor",
             "--job", "ci"], cwd=ROOT, capture_output=True, text=True, timeout=600)
        assert demo.returncode == 0, f"demo failed:\n{demo.stdout}\n{demo.stderr}"
        async_job_with_a_nan_gradient(shard.address)
        yield wait_until_scraped()
    finally:
        shard.stop()


def async_job_with_a_nan_gradient(address: str) -> None:
    """Async steps (staleness observations), then a NaN gradient: refused with
    INVALID_ARGUMENT and counted as a skipped step (reason nonfinite)."""
    import torch
    from optserve.client import InvalidArgument, RemoteOptimizer
    model = torch.nn.Linear(8, 4)
    opt = RemoteOptimizer(model.named_parameters(), "adamw", servers=[address], job="ci-async",
                          mode="async", lr=1e-3)
    try:
        for _ in range(5):
            opt.zero_grad()
            model(torch.randn(16, 8)).square().mean().backward()
            opt.step()
        model.weight.grad.fill_(float("nan"))
        with pytest.raises(InvalidArgument):
            opt.step()
    finally:
        opt.close()


def shard_samples() -> dict[str, float]:
    """optserve_steps_total per job, read from the shard's own endpoint."""
    with urlopen(f"http://127.0.0.1:{METRICS_PORT}/metrics", timeout=5) as r:
        text = r.read().decode()
    return {m.group(1): float(m.group(2)) for m in
            re.finditer(r'^optserve_steps_total\{training_job="([^"]+)"\} (\S+)$', text, re.M)}


def wait_until_scraped(timeout: float = 60.0) -> list[str]:
    """Polls Prometheus until it has scraped the shard's final state; returns the jobs."""
    want = shard_samples()
    assert len(want) == 4, f"expected 3 demo jobs and ci-async on the shard, got {want}"
    deadline = time.monotonic() + timeout
    while True:
        got = {r["metric"]["training_job"]: float(r["value"][1])
               for r in prom_query(f'optserve_steps_total{{training_job=~"{"|".join(want)}"}}')}
        # rate() needs two samples of a series: wait for a second scrape of the newest ones.
        if got == want and min(len(series["values"]) for series in
                               prom_query('{__name__=~"optserve_.+"}[1m]')) >= 2:
            return sorted(want)
        assert time.monotonic() < deadline, f"Prometheus has {got}, the shard {want}"
        time.sleep(1)


def grafana_to_promql(expr: str, jobs: list[str]) -> str:
    """What Grafana sends for `expr` with these jobs picked: a multi-value variable becomes
    a regex alternation; the interval macros become durations."""
    assert all(re.fullmatch(r"[\w.-]+", j) for j in jobs), jobs  # nothing to regex-escape
    choice = "(" + "|".join(jobs) + ")"
    for macro, value in (("$__rate_interval", "1m"), ("$__interval", "1m"),
                         ("${training_job}", choice), ("$training_job", choice)):
        expr = expr.replace(macro, value)
    assert "$" not in expr, f"unsubstituted variable in {expr}"
    return expr


def test_dashboards_and_alerts_return_data_from_real_prometheus(busy_shard):
    """Every panel query and the metric side of every alert returns series from a real
    Prometheus scraping a real, busy shard (the provisioned files, unchanged)."""
    jobs = busy_shard
    checked, empty = [], []
    for name, dashboard in dashboards().items():
        for title, expr in panel_targets(dashboard):
            promql = grafana_to_promql(expr, jobs)
            checked.append(promql)
            if not prom_query(promql):
                empty.append(f"{name}: {title}: {promql}")
    for rule in alert_rules():
        for side in metric_sides(rule["expr"]):
            checked.append(side)
            if not prom_query(side):
                empty.append(f"alert {rule['alert']}: {side}")
    assert len(checked) > 25
    assert not empty, "no data for:\n" + "\n".join(empty)


def test_a_standard_scrape_keeps_the_training_job_label(busy_shard):
    """Scraped without honor_labels, every optserve_* series keeps the shard's own labels:
    Prometheus renamed none of them to exported_*, and `job` is the scrape config's."""
    series = prom_query('{__name__=~"optserve_.+"}')
    assert series
    renamed = [s["metric"] for s in series if any(k.startswith("exported_") for k in s["metric"])]
    assert not renamed, renamed[:5]
    assert {s["metric"]["job"] for s in series} == {CI_SCRAPE_JOB}
    jobs = {s["metric"]["training_job"] for s in series if "training_job" in s["metric"]}
    assert set(busy_shard) <= jobs
    assert not prom_query('{__name__=~"optserve_.+_created"}'), "_created series are exported"
