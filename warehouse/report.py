"""The analyst report: one self-contained HTML page of plotly charts read from the warehouse views.

plotly.js is embedded once in the page, so the file opens offline and can be mailed around.
"""

from __future__ import annotations

import html
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

import duckdb
import plotly.graph_objects as go
from plotly.subplots import make_subplots

TOP_ITEMS = 15
FUNNEL_STEPS = ("Viewed", "Added to cart", "Purchased")
MAX_FUNNEL_DEVICES = 5


def _rows(con: duckdb.DuckDBPyConnection, sql: str) -> list[dict[str, Any]]:
    cursor = con.execute(sql)
    names = [d[0] for d in cursor.description or []]
    return [dict(zip(names, row, strict=True)) for row in cursor.fetchall()]


def _no_data(fig: go.Figure, what: str) -> go.Figure:
    fig.add_annotation(text=f"No {what} yet", showarrow=False, x=0.5, y=0.5, xref="paper", yref="paper")
    fig.update_xaxes(visible=False)
    fig.update_yaxes(visible=False)
    return fig


def kpi_figure(con: duckdb.DuckDBPyConnection) -> go.Figure:
    """Daily users and sessions, cart and conversion rates, revenue and AOV."""
    kpis = _rows(con, "SELECT * FROM daily_kpis ORDER BY day")
    fig = make_subplots(
        rows=2,
        cols=2,
        subplot_titles=("Active users and sessions", "Add-to-cart and conversion rate", "Revenue", "AOV"),
    )
    if not kpis:
        return _no_data(fig, "events")
    days = [k["day"] for k in kpis]
    series = (
        ("Active users", "active_users", 1, 1),
        ("Sessions", "sessions", 1, 1),
        ("Add-to-cart rate", "add_to_cart_rate", 1, 2),
        ("Conversion rate", "conversion_rate", 1, 2),
        ("Revenue", "revenue", 2, 1),
        ("AOV", "aov", 2, 2),
    )
    for name, column, row, col in series:
        fig.add_trace(
            go.Scatter(x=days, y=[k[column] for k in kpis], name=name, mode="lines+markers"), row, col
        )
    fig.update_yaxes(tickformat=".1%", row=1, col=2)
    fig.update_layout(height=620, title="KPIs over time (UTC day a session started)")
    return fig


def funnel_figure(con: duckdb.DuckDBPyConnection) -> go.Figure:
    """Sessions reaching view, cart and purchase over the whole lake, per device."""
    by_device = _rows(
        con,
        "SELECT device, sum(viewed) AS viewed, sum(carted) AS carted, sum(purchased) AS purchased "
        f"FROM funnel GROUP BY device ORDER BY viewed DESC LIMIT {MAX_FUNNEL_DEVICES}",
    )
    fig = go.Figure()
    if not by_device:
        return _no_data(fig, "sessions")
    for row in by_device:
        counts = [row["viewed"], row["carted"], row["purchased"]]
        fig.add_trace(
            go.Funnel(name=row["device"], y=list(FUNNEL_STEPS), x=counts, textinfo="value+percent initial")
        )
    fig.update_layout(title="Session funnel by device: view → cart → purchase", height=460)
    return fig


def ctr_figure(con: duckdb.DuckDBPyConnection) -> go.Figure:
    """List CTR and user conversion per variant, with their 95% Wilson intervals."""
    results = _rows(con, "SELECT * FROM experiment_results ORDER BY variant")
    fig = make_subplots(rows=1, cols=2, subplot_titles=("CTR (lists clicked / served)", "Conversion (users)"))
    if not results:
        return _no_data(fig, "served recommendations")
    names = [f"{r['variant']} (control)" if r["is_control"] else r["variant"] for r in results]
    for col, (rate, low, high) in enumerate(
        (("ctr", "ctr_low", "ctr_high"), ("conversion", "conversion_low", "conversion_high")), start=1
    ):
        fig.add_trace(
            go.Bar(
                x=names,
                y=[r[rate] for r in results],
                name=rate,
                error_y={
                    "type": "data",
                    "symmetric": False,
                    "array": [r[high] - r[rate] for r in results],
                    "arrayminus": [r[rate] - r[low] for r in results],
                },
                customdata=[[r[low], r[high], r["lists"], r["users"]] for r in results],
                hovertemplate="%{x}: %{y:.2%} [%{customdata[0]:.2%}, %{customdata[1]:.2%}]<extra></extra>",
            ),
            1,
            col,
        )
    fig.update_yaxes(tickformat=".0%", rangemode="tozero")
    fig.update_layout(title="Recommendations by variant, 95% Wilson intervals", showlegend=False, height=440)
    return fig


def model_figure(con: duckdb.DuckDBPyConnection) -> go.Figure:
    """Each offline metric per strategy across model versions, oldest first."""
    runs = _rows(
        con,
        "SELECT version, created_at, status, decision, is_current, strategy, metric, value "
        "FROM model_runs WHERE metric IS NOT NULL ORDER BY created_at, version",
    )
    metrics = sorted({r["metric"] for r in runs})
    fig = make_subplots(rows=max(len(metrics), 1), cols=1, subplot_titles=metrics or None, shared_xaxes=True)
    if not runs:
        return _no_data(fig, "model versions")
    for index, metric in enumerate(metrics, start=1):
        for strategy in sorted({r["strategy"] for r in runs if r["metric"] == metric}):
            points = [r for r in runs if r["metric"] == metric and r["strategy"] == strategy]
            fig.add_trace(
                go.Scatter(
                    x=[r["version"] for r in points],
                    y=[r["value"] for r in points],
                    name=strategy,
                    legendgroup=strategy,
                    showlegend=index == 1,
                    mode="lines+markers",
                    text=[_version_note(r) for r in points],
                    hovertemplate="%{x} " + strategy + ": %{y:.4f}<br>%{text}<extra></extra>",
                ),
                index,
                1,
            )
    fig.update_layout(title="Offline metrics per model version", height=max(300, 240 * len(metrics)))
    return fig


def _version_note(run: dict[str, Any]) -> str:
    current = " (serving)" if run["is_current"] else ""
    return html.escape(f"{run['status']}{current}: {run['decision'] or ''}")


def top_items_figure(con: duckdb.DuckDBPyConnection) -> go.Figure:
    """The best-selling items by revenue (by views where nothing sold)."""
    items = _rows(
        con,
        "SELECT item_id, coalesce(title, item_id) AS label, views, purchases, revenue, conversion "
        f"FROM item_stats ORDER BY revenue DESC, views DESC, item_id LIMIT {TOP_ITEMS}",
    )
    fig = go.Figure()
    if not items:
        return _no_data(fig, "items")
    measure = "revenue" if any(i["revenue"] for i in items) else "views"
    items = list(reversed(items))  # plotly draws horizontal bars bottom-up
    fig.add_trace(
        go.Bar(
            x=[i[measure] for i in items],
            y=[f"{i['label']} ({i['item_id']})" for i in items],
            orientation="h",
            customdata=[[i["views"], i["purchases"]] for i in items],
            hovertemplate="%{y}: %{x}<br>views %{customdata[0]}, purchases %{customdata[1]}<extra></extra>",
        )
    )
    fig.update_layout(title=f"Top {TOP_ITEMS} items by {measure}", height=120 + 28 * len(items))
    return fig


# (div id, section heading, figure builder), in page order.
CHARTS: tuple[tuple[str, str, Callable[[duckdb.DuckDBPyConnection], go.Figure]], ...] = (
    ("chart-kpis", "KPIs over time", kpi_figure),
    ("chart-funnel", "Funnel", funnel_figure),
    ("chart-ctr", "Recommendation CTR by variant", ctr_figure),
    ("chart-models", "Model metric history", model_figure),
    ("chart-top-items", "Top items", top_items_figure),
)


def summary_rows(con: duckdb.DuckDBPyConnection) -> list[tuple[str, str]]:
    """Headline figures over the whole lake."""
    total = _rows(
        con,
        "SELECT min(day) AS first_day, max(day) AS last_day, sum(sessions) AS sessions, "
        "sum(orders) AS orders, sum(revenue) AS revenue FROM daily_kpis",
    )[0]
    (people,) = con.execute("SELECT count(DISTINCT person_id) FROM events").fetchone() or (0,)
    (events,) = con.execute("SELECT count(*) FROM events").fetchone() or (0,)
    sessions, orders, revenue = total["sessions"] or 0, total["orders"] or 0, total["revenue"] or 0.0
    return [
        ("Period (UTC)", f"{total['first_day'] or '—'} to {total['last_day'] or '—'}"),
        ("Events", f"{events:,}"),
        ("People", f"{people:,}"),
        ("Sessions", f"{sessions:,}"),
        ("Orders", f"{orders:,}"),
        ("Conversion rate", f"{orders / sessions:.2%}" if sessions else "—"),
        ("Revenue", f"{revenue:,.2f}"),
        ("AOV", f"{revenue / orders:,.2f}" if orders else "—"),
    ]


def render_report(con: duckdb.DuckDBPyConnection) -> str:
    """The whole page as one HTML string."""
    sections = []
    for index, (div_id, heading, build) in enumerate(CHARTS):
        # The first chart carries plotly.js inline; the rest reuse it.
        chart = build(con).to_html(full_html=False, include_plotlyjs=index == 0, div_id=div_id)
        sections.append(f"<section><h2>{html.escape(heading)}</h2>\n{chart}\n</section>")
    summary = "".join(
        f"<tr><th>{html.escape(k)}</th><td>{html.escape(v)}</td></tr>" for k, v in summary_rows(con)
    )
    built_at = con.execute("SELECT built_at FROM warehouse_info").fetchone()
    stamp = datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC")
    return PAGE.format(
        stamp=stamp,
        built=html.escape(str(built_at[0]) if built_at else "unknown"),
        summary=summary,
        sections="\n".join(sections),
    )


PAGE = """<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<title>Lambdarec warehouse report</title>
<style>
body {{ font-family: system-ui, sans-serif; margin: 2rem auto; max-width: 1100px; color: #222; }}
table.summary {{ border-collapse: collapse; margin-bottom: 1.5rem; }}
table.summary th, table.summary td {{ padding: .25rem 1rem; border-bottom: 1px solid #ddd; text-align: left; }}
section {{ margin-top: 2rem; }}
footer {{ color: #777; font-size: .85rem; margin-top: 2rem; }}
</style>
</head>
<body>
<h1>Lambdarec warehouse report</h1>
<p>Generated {stamp}; warehouse built {built}. Days are UTC; sessions split after 30 idle minutes.</p>
<table class="summary">{summary}</table>
{sections}
<footer>CTR = lists with a click / lists served; conversion = users with a purchase attributed to a
recommendation click (same item, same person, within 24 h, last click) / users served. Intervals are
95% Wilson score intervals. Query the same figures with <code>recs warehouse sql</code>.</footer>
</body>
</html>
"""
