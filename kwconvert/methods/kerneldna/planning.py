"""KernelDNA's planning rules: which convolutions share a parent, and which one is it.

Within a stage (the reassigned stages KernelWarehouse's planner finds:
:func:`kwconvert.methods.kernelwarehouse.grouping.stages`), convolutions with the same kernel shape and groups form a
family: one stays an ordinary convolution, the parent, and the others become children
that derive their kernel from it (:mod:`kwconvert.methods.kerneldna.layers`).  Which
kernels share follows the authors: the 3x3 convolutions of a ResNet, the 1x1 of a
MobileNetV2 (its depthwise convolutions stay per block): ``share="auto"`` takes the first
of spatial, pointwise and all kernels that makes a child saving parameters.

From a trained model the parent of a family is the member whose kernel the others are
best fitted from (least summed fit error, :func:`best_parent`); on the meta device, or
with ``parent="first"``, the first member in execution order.  With ``fit_parent=True`` the
rewriter then fits the parent's kernel with its children's scalings
(:func:`kwconvert.methods.kerneldna.fitting.fit_family`); the ranking still uses the fixed
parent's fit, which costs a fraction of the joint one.

Why ``fit_parent`` defaults to False (``benchmarks/finetune.py --arms a g h --seeds 3``, the
trained Fashion-MNIST residual net, one family of two 3x3 convolutions): fitting the parent
raises the accuracy right after conversion from 18.25 % to 54.37 % (mean of 3 seeds; child
error 0.996 -> ~0.69, parent error 0 -> ~0.58), but after the same fine-tuning the net ends at
87.65 +- 0.36 % against 88.16 +- 0.32 % with the parent kept exact (lower on every seed; the
original fine-tuned: 88.48 %): one broken layer beside an intact one recovers better than
two damaged ones.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

from torch import nn

from ...plan import DynamicLayerPlan, Plan
from ...trace import Candidate, LayerGraph
from ..kernelwarehouse.grouping import stages
from ..kernelwarehouse.options import PlanOptions
from ..layer_choice import per_layer_plan, static_reason
from ..options import MethodOptions, check_globs, choice
from .fitting import parent_ranking
from .layers import REDUCTION, gate_width, layer_params

METHOD = "kerneldna"
_SHARES = ("auto", "spatial", "pointwise", "all")
#: What ``share="auto"`` tries, in order: the first that makes a child is taken.
_AUTO_ORDER = ("spatial", "pointwise", "all")
_PLACES = ("plain", "convert")
#: ALS rounds when comparing parents (the ranking settles well before the final fit's rounds).
RANKING_ROUNDS = 6


@dataclass(frozen=True)
class KernelDNAOptions(MethodOptions):
    """How the KernelDNA planner forms families; the defaults follow the authors."""
    method = METHOD  # not fields: class attributes of MethodOptions
    label = "KernelDNA"
    share: str = field(default="auto", metadata={"help": (
        "which convolutions share a parent: 'spatial' (k > 1, not depthwise; the authors' ResNets), "
        "'pointwise' (1x1; their MobileNetV2), 'all' (depthwise too), 'auto' (the first of spatial, "
        "pointwise, all that makes a child saving parameters)")})
    children_per_parent: int | None = field(default=None, metadata={"help": (
        "at most this many children per parent (a larger family gets several parents); None: no limit")})
    parent: str = field(default="best", metadata={"help": (
        "'best': the member the others fit best from (needs the weights), 'first': the first in execution order")})
    fit_parent: bool = field(default=False, metadata={"help": (
        "false: each parent keeps its trained kernel exactly and only its children's scalings are fitted; "
        "true: the parent's kernel is fitted with them (least summed squared relative error of the family; "
        "the parent then changes too, its fit error in the plan): a better start, a worse end after "
        "fine-tuning in benchmarks/finetune.py (README)")})
    reduction: int = field(default=REDUCTION, metadata={"help": "gate width = max(C_in // reduction, 1)"})
    stem: str = field(default="plain", metadata={"help": "'plain' keeps the layer reading the input static"})
    shortcut: str = field(default="plain", metadata={"help": "'plain' keeps residual shortcut projections static"})
    include: tuple[str, ...] = field(default=(), metadata={"help": "only layers matching these globs may convert"})
    exclude: tuple[str, ...] = field(default=(), metadata={"help": "layers matching these globs stay static"})

    def __post_init__(self) -> None:
        choice("share", self.share, _SHARES)
        choice("parent", self.parent, ("best", "first"))
        if not isinstance(self.fit_parent, bool):
            raise ValueError(f"KernelDNA option fit_parent must be true or false, got {self.fit_parent!r}")
        choice("stem", self.stem, _PLACES)
        choice("shortcut", self.shortcut, _PLACES)
        for name in ("children_per_parent", "reduction"):
            value = getattr(self, name)
            if (value is not None or name == "reduction") and (
                    isinstance(value, bool) or not isinstance(value, int) or value < 1):
                raise ValueError(f"KernelDNA option {name} must be a positive integer, got {value!r}")
        for name in ("include", "exclude"):
            object.__setattr__(self, name, check_globs(name, getattr(self, name)))


#: The options ``kwconvert.plan`` builds for this method.
Options = KernelDNAOptions


def plan(graph: LayerGraph, model: nn.Module | None, options: KernelDNAOptions, model_name: str,
         budget: float = 1.0) -> Plan:
    """The KernelDNA plan of a traced model: children with their parents, and the static layers
    (``budget``: always 1, KernelDNA takes none)."""
    plain = dict(graph.unused)
    notes = list(graph.notes)
    eligible = []
    for cand in graph.candidates:
        reason = static_reason(graph, cand, options, "KernelDNA")
        if reason is None:
            eligible.append(cand)
        else:
            plain[cand.name] = reason
    stage_of = stages(graph, PlanOptions(), notes)
    for share in (_AUTO_ORDER if options.share == "auto" else (options.share,)):
        layers, reasons = _families(graph, model, eligible, stage_of, share, options)
        if layers:
            break
    plain.update(reasons)
    return per_layer_plan(graph, layers, plain, notes, dataclasses.replace(options, share=share), model_name, 1.0)


def _families(graph: LayerGraph, model: nn.Module | None, eligible: list[Candidate], stage_of: dict[str, str],
              share: str, options: KernelDNAOptions) -> tuple[list[DynamicLayerPlan], dict[str, str]]:
    """The children that sharing ``share`` kernels makes, and why each other eligible layer stays."""
    plain: dict[str, str] = {}
    families: dict[tuple, list[Candidate]] = {}
    for cand in eligible:
        if not _shares(cand, share):
            plain[cand.name] = f"{'pointwise' if cand.pointwise else 'spatial'} conv: this plan shares {share} kernels"
            continue
        key = (stage_of.get(cand.name, "pre"), cand.kind, cand.weight_shape, cand.groups)
        families.setdefault(key, []).append(cand)
    layers = []
    for (stage, *_), members in families.items():
        if len(members) < 2:
            plain[members[0].name] = f"no other conv of its kernel shape in {stage}"
            continue
        for family in _split(members, options.children_per_parent):
            if len(family) < 2:
                plain[family[0].name] = f"left over: its family in {stage} has children_per_parent children"
                continue
            parent = best_parent(model, family) if options.parent == "best" else family[0]
            children = [_child(c, parent, options) for c in family if c is not parent]
            for child in [c for c in children if c.params >= graph.candidate(c.name).weight_numel]:
                plain[child.name] = (f"its gate ({child.params:,} parameters) would outweigh its kernel "
                                     f"({graph.candidate(child.name).weight_numel:,})")
            children = [c for c in children if c.name not in plain]
            plain[parent.name] = (f"KernelDNA parent of {len(children)} in {stage}" if children
                                  else f"no child in {stage} would save parameters")
            layers += children
    return layers, plain


def _child(cand: Candidate, parent: Candidate, options: KernelDNAOptions) -> DynamicLayerPlan:
    hidden = gate_width(cand.in_channels, options.reduction)
    return DynamicLayerPlan(name=cand.name, kind=cand.kind, weight_shape=cand.weight_shape,
                            in_channels=cand.in_channels, groups=cand.groups, kernels=1, hidden=hidden,
                            params=layer_params(cand.in_channels, cand.out_channels, cand.kernel_size, hidden),
                            positions=cand.positions, parent=parent.name)


def _shares(cand: Candidate, share: str) -> bool:
    if share == "all":
        return True
    if cand.depthwise:
        return False
    return cand.pointwise if share == "pointwise" else not cand.pointwise


def _split(members: list[Candidate], most_children: int | None) -> list[list[Candidate]]:
    """A family cut into consecutive families of at most ``most_children + 1`` members."""
    if most_children is None:
        return [members]
    size = most_children + 1
    return [members[i:i + size] for i in range(0, len(members), size)]


def best_parent(model: nn.Module | None, family: list[Candidate]) -> Candidate:
    """The member whose kernel the others fit best from (least summed relative fit error);
    the first member when the weights are not at hand (no model, the meta device)."""
    if model is None:
        return family[0]
    weights = [model.get_submodule(cand.name).weight for cand in family]
    if any(weight.is_meta for weight in weights):
        return family[0]
    errors = parent_ranking(weights, RANKING_ROUNDS)
    return family[errors.index(min(errors))]
