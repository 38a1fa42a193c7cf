"""The provisioned Grafana dashboards, as code (grafana-foundation-sdk).

    .venv/bin/python deploy/grafana/generate.py            # rewrites deploy/grafana/dashboards/
    .venv/bin/python deploy/grafana/generate.py --out DIR  # writes somewhere else

The JSON it writes is committed and provisioned as it is (deploy/grafana/provisioning/);
tests/test_deploy.py regenerates it into a temporary folder and fails when the committed files
differ, so edit this file and rerun it, never the JSON.

Every metric used here is defined in server/metrics.py. A note on labels: the shard's metrics
carry the *training* job in their `training_job` label; `job` is Prometheus's own, the scrape
config's job name (`optserve`), as on any target. The `$training_job` variable is multi-valued
with an "All" of `.*`, so every selector uses `training_job=~"$training_job"`.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from grafana_foundation_sdk.builders import common as cb
from grafana_foundation_sdk.builders import dashboard as db
from grafana_foundation_sdk.builders import prometheus, stat, timeseries
from grafana_foundation_sdk.cog.encoder import JSONEncoder
from grafana_foundation_sdk.models import common
from grafana_foundation_sdk.models.dashboard import (DashboardCursorSync, DataSourceRef,
                                                     VariableOption, VariableRefresh, VariableSort)

HERE = Path(__file__).resolve().parent
OUT = HERE / "dashboards"

# Fixed in deploy/grafana/provisioning/datasources/prometheus.yml.
DATASOURCE = DataSourceRef(type_val="prometheus", uid="optserve-prometheus")
JOB = 'training_job=~"$training_job"'
RATE = "$__rate_interval"
# How many per-tensor series a panel shows: a job may export up to --max-tensor-series of them.
TOP = 10


def q(expr: str, legend: str) -> prometheus.Dataquery:
    return prometheus.Dataquery().expr(expr).legend_format(legend).datasource(DATASOURCE)


def quantile(metric: str, by: str, phi: float = 0.99, selector: str = JOB) -> str:
    """The phi-quantile of a histogram over the rate window, aggregated over shards."""
    return (f"histogram_quantile({phi}, sum by ({by}, le) "
            f"(rate({metric}_bucket{{{selector}}}[{RATE}])))")


def graph(title: str, unit: str, *queries: prometheus.Dataquery, description: str = "",
          log: bool = False, width: int = 12) -> timeseries.Panel:
    panel = (timeseries.Panel().title(title).description(description).unit(unit)
             .datasource(DATASOURCE).span(width).height(8).fill_opacity(10).line_width(1)
             .legend(cb.VizLegendOptions().show_legend(True)
                     .display_mode(common.LegendDisplayMode.LIST)
                     .placement(common.LegendPlacement.BOTTOM))
             .tooltip(cb.VizTooltipOptions().mode(common.TooltipDisplayMode.MULTI)
                      .sort(common.SortOrder.DESCENDING)))
    if log:  # norms and ratios of different tensors span orders of magnitude
        panel = panel.scale_distribution(
            cb.ScaleDistributionConfig().type(common.ScaleDistribution.LOG).log(10))
    for i, query in enumerate(queries):
        panel = panel.with_target(query.ref_id(chr(ord("A") + i)))
    return panel


def single(title: str, unit: str, query: prometheus.Dataquery, description: str = "",
           width: int = 6) -> stat.Panel:
    return (stat.Panel().title(title).description(description).unit(unit)
            .datasource(DATASOURCE).span(width).height(4)
            .with_target(query.ref_id("A")))


def job_variable() -> db.QueryVariable:
    """Training jobs that have a version on some shard; several or All may be picked."""
    return (db.QueryVariable("training_job").label("training job").datasource(DATASOURCE)
            .query("label_values(optserve_job_version, training_job)")
            .refresh(VariableRefresh.ON_TIME_RANGE_CHANGED).sort(VariableSort.ALPHABETICAL_ASC)
            .multi(True).include_all(True).all_value(".*")
            .current(VariableOption(selected=True, text="All", value="$__all")))


def base(uid: str, title: str, description: str) -> db.Dashboard:
    return (db.Dashboard(title).uid(uid).description(description).tags(["optserve"])
            .refresh("10s").time("now-30m", "now").timezone("browser")
            .tooltip(DashboardCursorSync.CROSSHAIR).readonly()
            .with_variable(job_variable()))


def optimizer_health() -> db.Dashboard:
    per_tensor = "{{training_job}} {{tensor}}"
    return (
        base("optserve-optimizer-health", "optserve / optimizer health",
             "What the optimizer does to the weights: norms, angular step sizes, update ratios, "
             "AdamP projections and Adafactor clipping, per job and parameter tensor.")
        .with_row(db.Row("Per tensor (top 10)"))
        .with_panel(graph(
            "Weight norm ||w||", "none",
            q(f"topk({TOP}, optserve_weight_norm{{{JOB}}})", per_tensor),
            description="L2 norm of each tensor's weights after the last step. Under weight "
                        "decay and normalization layers it should settle, not grow without bound.",
            log=True))
        .with_panel(graph(
            "Effective step size", "none",
            q(f"topk({TOP}, optserve_effective_step{{{JOB}}})", per_tensor),
            description="||w_{t+1}/||w_{t+1}|| - w_t/||w_t||||: the angle (radians, for small "
                        "angles) the weights turned in the last step; the quantity AdamP keeps "
                        "from shrinking on scale-invariant weights.",
            log=True))
        .with_panel(graph(
            "Update-to-weight ratio", "none",
            q(f"topk({TOP}, optserve_update_ratio{{{JOB}}})", per_tensor),
            description="||w_{t+1} - w_t|| / ||w_t||. Around 1e-3 is the usual healthy range; "
                        "1e-1 and above means the step is rewriting the tensor.",
            log=True))
        .with_panel(graph(
            "Gradient norm", "none",
            q(f"topk({TOP}, optserve_grad_norm{{{JOB}}})", per_tensor),
            description="L2 norm of the (worker-averaged) gradient applied in the last step.",
            log=True))
        .with_row(db.Row("Optimizer"))
        .with_panel(graph(
            "Learning rate per group", "none",
            q(f"max by (training_job, group) (optserve_learning_rate{{{JOB}}})",
              "{{training_job}} group {{group}}"),
            description="The lr each parameter group's last step used (the worker's scheduler "
                        "sets it).", width=8))
        .with_panel(graph(
            "AdamP: projected vs stepped tensors", "none",
            # Each shard projects only the tensors it holds: sum over shards.
            q(f"sum by (training_job) (optserve_adamp_projected_tensors{{{JOB}}})",
              "{{training_job}} projected"),
            q(f"sum by (training_job) (optserve_stepped_tensors{{{JOB}}})",
              "{{training_job}} stepped"),
            description="Tensors whose AdamP update had its radial part removed (the weights "
                        "looked scale-invariant), out of all tensors stepped.", width=8))
        .with_panel(graph(
            "Adafactor: update clipping", "none",
            q(f"max by (training_job) (optserve_adafactor_clip_ratio{{{JOB}}})",
              "{{training_job}} clip ratio"),
            q(f"sum by (training_job) (optserve_adafactor_clipped_tensors{{{JOB}}})",
              "{{training_job}} clipped tensors"),
            description="Mean clipping divisor max(1, RMS(U)/d) (1 = nothing clipped) and how "
                        "many tensors were clipped in the last step.", width=8))
    )


def service() -> db.Dashboard:
    return (
        base("optserve-service", "optserve / service",
             "The shards as a service: step latency by phase, throughput, traffic, barrier "
             "waits, staleness, RPC outcomes and state held.")
        .with_row(db.Row("Shards"))
        .with_panel(single(
            "Shards up", "none",
            q("sum(optserve_shard_up)", "serving"),
            description="Shards whose optserve_shard_up is 1 (0 while draining on SIGTERM)."))
        .with_panel(single(
            "Scrape targets up", "none",
            q('sum(up{job=~"optserve.*"})', "up"),
            description="Shard metrics endpoints Prometheus reached in its last scrape."))
        .with_panel(single(
            "Active jobs", "none",
            q("max(optserve_active_jobs)", "jobs"),
            description="Jobs held by the busiest shard."))
        .with_panel(single(
            "State held", "bytes",
            q(f"sum(optserve_state_bytes{{{JOB}}})", "bytes"),
            description="Parameters and optimizer state over all shards."))
        .with_row(db.Row("Steps"))
        .with_panel(graph(
            "Step latency by phase (p50, p99)", "s",
            q(quantile("optserve_step_phase_seconds", "training_job, phase", phi=0.5),
              "{{training_job}} {{phase}} p50"),
            q(quantile("optserve_step_phase_seconds", "training_job, phase"),
              "{{training_job}} {{phase}} p99"),
            description="Receive (gradient stream), wait (sync barrier), compute (optimizer "
                        "kernel) and send (parameters back).", log=True))
        .with_panel(graph(
            "Steps/s and skipped gradients", "ops",
            # Every shard holding part of a job steps it: max, not sum, over shards.
            q(f"max by (training_job) (rate(optserve_steps_total{{{JOB}}}[{RATE}]))",
              "{{training_job}} steps"),
            # every shard counts the same skipped step: max over shards, as for steps
            q(f"max by (training_job, reason) "
              f"(rate(optserve_skipped_steps_total{{{JOB}}}[{RATE}]))",
              "{{training_job}} skipped: {{reason}}"),
            description="Optimizer steps applied, and gradients received but not applied: late "
                        "(quorum already met), stale (over the staleness bound), nonfinite."))
        .with_panel(graph(
            "Bytes in / out", "Bps",
            q(f"sum by (training_job) (rate(optserve_received_bytes_total{{{JOB}}}[{RATE}]))",
              "{{training_job}} in"),
            q(f"sum by (training_job) (rate(optserve_sent_bytes_total{{{JOB}}}[{RATE}]))",
              "{{training_job}} out"),
            description="Step payload bytes per second over all shards: gradients in, "
                        "parameters out.", width=8))
        .with_panel(graph(
            "Barrier wait p99", "s",
            q(quantile("optserve_barrier_wait_seconds", "training_job"), "{{training_job}}"),
            description="Sync mode: how long a gradient waited for the step's quorum. High "
                        "values point at a slow worker, not at the shard.", width=8))
        .with_panel(graph(
            "Staleness (p50, p99)", "none",
            q(quantile("optserve_staleness_versions", "training_job", phi=0.5),
              "{{training_job}} p50"),
            q(quantile("optserve_staleness_versions", "training_job"), "{{training_job}} p99"),
            description="Async mode: versions between the parameters a gradient was computed "
                        "on and the job's current ones.", width=8))
        .with_row(db.Row("RPCs and state"))
        .with_panel(graph(
            "RPCs by method and code", "reqps",
            q(f"sum by (method, code) (rate(optserve_rpcs_total[{RATE}]))", "{{method}} {{code}}"),
            description="All RPCs the shards handled (the series carry no training_job label).",
            width=8))
        .with_panel(graph(
            "RPC errors by method", "reqps",
            # `or ... * 0` shows an explicit 0 for methods without errors instead of "No data".
            q(f'sum by (method) (rate(optserve_rpcs_total{{code!="OK"}}[{RATE}])) '
              f"or sum by (method) (rate(optserve_rpcs_total[{RATE}])) * 0", "{{method}}"),
            description='RPCs that ended with a status other than OK (code!="OK").', width=8))
        .with_panel(graph(
            "State bytes per job", "bytes",
            q(f"sum by (training_job) (optserve_state_bytes{{{JOB}}})", "{{training_job}}"),
            description="Parameters and optimizer state per job, over all shards.", width=8))
        .with_panel(graph(
            "Active jobs and workers", "none",
            q("optserve_active_jobs", "{{instance}} jobs"),
            q(f"max by (training_job) (optserve_active_workers{{{JOB}}})",
              "{{training_job}} workers"),
            description="Jobs each shard holds, and the workers a sync step of each job waits "
                        "for."))
        .with_panel(graph(
            "Shard up", "none",
            q("optserve_shard_up", "{{instance}} serving"),
            q('up{job=~"optserve.*"}', "{{instance}} scraped"),
            description="1 while a shard serves and Prometheus reaches it."))
    )


DASHBOARDS = {"optimizer-health.json": optimizer_health, "service.json": service}


def render(build) -> str:
    dashboard = build().build()
    for number, panel in enumerate(dashboard.panels, start=1):
        panel.id_val = number  # the builders leave ids unset or 0; Grafana wants them unique
    return json.dumps(dashboard, cls=JSONEncoder, indent=2, sort_keys=True) + "\n"


def write(out: Path) -> list[Path]:
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for name, build in DASHBOARDS.items():
        path = out / name
        path.write_text(render(build))
        paths.append(path)
    return paths


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=OUT, help="folder for the JSON files")
    for path in write(parser.parse_args().out):
        print(path)


if __name__ == "__main__":
    main()
