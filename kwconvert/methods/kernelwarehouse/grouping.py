"""Which layers share a warehouse: the paper's reassigned stages found on any traced model.

KernelWarehouse (Li & Yao, ICML 2024, Sec. 3.3) shares one warehouse among the layers of a
"reassigned stage": a stage's first layers, which read the previous stage's output, are
handed to the previous stage so that each warehouse keeps large common channel divisors.
:func:`stages` finds those stages with one generic rule (residual bodies, handovers, "pre"
layers); :func:`group_layers` splits them by layer kind and role and says why every other
layer stays static.  KernelDNA's families reuse :func:`stages`.
"""
from __future__ import annotations

import dataclasses
import fnmatch
import math
import string
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from ... import compat
from ...trace import Candidate, LayerGraph
from ..layer_choice import EQUIVALENT_FORWARDS, on_pooled_map
from .options import PlanOptions
from .projections import projection_role

if TYPE_CHECKING:
    from .sizing import Layout


@dataclass
class Group:
    """Layers that will share one warehouse, and how it is sized (None until :func:`_layouts`)."""
    name: str
    members: list[Candidate]
    layout: Layout | None = None


@dataclass
class Grouping:
    """Warehouse groups (by first member), static layers with reasons, notes, and the heads
    (layers on a rank-2 input: classifiers), which are plain until a warehouse takes them."""
    groups: list[Group]
    plain: dict[str, str]
    notes: list[str]
    heads: list[Candidate] = field(default_factory=list)


def group_layers(graph: LayerGraph, budget: float, options: PlanOptions) -> Grouping:
    """Decide which layers stay plain and which share a warehouse.

    The generic rule (KERNELWAREHOUSE.md "A generic grouping rule"): residual blocks in
    execution order form bodies; a body ends where the block shape changes or the chain of
    adds breaks, and the new body's layers reading the previous body's last add are handed
    over to it (the paper's "reassigned stages"); layers in no block join the body of the
    latest add upstream ("pre" when there is none).  The warehouse key is then (stage,
    layer kind, depthwise / grouped / expansion role).
    """
    _check_patterns_match(graph, options)
    plain = {name: reason for name, reason in graph.unused}
    notes: list[str] = []
    converted, split = [], []
    for cand in graph.candidates:
        reason = _static_reason(graph, cand, options)
        role = projection_role(cand) if options.static_query_key and reason is None else None
        if role is not None and role.value_rows is not None:
            rows = role.value_rows
            cand = dataclasses.replace(cand, weight_shape=(rows[1] - rows[0], *cand.weight_shape[1:]), rows=rows)
            split.append(cand.name)
        elif role is not None:
            reason = role.static_reason
        if reason is None:
            converted.append(cand)
        else:
            plain[cand.name] = reason
    if split:
        notes.append(f"query and key stay static: {len(split)} fused projection(s) convert only their value "
                     f"rows ({split[0]}{', ...' if len(split) > 1 else ''})")
    if options.mode == "dynamic_conv":
        return Grouping([Group(c.name, [c]) for c in converted], plain, notes)
    heads = [c for c in graph.candidates if plain.get(c.name) == "head"
             and _static_reason(graph, c, options, head=True) is None]
    stems = set(graph.stems) if graph.exact else {graph.candidates[0].name}
    stage_of = stages(graph, options, notes)
    split_expansion = budget > 1 if options.expansion_split == "auto" else options.expansion_split
    keyed: dict[str, Group] = {}
    for cand in converted:
        stage = "stem" if cand.name in stems else stage_of.get(cand.name, "pre")
        name = f"{stage}.{_role(graph, cand, options, split_expansion)}"
        keyed.setdefault(name, Group(name, [])).members.append(cand)
    return Grouping(list(keyed.values()), plain, notes, heads)


class PatternError(ValueError):
    """An ``include`` / ``exclude`` glob names no layer of the model."""


def _check_patterns_match(graph: LayerGraph, options: PlanOptions) -> None:
    """An ``include`` or ``exclude`` glob that names no layer is a typo: said, rather than a
    plan that silently keeps every layer static (include) or converts what was meant out."""
    names = [cand.name for cand in graph.candidates]
    for option in ("include", "exclude"):
        for pattern in getattr(options, option):
            if not any(fnmatch.fnmatchcase(name, pattern) for name in names):
                examples = ", ".join(names[:3]) + (", ..." if len(names) > 3 else "")
                raise PatternError(f"{option} pattern {pattern!r} matches no layer of the model (its layers: "
                                   f"{examples}; a dry run without the pattern lists them all)")


def _static_reason(graph: LayerGraph, cand: Candidate, options: PlanOptions, head: bool = False) -> str | None:
    """Why a candidate stays a normal layer, or None when it may be converted.

    Heads (a rank-2 input: the classifier) are "head" here; with ``head=True``, the
    reason a head could not be converted either, or None when a warehouse may take it.
    """
    if options.include and not any(fnmatch.fnmatchcase(cand.name, p) for p in options.include):
        return "excluded by option"
    if any(fnmatch.fnmatchcase(cand.name, p) for p in options.exclude):
        return "excluded by option"
    if cand.input_shape is not None and len(cand.input_shape) == 2 and not head:
        return "head"
    if cand.custom_forward and cand.custom_forward not in EQUIVALENT_FORWARDS | compat.EXTRAS.keys():
        return (f"{cand.custom_forward.rsplit('.', 1)[-1]} overrides torch's forward; a KernelWarehouse "
                "layer would not compute what it computes")
    if cand.weight_read:
        return "the model reads its weight outside its forward (e.g. for a dtype); a converted layer has none"
    if on_pooled_map(cand) and options.squeeze_excitation == "plain":
        return "squeeze-excitation conv on a pooled map"
    is_stem = cand.name in graph.stems if graph.exact else cand.order == 0
    if is_stem:
        if options.stem == "plain" or (options.stem == "auto" and cand.kernel_size
                                       and max(cand.kernel_size) >= 7):
            return "stem"
        return None
    if options.stem_fed_pointwise_plain and cand.pointwise and _fed_by_stem(graph, cand):
        return "stem-fed pointwise conv"
    return None


def _fed_by_stem(graph: LayerGraph, cand: Candidate) -> bool:
    if not graph.exact:
        return cand.order == 1
    inputs = graph.direct_inputs(cand.name)
    return bool(inputs) and all(i in graph.stems for i in inputs)


def _role(graph: LayerGraph, cand: Candidate, options: PlanOptions, split_expansion: bool) -> str:
    """The warehouse-key suffix: the layer kind, or its role when it gets its own warehouse."""
    if on_pooled_map(cand):
        role = "squeeze_excitation"
    elif cand.depthwise and options.separate_depthwise:
        role = "depthwise"
    elif cand.grouped and options.separate_grouped:
        role = "grouped"
    elif split_expansion and cand.pointwise and not cand.depthwise and graph.feeds_depthwise(cand.name):
        role = "expansion"
    else:
        return cand.kind
    return role if cand.kind == "conv2d" else f"{cand.kind}.{role}"


#: A body of more residual blocks than this gets a note pointing at max_blocks_per_stage.
LONG_BODY_BLOCKS = 8


def stages(graph: LayerGraph, options: PlanOptions, notes: list[str]) -> dict[str, str]:
    """Stage label per candidate (stems and plain layers included; callers pick)."""
    if not graph.exact:
        return {name: f"stage{index}" for name, index in graph.resolution_stages().items()}
    blocks = graph.residual_blocks
    owner: dict[str, int] = {}
    for index, block in enumerate(blocks):
        for member in block.members:
            owner.setdefault(member, index)
    bodies: list[list[int]] = []       # block indices per body
    handover: dict[str, int] = {}      # layer -> index of the body it is handed to
    for index, block in enumerate(blocks):
        previous = blocks[index - 1] if index else None
        if (previous is not None and graph.source(block.fork) == previous.add
                and _same_stream(block.shape, previous.shape)):
            bodies[-1].append(index)
            continue
        bodies.append([index])
        if previous is not None:
            for member in block.members:
                if owner[member] == index and graph.input_source(member) == previous.add:
                    handover[member] = len(bodies) - 2
    label_of_block: dict[int, str] = {}
    last_label: list[str] = []
    for number, body in enumerate(bodies, start=1):
        parts = _cut_body(body, blocks, options)
        if len(parts) == 1 and len(body) > LONG_BODY_BLOCKS and not _units_of_attention(body, blocks):
            notes.append(f"stage{number} shares its warehouses across {len(body)} residual blocks; "
                         "max_blocks_per_stage cuts it into sub-stages (the paper uses 3 for ConvNeXt-Tiny)")
        for part_index, part in enumerate(parts):
            label = f"stage{number}" + (_letters(part_index) if len(parts) > 1 else "")
            label_of_block.update((block, label) for block in part)
        last_label.append(label)
    label_of_add = {blocks[i].add: label for i, label in label_of_block.items()}
    stages = {}
    for cand in graph.candidates:
        if cand.name in handover:
            stages[cand.name] = last_label[handover[cand.name]]
        elif cand.name in owner:
            stages[cand.name] = label_of_block[owner[cand.name]]
        else:
            adds = graph.adds_upstream(cand.name)
            stages[cand.name] = label_of_add[adds[0]] if adds else "pre"
    return stages


def _cut_body(body: list[int], blocks, options: PlanOptions) -> list[list[int]]:
    """A body's sub-stages: groups of transformer blocks, or of residual blocks.

    A body holding attention (all of a ViT's blocks, a Swin stage) is cut into groups of
    at most ``blocks_per_warehouse`` transformer blocks (paper: DeiT's warehouses are
    shared by several consecutive blocks); any other body by ``max_blocks_per_stage``
    residual adds (None: uncut, the paper's CNN stages).
    """
    units = _units_of_attention(body, blocks)
    if not units:
        return _split_evenly(body, options.max_blocks_per_stage)
    return [[index for unit in part for index in unit]
            for part in _split_evenly(units, options.blocks_per_warehouse)]


def _units_of_attention(body: list[int], blocks) -> list[list[int]]:
    """Transformer blocks of a body: each attention add with the adds after it up to the
    next attention add (a ViT block's attention and MLP); [] when the body has no attention."""
    if not any(blocks[index].attention for index in body):
        return []
    units: list[list[int]] = []
    for index in body:
        if blocks[index].attention or not units:
            units.append([index])
        else:
            units[-1].append(index)
    return units


def _same_stream(shape: tuple[int, ...], other: tuple[int, ...]) -> bool:
    """True when two residual adds carry the same stream, up to reshapes and permutes.

    Equal shapes continue a body (spec rule 4).  Transformers re-lay their stream out
    between adds (timm's Swin: (1, 56, 56, 96) then (1, 3136, 96); MaxViT's windows:
    (1, 64, 56, 56) then (1, 64, 49, 64)) without changing width or resolution: same
    numel and a dimension (the width) in common.  A stage change alters the numel
    (ResNet: 64x56x56 -> 128x28x28) or, at equal numel, every dimension (C -> 4C at half
    resolution).
    """
    if shape == other:
        return True
    return math.prod(shape) == math.prod(other) and bool(set(shape[1:]) & set(other[1:]))


def _split_evenly(items: list[int], most: int | None) -> list[list[int]]:
    """Cut ``items`` into the fewest near-equal consecutive parts of at most ``most``."""
    if most is None or len(items) <= most:
        return [items]
    parts = -(-len(items) // most)
    sizes = [len(items) // parts + (p < len(items) % parts) for p in range(parts)]
    starts = [sum(sizes[:p]) for p in range(parts)]
    return [items[s:s + size] for s, size in zip(starts, sizes)]


def _letters(index: int) -> str:
    return string.ascii_lowercase[index] if index < 26 else f"_{index}"


def attention_norm(graph: LayerGraph, options: PlanOptions) -> str:
    if options.attention_norm != "auto":
        return options.attention_norm
    if "layernorm" in graph.norm_types and "batchnorm" not in graph.norm_types:
        return "layernorm"
    return "batchnorm"
