"""Which convolutions a per-layer method (ODConv, KernelDNA) leaves static, and why.

Both follow their authors' networks: every convolution of the body converts; the stem (the
layer reading the input), the shortcut projections of residual blocks (ResNet's 1x1
``downsample``), squeeze-excitation convolutions and Linear layers stay as they are.
"""
from __future__ import annotations

import fnmatch
import math

from .. import costs
from ..plan import Plan, StaticLayer, check_consistent
from ..trace import Candidate, LayerGraph


#: Conv/Linear subclasses whose own forward computes exactly torch's (timm's Linear only
#: casts the weight to the input's dtype for TorchScript): they convert like their base.
#: Those of :data:`kwconvert.compat.EXTRAS` (timm's 'SAME' padding and weight
#: standardisation) convert too; any other subclass with its own forward stays static.
EQUIVALENT_FORWARDS = frozenset({"timm.layers.linear.Linear"})


def on_pooled_map(cand: Candidate) -> bool:
    return bool(cand.input_spatial) and math.prod(cand.input_spatial) == 1


#: The reasons the authors' layer choice gives; the option that overrides each (a model whose
#: only convolution is its stem, a ViT's patch embedding, converts nothing without it).
STATIC_STEM = "stem (static in the authors' nets)"
STATIC_SHORTCUT = "residual shortcut projection (static in the authors' nets)"
OVERRIDES = {STATIC_STEM: "-O stem=convert", STATIC_SHORTCUT: "-O shortcut=convert"}


def static_reason(graph: LayerGraph, cand: Candidate, options, method: str) -> str | None:
    """Why a candidate stays a normal layer, or None when ``method`` may convert it.

    ``options`` has ``include``, ``exclude`` (globs), ``stem`` and ``shortcut``
    ('plain' or 'convert').
    """
    if options.include and not any(fnmatch.fnmatchcase(cand.name, p) for p in options.include):
        return "excluded by option"
    if any(fnmatch.fnmatchcase(cand.name, p) for p in options.exclude):
        return "excluded by option"
    if not cand.is_conv:
        return f"Linear: {method} converts convolutions"
    if cand.custom_forward and cand.custom_forward not in EQUIVALENT_FORWARDS:
        return (f"{cand.custom_forward.rsplit('.', 1)[-1]} overrides torch's forward; "
                f"a {method} layer would not compute it")
    if cand.weight_read:
        return "the model reads its weight outside its forward; a converted layer has none"
    if on_pooled_map(cand) and cand.pointwise:  # a 3x3 on a 1x1 map is a small input, not a squeeze
        return "squeeze-excitation conv on a pooled map"
    is_stem = cand.name in graph.stems if graph.exact else cand.order == 0
    if is_stem and options.stem == "plain":
        return STATIC_STEM
    if options.shortcut == "plain" and is_shortcut(graph, cand.name):
        return STATIC_SHORTCUT
    return None


def is_shortcut(graph: LayerGraph, name: str) -> bool:
    """A layer alone on one branch of a residual block: it reads the block's input and
    writes into its add directly, while other layers of the block form the other branch."""
    outputs = set(graph.direct_outputs(name))
    for block in graph.residual_blocks:
        if name not in block.members or len(block.members) < 2 or block.add not in outputs:
            continue
        if not set(graph.direct_inputs(name)) & set(block.members):
            return True
    return False


def per_layer_plan(graph: LayerGraph, layers: list, plain: dict[str, str], notes: list[str], options,
                   model_name: str, budget: float) -> Plan:
    """The checked ``Plan`` of a per-layer method: ``layers`` and the ``plain`` layers with their
    reasons in execution order, each converted kernel replaced by its layer's parameters (a
    bias stays as it is)."""
    order = {c.name: c.order for c in graph.candidates}
    static = tuple(StaticLayer(layer, reason) for layer, reason in graph.static_order(plain))
    params = graph.params_baseline + sum(layer.params - graph.candidate(layer.name).weight_numel for layer in layers)
    result = Plan(model=model_name, budget=budget, warehouses=(), plain=static, params_baseline=graph.params_baseline,
                  params_converted=params,
                  input_size=graph.input_size,
                  options=options.to_dict(), notes=tuple(dict.fromkeys(notes)), baseline_macs=costs.baseline_macs(graph),
                  method=options.method, layers=tuple(sorted(layers, key=lambda layer: order[layer.name])))
    check_consistent(result)
    return result
