"""KernelWarehouse's (and DY-Conv's) planning rules: a traced model -> warehouses.

The layers of each of the paper's "reassigned stages" share one warehouse (Sec. 3.3):
:mod:`.grouping` finds those stages on any traced model; :mod:`.sizing` sizes cells,
warehouses and attention (:mod:`.cells`) and keeps the result under the parameter bound.
With the default options the plans reproduce the paper's Table 14 layouts and the reference
implementation's parameter counts.
"""
from __future__ import annotations

import math

from torch import nn

from ... import costs
from ...plan import Plan, StaticLayer, check_consistent
from ...trace import LayerGraph
from .grouping import attention_norm, group_layers
from .options import PlanOptions
from .sizing import Sizing, allocate, honour_budget, layouts, renumber

#: The options this method's plans are made with (the planner reads every method's ``Options``).
Options = PlanOptions


def plan(graph: LayerGraph, model: nn.Module | None, opts: PlanOptions, name: str, budget: float) -> Plan:
    """KernelWarehouse's (and DY-Conv's) plan of a traced model: warehouses, sizes, the guard."""
    grouping = group_layers(graph, budget, opts)
    sizing = Sizing(opts, attention_norm(graph, opts))
    notes = list(graph.notes) + grouping.notes
    groups = layouts(grouping, budget, sizing, notes)
    plain = grouping.plain
    if budget < 1 and opts.allocate:
        groups = allocate(graph, groups, grouping.heads, plain, sizing, budget, notes)
    groups = honour_budget(graph, groups, plain, sizing, opts.params_ratio(budget) * graph.params_baseline, notes)
    warehouses = tuple(sizing.warehouse(g.name, g.members, g.layout) for g in renumber(groups))
    dropped = sum(math.prod(l.weight_shape) + graph.candidate(l.name).extra_params
                  for w in warehouses for l in w.layers)
    params = graph.params_baseline - dropped + sum(w.params for w in warehouses)
    static = tuple(StaticLayer(layer, reason) for layer, reason in graph.static_order(plain))
    converted = {layer.name for w in warehouses for layer in w.layers}
    unpacked = tuple(path for path in graph.unpacked_attention
                     if any(name.startswith(f"{path}.") for name in converted))
    result = Plan(model=name, budget=budget, warehouses=warehouses, plain=static, method=opts.mode,
                  params_baseline=graph.params_baseline, params_converted=params,
                  input_size=graph.input_size,
                  options=opts.to_dict(), notes=tuple(dict.fromkeys(notes)), unpacked_attention=unpacked,
                  baseline_macs=costs.baseline_macs(graph))
    check_consistent(result)  # what convert() and Plan.from_dict will check: refuse it now, not then
    return result
