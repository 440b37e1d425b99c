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

from dataclasses import dataclass, field

from torch import nn

from ...plan import DynamicLayerPlan, Plan
from ...trace import LayerGraph
from ..layer_choice import per_layer_plan, static_reason
from ..options import MethodOptions, check_globs, choice
from .layers import MIN_HIDDEN, REDUCTION, attention_width, layer_params

METHOD = "odconv"
_PLACES = ("plain", "convert")


@dataclass(frozen=True)
class ODConvOptions(MethodOptions):
    """How the ODConv planner chooses and sizes layers; the defaults are the authors'."""
    method = METHOD  # not fields: class attributes of MethodOptions
    label = "ODConv"
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
            object.__setattr__(self, name, check_globs(name, getattr(self, name)))


#: The options ``kwconvert.plan`` builds for this method.
Options = ODConvOptions


def plan(graph: LayerGraph, model: nn.Module | None, options: ODConvOptions, model_name: str,
         budget: float | None = None) -> Plan:
    """The ODConv plan of a traced model: its converted layers and the static ones, with reasons
    (``model``, unused: ODConv's plan needs no weights, as KernelDNA's choice of parents does;
    ``budget``, unused: the planner has folded it into ``options.kernels``)."""
    plain = dict(graph.unused)
    layers = []
    for cand in graph.candidates:
        reason = static_reason(graph, cand, options, "ODConv")
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
    notes = list(graph.notes)
    if not graph.exact:
        notes.append("traced with hooks: residual shortcuts cannot be told apart, so only the first layer stays "
                     "static by position")
    return per_layer_plan(graph, layers, plain, notes, options, model_name, float(options.kernels))
