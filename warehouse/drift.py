"""The drift report: serving's sampled pools against the served version's training baseline.

`check` reads both samples (Redis stream, registry artifact), compares them (common/drift.py),
records the outcome beside the version's manifest (marking it on drift), and writes drift.json
and drift.html. The page draws with plotly, as the warehouse report does, plotly.js inline.
"""

from __future__ import annotations

import html
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

import plotly.graph_objects as go
import redis

from common.drift import DriftReport, compare, load_baseline, read_served, record
from common.redis_server import connect
from common.registry import Registry, RegistryError
from common.settings import Settings

JSON_NAME = "drift.json"
HTML_NAME = "drift.html"
DETAIL_FEATURES = 4  # the features with the largest PSI get their binned shares drawn


@dataclass
class DriftOutcome:
    report: DriftReport
    newly_marked: bool  # this check marked the version drifted (a retrain is due)
    json_path: Path
    html_path: Path


def check(settings: Settings, out_dir: Path, since: datetime | None = None, version: str | None = None) -> DriftOutcome:
    """Compare, record and write the report for `version` (default: the serving one)."""
    registry = Registry(settings.models.root)
    version = version or registry.current()
    if version is None:
        raise RegistryError(f"no model version is active under {registry.root_url}")
    baseline = load_baseline(registry, version)
    if baseline is None:
        raise RegistryError(f"model {version} keeps no drift baseline (trained before drift monitoring?)")
    client = connect(settings.redis.effective_url, settings.redis.socket_timeout_s)
    try:
        served = read_served(client, since.timestamp() if since else None, version)
    except redis.RedisError as exc:
        raise RuntimeError(f"cannot read the served sample from Redis: {exc}") from exc
    finally:
        client.close()
    report = compare(baseline, served, settings.drift, version, since)
    newly_marked = record(registry, report)
    out_dir.mkdir(parents=True, exist_ok=True)
    json_path, html_path = out_dir / JSON_NAME, out_dir / HTML_NAME
    json_path.write_text(report.model_dump_json(indent=2), encoding="utf-8")
    html_path.write_text(render(report, marked=registry.drift_marker(version) is not None), encoding="utf-8")
    return DriftOutcome(report, newly_marked, json_path, html_path)


def table_rows(report: DriftReport) -> list[tuple[str, str, str, str]]:
    """(quantity, PSI, KS, flag) lines for the terminal, features by PSI, largest first."""
    threshold = report.psi_threshold
    rows = []
    for d in (report.score, report.categories, *sorted(report.features, key=lambda d: -d.psi)):
        ks = f"{d.ks:.3f}" if d.ks is not None else "—"
        rows.append((d.name, f"{d.psi:.3f}", ks, "DRIFT" if d.psi > threshold else ""))
    cold = report.cold_start
    rows.append(("cold-start share", f"{cold['baseline']:.1%} -> {cold['served']:.1%}", "—", ""))
    return rows


# ---------------------------------------------------------------- the page


def psi_figure(report: DriftReport) -> go.Figure:
    features = sorted(report.features, key=lambda d: -d.psi)
    fig = go.Figure(
        go.Bar(
            x=[d.name for d in features],
            y=[d.psi for d in features],
            marker_color=["#d62728" if d.psi > report.psi_threshold else "#1f77b4" for d in features],
            customdata=[d.ks for d in features],
            hovertemplate="%{x}<br>PSI %{y:.3f}<br>KS %{customdata:.3f}<extra></extra>",
        )
    )
    fig.add_hline(y=report.psi_threshold, line_dash="dash", annotation_text="threshold")
    fig.update_layout(title="PSI per feature (served vs training), largest first", height=420, yaxis_title="PSI")
    return fig


def score_figure(report: DriftReport) -> go.Figure:
    plot = report.score_plot
    centres = _centres(plot.edges)
    fig = go.Figure()
    fig.add_trace(go.Bar(x=centres, y=plot.baseline, name="training", opacity=0.6))
    fig.add_trace(go.Bar(x=centres, y=plot.served, name="served", opacity=0.6))
    fig.update_layout(
        barmode="overlay", height=380, xaxis_title="ranker score", yaxis_title="share of rows", yaxis_tickformat=".0%",
        title=f"Score distribution: PSI {report.score.psi:.3f}, KS {report.score.ks or 0:.3f}",
    )  # fmt: skip
    return fig


def category_figure(report: DriftReport) -> go.Figure:
    names = report.category_names
    fig = go.Figure()
    fig.add_trace(go.Bar(x=names, y=report.categories.baseline, name="training (top 10 by score)"))
    fig.add_trace(go.Bar(x=names, y=report.categories.served, name="served"))
    fig.update_layout(
        barmode="group", height=380, yaxis_tickformat=".0%", yaxis_title="share of served items",
        title=f"Category mix of served items: PSI {report.categories.psi:.3f}",
    )  # fmt: skip
    return fig


def detail_figure(report: DriftReport) -> go.Figure:
    from plotly.subplots import make_subplots

    top = sorted(report.features, key=lambda d: -d.psi)[:DETAIL_FEATURES]
    fig = make_subplots(rows=1, cols=max(1, len(top)), subplot_titles=[f"{d.name} (PSI {d.psi:.2f})" for d in top])
    for col, d in enumerate(top, start=1):
        labels = _bin_labels(d.edges)
        fig.add_trace(go.Bar(x=labels, y=d.baseline, name="training", marker_color="#1f77b4", showlegend=col == 1), 1, col)
        fig.add_trace(go.Bar(x=labels, y=d.served, name="served", marker_color="#ff7f0e", showlegend=col == 1), 1, col)
    fig.update_yaxes(tickformat=".0%")
    fig.update_layout(barmode="group", height=360, title="Shares per training-quantile bin, most drifted features")
    return fig


CHARTS = (
    ("psi", "Feature drift", psi_figure),
    ("scores", "Scores", score_figure),
    ("categories", "Category mix", category_figure),
    ("details", "Most drifted features", detail_figure),
)


def render(report: DriftReport, marked: bool) -> str:
    sections = []
    for index, (div_id, heading, build) in enumerate(CHARTS):
        chart = build(report).to_html(full_html=False, include_plotlyjs=index == 0, div_id=div_id)
        sections.append(f"<section><h2>{html.escape(heading)}</h2>\n{chart}\n</section>")
    cold = report.cold_start
    summary = [
        ("Model version", report.version + (" (marked drifted in the registry)" if marked else "")),
        ("Verdict", "DRIFT" if report.drifted else "no drift" if report.note is None else "not judged"),
        ("Reasons", "; ".join(report.reasons) or "—"),
        ("Served sample", f"{report.served_requests:,} requests, {report.served_rows:,} rows"
         + (f" since {report.since:%Y-%m-%d %H:%M UTC}" if report.since else "")),
        ("Training baseline", f"{report.baseline_requests:,} requests, {report.baseline_rows:,} rows"),
        ("Largest feature PSI", f"{report.psi_max:.3f} (threshold {report.psi_threshold:g})"),
        ("Cold-start requests", f"{cold['baseline']:.1%} in training, {cold['served']:.1%} served"),
    ]  # fmt: skip
    if report.note:
        summary.append(("Note", report.note))
    rows = "".join(f"<tr><th>{html.escape(k)}</th><td>{html.escape(v)}</td></tr>" for k, v in summary)
    verdict = "drift" if report.drifted else "steady"
    return PAGE.format(
        stamp=f"{report.created_at:%Y-%m-%d %H:%M UTC}", summary=rows, verdict=verdict, sections="\n".join(sections)
    )


def _centres(edges: list[float]) -> list[float]:
    if len(edges) < 2:
        return [edges[0] if edges else 0.0] * (len(edges) + 1)
    width = edges[1] - edges[0]
    return [edges[0] - width / 2, *[e + width / 2 for e in edges]]


def _bin_labels(edges: list[float]) -> list[str]:
    if not edges:
        return ["all"]
    return [f"< {edges[0]:.3g}", *[f"≥ {e:.3g}" for e in edges]]


PAGE = """<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<title>Lambdarec drift report</title>
<style>
body {{ font-family: system-ui, sans-serif; margin: 2rem auto; max-width: 1100px; color: #222; }}
table.summary {{ border-collapse: collapse; margin-bottom: 1.5rem; }}
table.summary th, table.summary td {{ padding: .25rem 1rem; border-bottom: 1px solid #ddd; text-align: left; }}
.drift {{ color: #b00; }} .steady {{ color: #070; }}
section {{ margin-top: 2rem; }}
footer {{ color: #777; font-size: .85rem; margin-top: 2rem; }}
</style>
</head>
<body>
<h1>Lambdarec drift report <span class="{verdict}">({verdict})</span></h1>
<p>Generated {stamp}. Served: a sample of the ranker's pools (features and scores of a few rows each) and the
categories of the items served; training: the same of the version's training requests, the categories of each
one's top 10 by score.</p>
<table class="summary">{summary}</table>
{sections}
<footer>PSI = Σ (served − training) · ln(served / training) over the training sample's quantile bins (shares
floored at 0.01%); KS = the largest gap between the two empirical distribution functions. Rows of one request
share its person, so KS p-values would overstate confidence and are not shown. Cold start = no batch vector of
the person was used (new, anonymous or without personalisation consent).</footer>
</body>
</html>
"""
