"""ODConv's planning rules: which convolutions become ODConv layers, and their sizes.

ODConv converts layer by layer (no sharing between layers), so its plan is a list of
layers, each with its n kernels and attention width.  The default choice follows the
authors' networks (OSVAI/ODConv ``od_resnet.py``, ``od_mobilenetv2.py``): every
convolution of the residual / inverted-residual blocks and every other convolution of
the body, but not the stem (the layer reading the image), the shortcut projections of
residual blocks (ResNet's 1x1 ``downsample``) or the classifier.  On torchvision's
ResNet18/50/101 and MobileNetV2 1.0 / 0.5 this reproduces the authors' layer lists and
their parameter counts to the parameter (tests/test_odconv.py).
"""
from __future__ import annotations

import dataclasses
import fnmatch
from dataclasses import dataclass, field, fields
from typing import Any

from ...plan import EQUIVALENT_FORWARDS, DynamicLayerPlan, Plan, StaticLayer, check_consistent, choice, on_pooled_map
from ...trace import Candidate, LayerGraph
from .layers import MIN_HIDDEN, REDUCTION, attention_width, layer_params

METHOD = "odconv"
_PLACES = ("plain", "convert")


@dataclass(frozen=True)
class ODConvOptions:
    """How the ODConv planner chooses and sizes layers; the defaults are the authors'."""
    kernels: int = field(default=1, metadata={"help": (
        "n, the kernels per layer (the authors' '1x' is 1, '4x' is 4); n = 1 keeps the "
        "kernel's size and attends over channels, filters and kernel positions")})
    reduction: float = field(default=REDUCTION, metadata={"help": (
        "attention width = max(int(C_in * reduction), min_hidden)")})
    min_hidden: int = field(default=MIN_HIDDEN, metadata={"help": "smallest attention width"})
    stem: str = field(default="plain", metadata={"help": (
        "'plain' keeps the layer reading the input static (as the authors' nets), 'convert' converts it")})
    shortcut: str = field(default="plain", metadata={"help": (
        "'plain' keeps residual shortcut projections (ResNet's downsample) static, 'convert' converts them")})
    include: tuple[str, ...] = field(default=(), metadata={"help": "only layers matching these globs may convert"})
    exclude: tuple[str, ...] = field(default=(), metadata={"help": "layers matching these globs stay static"})

    def __post_init__(self) -> None:
        if isinstance(self.kernels, bool) or not isinstance(self.kernels, int) or self.kernels < 1:
            raise ValueError(f"ODConv option kernels must be a positive integer, got {self.kernels!r}")
        if isinstance(self.min_hidden, bool) or not isinstance(self.min_hidden, int) or self.min_hidden < 1:
            raise ValueError(f"ODConv option min_hidden must be a positive integer, got {self.min_hidden!r}")
        if isinstance(self.reduction, bool) or not isinstance(self.reduction, (int, float)) \
                or not 0 < self.reduction <= 1:
            raise ValueError(f"ODConv option reduction must be in (0, 1], got {self.reduction!r}")
        choice("stem", self.stem, _PLACES)
        choice("shortcut", self.shortcut, _PLACES)
        for name in ("include", "exclude"):
            value = getattr(self, name)
            value = (value,) if isinstance(value, str) else tuple(value)
            object.__setattr__(self, name, value)

    @classmethod
    def from_kwargs(cls, **options: Any) -> "ODConvOptions":
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(options) - known)
        if unknown:
            raise ValueError(f"unknown ODConv option {unknown[0]!r}; ODConv takes {', '.join(sorted(known))}")
        return cls(**options)

    def to_dict(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        data.update(include=list(self.include), exclude=list(self.exclude), method=METHOD)
        return data


def plan(graph: LayerGraph, options: ODConvOptions, model_name: str, baseline_macs: int | None) -> Plan:
    """The ODConv plan of a traced model: its converted layers and the static ones, with reasons."""
    plain = dict(graph.unused)
    layers = []
    for cand in graph.candidates:
        reason = static_reason(graph, cand, options)
        if reason is None:
            hidden = attention_width(cand.in_channels, options.reduction, options.min_hidden)
            params = layer_params(cand.in_channels, cand.out_channels, cand.groups, cand.kernel_size,
                                  options.kernels, hidden)
            layers.append(DynamicLayerPlan(name=cand.name, kind=cand.kind, weight_shape=cand.weight_shape,
                                           in_channels=cand.in_channels, groups=cand.groups,
                                           kernels=options.kernels, hidden=hidden, params=params,
                                           positions=cand.positions))
        else:
            plain[cand.name] = reason
    order = {c.name: c.order for c in graph.candidates}
    static = tuple(StaticLayer(layer, reason) for layer, reason in
                   sorted(plain.items(), key=lambda kv: (order.get(kv[0], len(order)), kv[0])))
    # Each converted layer's kernel gives way to its ODConv parameters; its bias stays as it is.
    params = graph.params_baseline + sum(layer.params - graph.candidate(layer.name).weight_numel for layer in layers)
    notes = list(graph.notes)
    if not graph.exact:
        notes.append("traced with hooks: residual shortcuts cannot be told apart, so only the first layer stays "
                     "static by position")
    result = Plan(model=model_name, budget=float(options.kernels), warehouses=(), plain=static,
                  params_baseline=graph.params_baseline, params_converted=params,
                  input_size=graph.input_shapes[0][1:] if len(graph.input_shapes) == 1 else None,
                  options=options.to_dict(), notes=tuple(dict.fromkeys(notes)), baseline_macs=baseline_macs,
                  method=METHOD, layers=tuple(layers))
    check_consistent(result)
    return result


def static_reason(graph: LayerGraph, cand: Candidate, options: ODConvOptions) -> str | None:
    """Why a candidate stays a normal layer under ODConv, or None when it converts."""
    if options.include and not any(fnmatch.fnmatchcase(cand.name, p) for p in options.include):
        return "excluded by option"
    if any(fnmatch.fnmatchcase(cand.name, p) for p in options.exclude):
        return "excluded by option"
    if not cand.is_conv:
        return "Linear: ODConv converts convolutions"
    if cand.custom_forward and cand.custom_forward not in EQUIVALENT_FORWARDS:
        return f"{cand.custom_forward.rsplit('.', 1)[-1]} overrides torch's forward; an ODConv layer would not compute it"
    if cand.weight_read:
        return "the model reads its weight outside its forward; a converted layer has none"
    if on_pooled_map(cand) and cand.pointwise:  # a 3x3 on a 1x1 map is a small input, not a squeeze
        return "squeeze-excitation conv on a pooled map"
    is_stem = cand.name in graph.stems if graph.exact else cand.order == 0
    if is_stem and options.stem == "plain":
        return "stem (static in the authors' nets)"
    if options.shortcut == "plain" and is_shortcut(graph, cand.name):
        return "residual shortcut projection (static in the authors' nets)"
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
