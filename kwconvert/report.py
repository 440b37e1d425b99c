"""A plan as one self-contained HTML page: ``kwconvert MODEL --dry-run --report plan.html``.

The dry run's tables say what each warehouse holds; the page adds what tables cannot show
at a glance: the network's convertible layers in the order they run, each coloured by the
warehouse it draws its cells from (grey: kept static, with the reason), and how the
converted model's size follows the budget from 1/4 to 4.  One file, no script, no link to
anything outside it: it opens offline, in a mail, in a CI artifact.
"""
from __future__ import annotations

import html
import math
import os
from pathlib import Path
from typing import Sequence

from .files import atomic_file
from .formatting import dims
from .plan import Plan, WarehousePlan

__all__ = ["SWEEP_BUDGETS", "html_report", "write_report"]

#: The budgets of the page's chart (the paper's Table 14 spans 1/4 to 4).
SWEEP_BUDGETS = (0.25, 0.5, 1.0, 2.0, 4.0)
_STATIC_COLOUR = "#d9d9d9"
_STYLE = """
body { font: 14px/1.4 system-ui, sans-serif; margin: 24px; color: #222; }
h1 { font-size: 20px; } h2 { font-size: 16px; margin-top: 28px; }
.flow { display: flex; flex-wrap: wrap; gap: 6px; align-items: stretch; }
.layer { border: 1px solid #888; border-radius: 4px; padding: 4px 6px; min-width: 120px; font-size: 12px; }
.layer .name { font-weight: 600; } .layer .detail { color: #333; }
.legend span { display: inline-block; padding: 2px 8px; margin: 2px; border-radius: 3px; border: 1px solid #888; }
table { border-collapse: collapse; margin: 8px 0; } th, td { border: 1px solid #bbb; padding: 3px 8px; }
td.num { text-align: right; font-variant-numeric: tabular-nums; } th { background: #f2f2f2; }
.note { color: #555; }
"""


def colour(index: int) -> str:
    """A warehouse's colour: hues a golden angle apart, so neighbours never look alike."""
    return f"hsl({(index * 137.508) % 360:.0f}, 65%, 72%)"


def html_report(plan: Plan, sweep: Sequence[Plan] = (), order: Sequence[str] | None = None) -> str:
    """The page for ``plan``; ``sweep`` are plans of the same model at other budgets (the
    chart), ``order`` the layer names in execution order (default: warehouse by warehouse,
    then the static layers)."""
    colours = {w.name: colour(i) for i, w in enumerate(plan.warehouses)}
    where = f" (module {plan.module})" if plan.module else ""
    title = f"kwconvert plan: {plan.model}{where} at budget {plan.budget:g}"
    parts = [f"<h1>{_e(title)}</h1>",
             f"<p>{plan.params_baseline:,} parameters before, {plan.params_converted:,} after "
             f"(ratio {plan.ratio:.3f}); {len(plan.warehouses)} warehouses hold "
             f"{len(plan.converted_layers)} layers, {len(plan.plain)} layers stay static.</p>",
             "<h2>Layers in execution order</h2>", _legend(plan, colours), _flow(plan, colours, order),
             "<h2>Warehouses</h2>", _warehouse_table(plan, colours)]
    if plan.plain:
        parts += ["<h2>Static layers</h2>", _static_table(plan)]
    if sweep:
        parts += ["<h2>Parameters against the budget</h2>", _chart(plan, sweep)]
    parts += [f'<p class="note">note: {_e(note)}</p>' for note in plan.notes]
    return ("<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
            f"<title>{_e(title)}</title><style>{_STYLE}</style></head><body>\n"
            + "\n".join(parts) + "\n</body></html>\n")


def write_report(path: str | os.PathLike, page: str) -> Path:
    """Write ``page`` to ``path`` whole or not at all (:func:`kwconvert.files.atomic_file`)."""
    target = Path(path)
    with atomic_file(target, ".html") as staging:
        staging.write_text(page, encoding="utf-8")
    return target


def _e(text: object) -> str:
    return html.escape(str(text), quote=True)


def _legend(plan: Plan, colours: dict[str, str]) -> str:
    items = [f'<span style="background:{colours[w.name]}">{_e(w.name)}: n {w.n}, cell {dims(w.cell)}</span>'
             for w in plan.warehouses]
    items.append(f'<span style="background:{_STATIC_COLOUR}">static</span>')
    return f'<div class="legend">{"".join(items)}</div>'


def _flow(plan: Plan, colours: dict[str, str], order: Sequence[str] | None) -> str:
    cards: dict[str, str] = {}
    for w in plan.warehouses:
        for layer in w.layers:
            rows = f", rows {layer.rows[0]}:{layer.rows[1]}" if layer.rows else ""
            cards[layer.name] = (
                f'<div class="layer" data-warehouse="{_e(w.name)}" style="background:{colours[w.name]}">'
                f'<div class="name">{_e(layer.name)}</div>'
                f'<div class="detail">{_e(layer.kind)} {dims(layer.weight_shape)}{rows}</div>'
                f'<div class="detail">m {layer.cells}, cells {layer.offset}..{layer.offset + layer.cells - 1} '
                f'of {w.n}</div></div>')
    for static in plan.plain:
        cards[static.layer] = (
            f'<div class="layer" data-warehouse="" style="background:{_STATIC_COLOUR}">'
            f'<div class="name">{_e(static.layer)}</div><div class="detail">static: {_e(static.reason)}</div></div>')
    names = [name for name in (order or ()) if name in cards]
    names += [name for name in cards if name not in set(names)]
    return f'<div class="flow">{"".join(cards[name] for name in names)}</div>'


def _warehouse_table(plan: Plan, colours: dict[str, str]) -> str:
    head = ("warehouse", "layers", "cell", "m_t", "n", "budget", "cell params", "attention params", "fit error")
    rows = [_row(w, colours[w.name]) for w in plan.warehouses]
    return ("<table><tr>" + "".join(f"<th>{h}</th>" for h in head) + "</tr>" + "".join(rows) + "</table>")


def _row(w: WarehousePlan, background: str) -> str:
    error = "" if w.init_error is None else f"{w.init_error:.3f}"
    cells = (f'<td style="background:{background}">{_e(w.name)}</td>', f'<td class="num">{len(w.layers)}</td>',
             f"<td>{dims(w.cell)}</td>", f'<td class="num">{w.m_t}</td>', f'<td class="num">{w.n}</td>',
             f'<td class="num">{w.budget:g}</td>', f'<td class="num">{w.warehouse_params:,}</td>',
             f'<td class="num">{w.attention_params:,}</td>', f'<td class="num">{error}</td>')
    return "<tr>" + "".join(cells) + "</tr>"


def _static_table(plan: Plan) -> str:
    rows = "".join(f"<tr><td>{_e(s.layer)}</td><td>{_e(s.reason)}</td></tr>" for s in plan.plain)
    return f"<table><tr><th>layer</th><th>reason</th></tr>{rows}</table>"


def _chart(plan: Plan, sweep: Sequence[Plan]) -> str:
    """An SVG line of converted / baseline parameters over the budgets (log scale)."""
    points = sorted({p.budget: p.ratio for p in (*sweep, plan)}.items())
    width, height, margin = 560, 300, 48
    low, high = math.log2(points[0][0]), math.log2(points[-1][0])
    top = max(max(ratio for _, ratio in points), 1.0) * 1.1

    def x(budget: float) -> float:
        return margin + (math.log2(budget) - low) / ((high - low) or 1.0) * (width - 2 * margin)

    def y(ratio: float) -> float:
        return height - margin - ratio / top * (height - 2 * margin)

    line = " ".join(f"{x(b):.1f},{y(r):.1f}" for b, r in points)
    marks = "".join(
        f'<circle class="point" data-budget="{b:g}" data-ratio="{r:.4f}" cx="{x(b):.1f}" cy="{y(r):.1f}" '
        f'r="{6 if b == plan.budget else 4}" fill="{"#c0392b" if b == plan.budget else "#2c6fbb"}"/>'
        f'<text x="{x(b):.1f}" y="{height - margin + 18}" text-anchor="middle">{_fraction(b)}</text>'
        f'<text x="{x(b):.1f}" y="{y(r) - 10:.1f}" text-anchor="middle">{r:.2f}</text>'
        for b, r in points)
    one = y(1.0)
    return (f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" font-size="12">'
            f'<line x1="{margin}" y1="{one:.1f}" x2="{width - margin}" y2="{one:.1f}" stroke="#999" '
            f'stroke-dasharray="4 3"/><text x="{width - margin}" y="{one - 4:.1f}" text-anchor="end">'
            f'the original model</text>'
            f'<polyline points="{line}" fill="none" stroke="#2c6fbb" stroke-width="2"/>{marks}'
            f'<text x="{width / 2}" y="{height - 8}" text-anchor="middle">budget b</text>'
            f'<text x="14" y="{height / 2}" transform="rotate(-90 14 {height / 2})" text-anchor="middle">'
            f'parameters / original</text></svg>')


def _fraction(budget: float) -> str:
    return f"1/{round(1 / budget)}" if budget < 1 and abs(1 / budget - round(1 / budget)) < 1e-9 else f"{budget:g}"
