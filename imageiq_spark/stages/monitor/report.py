"""`imageiq monitor`'s report of the newest window against the champion's baseline: a picture and
a Markdown table under storage.root (also logged to an MLflow run).

The picture always shows the predicted label mix and the confidence, and beside them the distribution of
every other variable a drift metric alerted on in the window (a brightness alert brings the
brightness CDFs, the KS statistic's gap marked). Everything comes from the counts `monitor`
already collected for the drift statistics: drawing reads no table.
"""

from __future__ import annotations

import datetime
import math
from collections.abc import Sequence
from pathlib import Path
from tempfile import TemporaryDirectory

import numpy as np
from matplotlib.axes import Axes
from matplotlib.figure import Figure

from imageiq_spark.core.config import Config
from imageiq_spark.lake import lakehouse
from imageiq_spark.lake.storage import write_bytes
from imageiq_spark.ml import drift
from imageiq_spark.ml.metrics import figure_png, plt
from imageiq_spark.stages.monitor.alerts import Alert, thresholds
from imageiq_spark.stages.monitor.counts import QUANTUM, Distributions, aligned_counts
from imageiq_spark.stages.monitor.windows import Champion

#: The variable whose baseline and window distributions each drift metric compares. A metric not
#: here (quarantine_rate: a share of files, with no baseline) has no panel; the title names it.
VARIABLE_OF: dict[str, str] = {"label_psi": "label", "label_js": "label", "format_psi": "format",
                               "confidence_wasserstein": "confidence", "accuracy_drop": "correct",
                               **{f"{name}_ks": name for name in QUANTUM}}
#: Always drawn, alert or not: what the champion predicts.
ALWAYS = ("label", "confidence")
#: Panels for alerting variables beyond ALWAYS; the title names the alerting metrics left out.
MAX_ALERT_PANELS = 6
NAMES = {"label": "predicted label mix", "format": "image format", "correct": "prediction correct"}
#: Predictions' baseline is the champion's val predictions, images' its train images (`monitor`).
PREDICTION_VARIABLES = ("label", "confidence", "correct")
COLUMNS = 4
SEVERITY_COLOURS = {"critical": "tab:red", "warning": "tab:orange"}


def panel_variables(alerts: Sequence[Alert]) -> tuple[list[str], list[str]]:
    """(the variables drawn, in order; the alerting metrics left without a panel)."""
    variables = list(ALWAYS)
    left_out = []
    for alert in alerts:
        variable = VARIABLE_OF.get(alert.metric)
        if variable in variables:
            continue
        if variable is None or len(variables) == len(ALWAYS) + MAX_ALERT_PANELS:
            left_out.append(alert.metric)
        else:
            variables.append(variable)
    return variables, left_out


def drift_figure(baseline: Distributions, window: Distributions, alerts: Sequence[Alert],
                 title: str) -> Figure:
    """One panel per variable of `panel_variables`, titled with its name and its alerts."""
    variables, left_out = panel_variables(alerts)
    columns = min(len(variables), COLUMNS)
    rows = math.ceil(len(variables) / columns)
    fig, axes = plt.subplots(rows, columns, figsize=(4.6 * columns, 3.6 * rows), squeeze=False,
                             layout="constrained")
    for ax, variable in zip(axes.flat, variables):
        base_name = f"baseline ({'val predictions' if variable in PREDICTION_VARIABLES else 'train images'})"
        if variable == "confidence":
            _confidence(ax, baseline, window, base_name)
        elif variable in QUANTUM:
            _cdfs(ax, variable, baseline, window, base_name)
        else:
            _share_bars(ax, variable, baseline, window, base_name)
        ax.legend(fontsize=8)
        text, colour = _title([a for a in alerts if VARIABLE_OF.get(a.metric) == variable], variable)
        ax.set_title(text, fontsize=10, color=colour)
    for ax in axes.flat[len(variables):]:
        ax.remove()
    if left_out:
        title += "\nalso alerting, without a panel: " + ", ".join(left_out)
    fig.suptitle(title)
    return fig


def panel_names(fig: Figure) -> list[str]:
    """The figure's panels by name: each title's first line."""
    return [ax.get_title().split("\n")[0] for ax in fig.axes]


def drift_picture(baseline: Distributions, window: Distributions, alerts: Sequence[Alert],
                  title: str) -> tuple[bytes, list[str]]:
    """`drift_figure` as PNG bytes, and its panels' names (the report's alt text)."""
    fig = drift_figure(baseline, window, alerts, title)
    names = panel_names(fig)
    return figure_png(fig), names


def _title(raised: list[Alert], variable: str) -> tuple[str, str]:
    """A panel's title (its name, then a line per alert) and colour (its worst alert's)."""
    lines = [NAMES.get(variable, variable)]
    lines += [f"{a.metric} {a.value:.3f} > {a.threshold:g} ({a.severity})" for a in raised]
    severities = {a.severity for a in raised}
    colour = next((c for severity, c in SEVERITY_COLOURS.items() if severity in severities), "black")
    return "\n".join(lines), colour


def _share_bars(ax: Axes, variable: str, baseline: Distributions, window: Distributions,
                baseline_name: str) -> None:
    """Categories' shares, baseline and window side by side."""
    base, current = baseline.categories.get(variable, {}), window.categories.get(variable, {})
    b, w = aligned_counts(base, current)
    x = np.arange(len(b))
    ax.bar(x - 0.2, drift.shares(b), 0.4, label=baseline_name)
    ax.bar(x + 0.2, drift.shares(w), 0.4, label="window")
    ax.set_xticks(x, sorted(set(base) | set(current)))
    ax.set_xlabel("predicted label" if variable == "label" else NAMES.get(variable, variable))
    ax.set_ylabel("share of predictions" if variable in PREDICTION_VARIABLES else "share of images")


def _confidence(ax: Axes, baseline: Distributions, window: Distributions, baseline_name: str) -> None:
    edges = np.linspace(0, 1, 21)
    for side, name in ((baseline, baseline_name), (window, "window")):
        if "confidence" in side.grids:
            values, counts = side.grids["confidence"]
            ax.hist(values, bins=edges, weights=counts / counts.sum(), alpha=0.55, label=name)
    ax.set_xlabel("confidence")
    ax.set_ylabel("share of predictions")


def _cdfs(ax: Axes, variable: str, baseline: Distributions, window: Distributions,
          baseline_name: str) -> None:
    """Both empirical CDFs, and the largest gap between them: the KS statistic an alert is on."""
    grid, cdf_base, cdf_window = drift.cdfs(*baseline.grids[variable], *window.grids[variable])
    ax.step(grid, cdf_base, where="post", label=baseline_name)
    ax.step(grid, cdf_window, where="post", label="window")
    at = int(np.argmax(np.abs(cdf_base - cdf_window)))
    ax.vlines(grid[at], cdf_base[at], cdf_window[at], colors="black", linestyles=":",
              label=f"largest gap {abs(cdf_base[at] - cdf_window[at]):.3f}")
    ax.set_xlabel(variable)
    ax.set_ylabel("share of images at or below")


# --- the report ------------------------------------------------------------------------------


def markdown_report(model: Champion, window: datetime.datetime, values: dict[str, float],
                    limits: dict[str, float | None], alerts: Sequence[Alert], picture: str,
                    panels: list[str]) -> str:
    """The window's metrics against their thresholds (`alerts`: the window's), and the picture."""
    raised = {a.metric for a in alerts}
    lines = [f"# Drift of {model.name} version {model.version}, window {window:%Y-%m-%d %H:%M}", "",
             f"Baseline: the champion's training data (preprocess version {model.preprocess_version}, "
             f"prepared before {model.trained_at:%Y-%m-%d %H:%M:%S} UTC).", "",
             "| metric | value | threshold | alert |", "|---|---|---|---|"]
    for metric, value in sorted(values.items()):
        limit = limits.get(metric)
        lines.append(f"| {metric} | {value:.4f} | {'-' if limit is None else limit} | "
                     f"{'**yes**' if metric in raised else ''} |")
    lines += ["", f"![{', '.join(panels)}]({picture})", ""]
    return "\n".join(lines)


def write_report(config: Config, model: Champion, baseline: Distributions, window: Distributions,
                 start: datetime.datetime, latest: dict[str, float], alerts: Sequence[Alert]) -> str:
    """PNG + Markdown of the latest window (its metrics `latest`, its `alerts`) under storage.root,
    also logged to an MLflow run."""
    import mlflow

    from imageiq_spark.lake.tracking import configure_mlflow, redact_run_tags

    picture = "drift.png"
    png, panels = drift_picture(baseline, window, alerts,
                                f"{model.name} v{model.version}, window {start:%Y-%m-%d %H:%M}")
    text = markdown_report(model, start, latest, thresholds(config), alerts, picture, panels)
    folder = lakehouse.lake_path(config, "reports", "monitor", config.catalog.database, model.name,
                                 f"v{model.version}", f"{start:%Y%m%dT%H%M}")
    write_bytes(f"{folder}/{picture}", png)
    write_bytes(f"{folder}/report.md", text.encode())
    configure_mlflow(config)
    with mlflow.start_run(run_name=f"monitor {start:%Y-%m-%d %H:%M}",
                          tags={"imageiq.stage": "monitor", "model_version": model.version}), \
            TemporaryDirectory() as tmp:
        redact_run_tags(mlflow.active_run().info.run_id)
        mlflow.log_metrics({k: v for k, v in latest.items() if np.isfinite(v)})
        (Path(tmp) / picture).write_bytes(png)
        (Path(tmp) / "report.md").write_text(text)
        mlflow.log_artifacts(tmp, artifact_path="monitor")
    return f"{folder}/report.md"
