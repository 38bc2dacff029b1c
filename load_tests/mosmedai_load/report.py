"""The planner's report: one self-contained HTML file (PNG plots inlined as base64) and a
Markdown twin (plots written beside it as PNG files)."""
from __future__ import annotations

import base64
import html
import io
from pathlib import Path

import numpy as np

from mosmedai_load import arrivals as arrivals_mod

WEEK_S = 7 * 86400
#: The designs' names in the printed tables and the report (keys: capacity.DESIGNS).
DESIGN_TITLES = {"regional": "a pool per region", "district": "a pool per federal district",
                 "district_spill": "per district, with spill-over", "national": "one national pool"}


def _figure_png(fig) -> bytes:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=90, bbox_inches="tight")
    import matplotlib.pyplot as plt

    plt.close(fig)
    return buffer.getvalue()


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_national_load(scenario, day: int = 2) -> bytes:
    """Expected studies per UTC hour of one day, stacked by the regions' UTC offset."""
    plt = _plt()
    expected = arrivals_mod.expected_hourly(scenario)
    by_offset: dict[int, np.ndarray] = {}
    for code, series in expected.items():
        offset = scenario.regions[code].utc_offset_hours
        by_offset[offset] = by_offset.get(offset, 0) + series[day * 24:(day + 1) * 24]
    offsets = sorted(by_offset)
    fig, ax = plt.subplots(figsize=(9, 4))
    colors = plt.cm.viridis(np.linspace(0, 1, len(offsets)))
    ax.stackplot(np.arange(24), [by_offset[o] for o in offsets], labels=[f"UTC+{o}" for o in offsets],
                 colors=colors, step="post")
    weekday = ("Mon", "Tue", "Wed", "Thu", "Fri", "Sat", "Sun")[(scenario.start_weekday + day) % 7]
    ax.set(xlabel="hour of the day (UTC; Moscow = UTC+3)", ylabel="studies per hour (expected)",
           title=f"National load by hour, a {weekday}, by the regions' time zone", xlim=(0, 23))
    ax.legend(ncol=2, fontsize=8, loc="upper right")
    ax.grid(alpha=0.3)
    return _figure_png(fig)


def plot_replicas_by_region(result, day: int = 2, top: int = 30) -> bytes:
    """Replicas of each pool over one day (UTC), from the operator-policy plan."""
    plt = _plt()
    pools = sorted(result.pools, key=lambda p: -p.studies)[:top]
    ticks = len(pools[0].plan)
    tick_s = WEEK_S / ticks
    lo, hi = int(day * 86400 / tick_s), int((day + 1) * 86400 / tick_s)
    grid = np.array([p.plan[lo:hi] for p in pools])
    fig, ax = plt.subplots(figsize=(10, 0.25 * len(pools) + 1.5))
    image = ax.imshow(grid, aspect="auto", cmap="magma_r", interpolation="nearest",
                      extent=(0, 24, len(pools) - 0.5, -0.5))
    ax.set_yticks(range(len(pools)), [p.pool for p in pools], fontsize=7)
    ax.set(xlabel="hour of the day (UTC)", title=f"Replicas per pool over a day ({result.design}; "
                                                  f"{len(pools)} busiest pools)")
    fig.colorbar(image, ax=ax, label="replicas")
    return _figure_png(fig)


def plot_ttr(results, slo_s: float) -> bytes:
    plt = _plt()
    fig, ax = plt.subplots(figsize=(8, 4))
    for r in results:
        values = np.sort(r.ttr_sample)
        if len(values):
            ax.plot(values, np.arange(1, len(values) + 1) / len(values), label=f"{r.design} (p95 {r.p95_s:.1f} s)")
    ax.axvline(slo_s, color="red", linestyle="--", label=f"SLO {slo_s:.0f} s")
    ax.axhline(0.95, color="grey", linestyle=":")
    ax.set(xscale="log", xlabel="time to result, s (log)", ylabel="fraction of studies",
           title="Time-to-result distribution (all studies of the quarter, sampled)")
    ax.legend()
    ax.grid(alpha=0.3, which="both")
    return _figure_png(fig)


def plot_cost(results) -> bytes:
    plt = _plt()
    fig, ax = plt.subplots(figsize=(7, 3.5))
    names = [r.design for r in results]
    bars = ax.bar(names, [r.cost for r in results], color=["#4472c4", "#ed7d31", "#ffc000", "#70ad47"][:len(results)])
    for bar, r in zip(bars, results):
        ax.annotate(f"{r.gpus} GPUs\n{r.gpu_hours:,.0f} GPU-h", (bar.get_x() + bar.get_width() / 2, bar.get_height()),
                    ha="center", va="bottom", fontsize=8)
    ax.set(ylabel="cost per quarter (profile's price units)", title="Cost by design")
    ax.margins(y=0.25)
    return _figure_png(fig)


def _table_html(headers, rows) -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in headers)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(str(c))}</td>" for c in row) + "</tr>" for row in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


def _table_md(headers, rows) -> str:
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def spill_table(results) -> tuple[list[str], list[list]]:
    """Per district pool: studies spilled out and in, p95 and GPUs without and with spill-over."""
    spill = next((r for r in results if r.design == "district_spill"), None)
    if spill is None:
        return [], []
    base = {p.pool: p for r in results if r.design == "district" for p in r.pools}
    headers = ["pool", "neighbour", "studies", "spilled out", "spilled in", "p95 s without", "p95 s with",
               "GPUs without", "GPUs with"]
    rows = []
    for p in spill.pools:
        b = base.get(p.pool)
        rows.append([p.pool, p.neighbour or "-", f"{p.studies:,}", f"{p.spilled_out:,}", f"{p.spilled_in:,}",
                     f"{b.p95_s:.2f}" if b else "-", f"{p.p95_s:.2f}", b.gpus if b else "-", p.gpus])
    return headers, rows


def write_capacity_report(out: Path, scenario, profile, results, timings) -> tuple[Path, Path]:
    plots: list[tuple[str, str, bytes]] = [
        ("national_load", "National load by hour and time zone", plot_national_load(scenario)),
    ]
    first = next((r for r in results if r.design == "regional"), results[0] if results else None)
    if first is not None and first.pools:
        plots.append(("replicas", "Replicas by region over a day", plot_replicas_by_region(first)))
    plots.append(("time_to_result", "Time-to-result distributions", plot_ttr(results, scenario.slo_p95_s)))
    plots.append(("cost", "Cost by design", plot_cost(results)))

    summary_headers = ["design", "pools", "GPUs (peak)", "GPU-hours", "cost", "p95 s", "p99 s", "within SLO", "simulated in s"]
    summary = [[DESIGN_TITLES[r.design], len(r.pools), r.gpus, f"{r.gpu_hours:,.0f}", f"{r.cost:,.0f}", f"{r.p95_s:.2f}",
                f"{r.p99_s:.2f}", f"{100 * r.within_slo:.2f} %", f"{r.seconds:.1f}"] for r in results]
    pool_headers = ["design", "pool", "regions", "studies", "GPUs", "mean replicas", "utilisation", "target util.",
                    "p95 s", "p99 s", "mean batch", "cost", "meets SLO"]
    pool_rows = [[r.design, p.pool, len(p.regions), f"{p.studies:,}", p.gpus, f"{p.mean_replicas:.2f}",
                  f"{100 * p.utilisation:.1f} %", f"{100 * p.target_utilisation:.0f} %", f"{p.p95_s:.2f}",
                  f"{p.p99_s:.2f}", f"{p.mean_batch:.2f}", f"{p.cost:,.0f}", "yes" if p.meets_slo else "NO"]
                 for r in results for p in sorted(r.pools, key=lambda p: -p.studies)]
    total = sum(p.studies for p in results[0].pools) if results else 0
    facts = [
        ("studies simulated", f"{total:,} over {scenario.days} days (regional {scenario.regional_studies():,.0f}, "
                              f"Moscow {scenario.moscow_studies():,.0f}, growth x{scenario.growth})"),
        ("connected regions", f"{len(scenario.connected)} (+ Moscow's own volume)" if scenario.include_moscow else str(len(scenario.connected))),
        ("modality mix", ", ".join(f"{m.name} {100 * m.share:.0f} %" for m in scenario.mix)),
        ("SLO", f"p95 time-to-result <= {scenario.slo_p95_s:.0f} s"),
        ("service-time profile", f"{profile.name}: {profile.source or 'measured by mosmedai profile'}; "
                                 f"{profile.cost_per_gpu_hour} per GPU-hour; service CV {profile.service_cv}"),
        ("planner run", ", ".join(f"{k} {v:.1f} s" for k, v in timings.items())),
    ]
    method = ("Each pool's replicas follow the GpuPool operator's policy (mosmedai_operator.policy.decide) on an "
              "images/s-per-replica target, fed the expected load every decision interval over a week; the quarter "
              "is then replayed study by study (FIFO, dynamic batching up to the profile's largest batch). "
              "The target is lowered from 90 % of a replica's batch-1 throughput until the pool's p95 meets the SLO. "
              "GPUs = the pool's peak replicas; cost = provisioned GPU-hours x price. With spill-over "
              "(district_spill) the district pools are replayed together: a study whose wait at its own pool "
              "would pass the threshold goes to the neighbour district's pool after a transfer delay, when the "
              "wait there is shorter; a pool's p95 is that of its own regions' studies, wherever served.")

    html_parts = ["<!doctype html><html><head><meta charset='utf-8'><title>mosmedai capacity plan</title><style>",
                  "body{font-family:sans-serif;max-width:1100px;margin:2em auto;color:#222}table{border-collapse:collapse;"
                  "font-size:13px;margin:1em 0}td,th{border:1px solid #ccc;padding:3px 7px;text-align:right}"
                  "th{background:#eee}img{max-width:100%}</style></head><body>",
                  "<h1>mosmedai capacity plan</h1>",
                  _table_html(["what", "value"], facts), f"<p>{html.escape(method)}</p>",
                  "<h2>Designs</h2>", _table_html(summary_headers, summary)]
    md_parts = ["# mosmedai capacity plan", "", _table_md(["what", "value"], facts), "", method, "",
                "## Designs", "", _table_md(summary_headers, summary), ""]
    for name, title, png in plots:
        (out / f"{name}.png").write_bytes(png)
        html_parts.append(f"<h2>{html.escape(title)}</h2><img alt='{name}' src='data:image/png;base64,"
                          f"{base64.b64encode(png).decode()}'>")
        md_parts += [f"## {title}", "", f"![{title}]({name}.png)", ""]
    spill_headers, spill_rows = spill_table(results)
    notes = [f"{r.design}: {note}" for r in results for note in r.notes]
    if spill_rows:
        html_parts += ["<h2>Spill-over between district pools</h2>", _table_html(spill_headers, spill_rows)]
        md_parts += ["## Spill-over between district pools", "", _table_md(spill_headers, spill_rows), ""]
    if notes:
        html_parts += ["<ul>", *[f"<li>{html.escape(n)}</li>" for n in notes], "</ul>"]
        md_parts += [*[f"- {n}" for n in notes], ""]
    html_parts += ["<h2>Pools</h2>", _table_html(pool_headers, pool_rows), "</body></html>"]
    md_parts += ["## Pools", "", _table_md(pool_headers, pool_rows), ""]
    html_path, md_path = out / "report.html", out / "report.md"
    html_path.write_text("".join(html_parts))
    md_path.write_text("\n".join(md_parts))
    return html_path, md_path
