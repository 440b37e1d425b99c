"""A plan as rich tables: per warehouse (KernelWarehouse) or per layer (ODConv, KernelDNA), the
layers left static, totals and the cost per sample (:mod:`kwconvert.costs`)."""
from __future__ import annotations

from typing import TYPE_CHECKING

from .. import costs, methods
from ..formatting import count, dims, si

if TYPE_CHECKING:
    from .schema import Plan


def plan_table(plan: Plan):
    """A rich renderable: one table per warehouse, a summary, the plain layers, totals."""
    from rich.console import Group
    from rich.table import Table
    from rich.text import Text

    # Names fold onto a second line where the width runs out, numbers never shrink, and
    # titles stand above their table (a table's title wraps at the table's width): at 80
    # columns "stage5.conv..." would not tell a stage's split parts apart.
    if plan.method in methods.PER_LAYER_METHODS:
        return Group(*_layers_table(plan), *_plain_and_totals(plan))
    parts = []
    for w in plan.warehouses:
        parts.append(Text(f"{w.name}: cell {dims(w.cell)}, m_t {w.m_t}, n {w.n}", style="italic"))
        table = Table()
        table.add_column("layer", overflow="fold")
        for column in ("kernel", "cell", "m"):
            table.add_column(column, justify="right", no_wrap=True)
        for layer in w.layers:
            rows = f" (rows {layer.rows[0]}:{layer.rows[1]})" if layer.rows else ""
            table.add_row(layer.name + rows, dims(layer.weight_shape), dims(w.cell), str(layer.cells))
        parts.append(table)
    where = f" (module {plan.module})" if plan.module else ""
    parts.append(Text(f"{plan.model}{where} at b = {plan.budget:g}: {len(plan.warehouses)} warehouses "
                      "(l layers sharing n cells for m_t mixtures)", style="italic"))
    summary = Table(pad_edge=False)
    own_budgets = any(w.budget != plan.budget for w in plan.warehouses)
    columns = ("warehouse", "l", "cell", "n/m_t") + (("b'",) if own_budgets else ()) + (
        "cell\nparams", "attention\nparams")
    for column in columns:
        if column == "warehouse":
            summary.add_column(column, overflow="fold")
        else:
            summary.add_column(column, justify="right", no_wrap=True)
    for w in plan.warehouses:
        budget = (f"{w.budget:g}",) if own_budgets else ()
        summary.add_row(w.name, str(len(w.layers)), dims(w.cell), f"{w.n}/{w.m_t}", *budget,
                        f"{w.warehouse_params:,}", f"{w.attention_params:,}")
    parts.append(summary)
    parts.extend(_cost_table(plan))
    return Group(*parts, *_plain_and_totals(plan))

def _layers_table(plan: Plan) -> list:
    """A per-layer method's plan (ODConv): each layer's kernels, attention and cost."""
    from rich.table import Table
    from rich.text import Text

    size = f" at {dims(plan.input_size)}" if plan.input_size else ""
    where = f" (module {plan.module})" if plan.module else ""
    derived = plan.method in methods.DERIVED_METHODS  # KernelDNA: a parent and a fit, no kernels
    title = Text(f"{plan.model}{where} {plan.setting}: {count(len(plan.layers), 'layer')} converted "
                 f"(cost per sample{size})", style="italic")
    table = Table(pad_edge=False)
    table.add_column("layer", overflow="fold")
    table.add_column("kernel", justify="right", no_wrap=True)
    if derived:
        table.add_column("parent", overflow="fold")
    columns = ("gate\nwidth", "params", "conv\nMACs", "added\nMACs", "fit\nerror") if derived else (
        "n", "attention\nwidth", "params", "conv\nMACs", "added\nMACs")
    for column in columns:
        table.add_column(column, justify="right", no_wrap=True)
    for layer in plan.layers:
        cost = costs.per_layer_cost(layer)
        middle = (layer.parent,) if derived else (str(layer.kernels),)
        last = ((f"{layer.fit_error:.3f}" if layer.fit_error is not None else "-"),) if derived else ()
        table.add_row(layer.name, dims(layer.weight_shape), *middle, str(layer.hidden), f"{layer.params:,}",
                      si(cost.conv_macs), si(cost.added_macs), *last)
    return [title, table]

def _plain_and_totals(plan: Plan) -> list:
    """The static layers with their reasons, the parameter totals, the cost line and notes."""
    from rich.table import Table
    from rich.text import Text

    parts = []
    if plan.plain:
        parts.append(Text("plain layers", style="italic"))
        plain = Table()
        plain.add_column("layer", overflow="fold")
        plain.add_column("reason")
        # KernelDNA: a parent's kernel may be fitted with its children's (option fit_parent)
        parents = {layer.parent for layer in plan.layers if layer.parent is not None}
        if parents:
            plain.add_column("fit\nerror", justify="right", no_wrap=True)
        for static in plan.plain:
            error = (f"{static.fit_error:.3f}" if static.fit_error is not None else "-") \
                if static.layer in parents else ""
            plain.add_row(static.layer, static.reason, *((error,) if parents else ()))
        parts.append(plain)
    parts.append(Text(f"baseline params {plan.params_baseline:,}   converted params "
                      f"{plan.params_converted:,}   ratio {plan.ratio:.3f}"))
    parts.append(Text(_cost_line(plan)))
    parts.extend(Text(f"note: {note}", style="dim") for note in plan.notes)
    return parts

def _cost_table(plan: Plan) -> list:
    """Per warehouse: multiply-adds per sample and warehouse bytes read per forward."""
    from rich.table import Table
    from rich.text import Text

    size = f" at {dims(plan.input_size)}" if plan.input_size else ""
    table = Table(pad_edge=False)
    table.add_column("warehouse", overflow="fold")
    for column in ("conv\nMACs", "assembly\nMACs", "attention\nMACs", "warehouse read\nper forward"):
        table.add_column(column, justify="right", no_wrap=True)
    for w in plan.warehouses:
        cost = w.cost
        table.add_row(w.name, si(cost.conv_macs), si(cost.assembly_macs), si(cost.attention_macs),
                      si(cost.warehouse_bytes, "B"))
    return [Text(f"cost per sample{size} (multiply-adds; warehouse bytes in float32)", style="italic"), table]

def _cost_line(plan: Plan) -> str:
    """Multiply-adds per sample, before and after, and the warehouses read per forward."""
    cost = plan.cost
    size = f" at {dims(plan.input_size)}" if plan.input_size else ""
    ratio = costs.macs_ratio(plan)
    before = (f"baseline MACs {si(plan.baseline_macs)}   converted {si(plan.baseline_macs + cost.added_macs)}"
              f" ({ratio:.3f}x)   ") if ratio is not None else ""
    read = "kernels" if plan.layers else "warehouses"
    return (f"per sample{size}: {before}assembly {si(cost.assembly_macs)}, attention "
            f"{si(cost.attention_macs)}   {read} read per forward {si(cost.warehouse_bytes, 'B')} "
            "(float32)")
