"""Planner: LayerGraph + budget + options -> Plan (which layers share which warehouse).

KernelWarehouse (Li & Yao, ICML 2024) shares one warehouse among the layers of a
"reassigned stage": a stage's first layers, which read the previous stage's output, are
handed to the previous stage so that each warehouse keeps large common channel divisors.
:func:`plan` finds those stages on any traced model with one generic rule (residual
bodies, handovers, "pre" layers; :func:`group_layers`), sizes cells, warehouses and
attention with :mod:`kwconvert.cells`, and keeps the result under a parameter bound
(:func:`_honour_budget`).  With the default options it reproduces the paper's Table 14
layouts and the reference implementation's parameter counts.

The ``Plan`` is the only thing handed from planning to rewriting (trace -> plan ->
rewrite -> io), so it can be printed, edited, saved as JSON and applied later.
"""
from __future__ import annotations

import collections
import dataclasses
import fnmatch
import functools
import json
import math
import string
from dataclasses import asdict, dataclass, field, fields
from typing import Any, Sequence

import torch
from torch import nn

from . import cells, compat
from .trace import Candidate, LayerGraph, layer_kind, module_inputs, submodule, trace
from .vit import projection_role

#: Version of the plan's JSON schema; bump when a field changes meaning.
PLAN_FORMAT = 1


@dataclass(frozen=True)
class LayerPlan:
    """One converted layer: where its cells come from in its warehouse.

    ``weight_shape`` is ``(C_out, C_in/groups, *kernel)`` (Linear: ``(out, in)``);
    ``cells`` is m; ``offset`` is the number of warehouse cells handed out before this
    layer in the one-to-one walk (paper Sec. 3.3); ``hidden`` is the attention width.
    ``rows`` ``(start, stop)`` converts only those output rows of the layer (a fused qkv's
    value rows, :mod:`kwconvert.vit`); ``weight_shape`` is then the rows' shape.
    """
    name: str
    kind: str
    weight_shape: tuple[int, ...]
    in_channels: int
    groups: int
    cells: int
    offset: int
    hidden: int
    rows: tuple[int, int] | None = None


@dataclass(frozen=True)
class WarehousePlan:
    """One warehouse: its cell shape, its n cells, and the layers that mix them.

    ``basis_ratio`` is the reference's ``nonlocal_basis_ratio`` when the parameter saver
    is on (b < 1), else None.  ``attention_norm`` is "batchnorm" or "layernorm".
    ``init_error`` is filled by the rewriter for b < 1 weight-preserving conversion.
    """
    name: str
    layers: tuple[LayerPlan, ...]
    cell: tuple[int, ...]
    m_t: int
    n: int
    budget: float
    attention_norm: str = "batchnorm"
    basis_ratio: float | None = None
    warehouse_params: int = 0
    attention_params: int = 0
    init_error: float | None = None

    @property
    def layer_names(self) -> tuple[str, ...]:
        return tuple(layer.name for layer in self.layers)

    @property
    def params(self) -> int:
        """Parameters this warehouse adds to the model: its cells and its layers' attention."""
        return self.warehouse_params + self.attention_params


@dataclass(frozen=True)
class StaticLayer:
    """A candidate layer left as it is, and why (stem, head, squeeze-excitation, ...)."""
    layer: str
    reason: str


@dataclass(frozen=True)
class Plan:
    """Everything the rewriter needs, and everything a user needs to judge the plan."""
    model: str
    budget: float
    warehouses: tuple[WarehousePlan, ...]
    plain: tuple[StaticLayer, ...]
    params_baseline: int
    params_converted: int
    input_size: tuple[int, ...] | None = None
    options: dict[str, Any] = field(default_factory=dict)
    notes: tuple[str, ...] = ()
    module: str | None = None
    unpacked_attention: tuple[str, ...] = ()

    # --- JSON -------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        """The documented JSON schema (README "Plan JSON"), plus per-layer details."""
        return {
            "format": PLAN_FORMAT,
            "model": self.model,
            "budget": self.budget,
            "input_size": list(self.input_size) if self.input_size else None,
            "params": {"baseline": self.params_baseline, "converted": self.params_converted},
            "warehouses": [_warehouse_to_dict(w) for w in self.warehouses],
            "plain": [asdict(s) for s in self.plain],
            "options": self.options,
            "notes": list(self.notes),
            "module": self.module,
            "unpacked_attention": list(self.unpacked_attention),
        }

    def to_json(self, indent: int | None = 2) -> str:
        return json.dumps(self.to_dict(), indent=indent, sort_keys=False)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "Plan":
        """The plan a :meth:`to_dict` (or a hand-edited copy of it) describes.

        A missing or mistyped field, and numbers that contradict each other (m, m_t, n,
        offsets, cells: :func:`check_consistent`), are one ValueError naming the field.
        """
        plan = _Fields(data, "")
        fmt = plan.integer("format", default=PLAN_FORMAT)
        if fmt > PLAN_FORMAT:
            raise ValueError(f"plan format {fmt} is newer than this kwconvert reads ({PLAN_FORMAT}); "
                             "upgrade kwconvert")
        params = plan.obj("params")
        input_size = plan.integers("input_size", default=None)
        result = cls(
            model=plan.text("model"),
            budget=plan.number("budget"),
            warehouses=tuple(_warehouse_from_dict(w, index) for index, w in enumerate(plan.array("warehouses"))),
            plain=tuple(_static_from_dict(s, index) for index, s in enumerate(plan.array("plain"))),
            params_baseline=params.integer("baseline"),
            params_converted=params.integer("converted"),
            input_size=input_size or None,
            options=dict(plan.obj("options", default={}).data),
            notes=plan.texts("notes", default=()),
            module=plan.text("module", default=None),
            unpacked_attention=plan.texts("unpacked_attention", default=()),
        )
        check_consistent(result)
        return result

    @classmethod
    def from_json(cls, text: str) -> "Plan":
        return cls.from_dict(json.loads(text))

    # --- views ------------------------------------------------------------------------
    @property
    def converted_layers(self) -> tuple[str, ...]:
        return tuple(name for w in self.warehouses for name in w.layer_names)

    def warehouse_of(self, layer_name: str) -> WarehousePlan | None:
        for warehouse in self.warehouses:
            if layer_name in warehouse.layer_names:
                return warehouse
        return None

    @property
    def ratio(self) -> float:
        """Converted / baseline parameters."""
        return self.params_converted / self.params_baseline if self.params_baseline else float("nan")

    def table(self):
        """A rich renderable: one table per warehouse, a summary, the plain layers, totals."""
        from rich.console import Group
        from rich.table import Table
        from rich.text import Text

        parts = []
        for w in self.warehouses:
            table = Table(title=f"{w.name}: cell {_dims(w.cell)}, m_t {w.m_t}, n {w.n}", title_justify="left")
            for column, justify in (("layer", "left"), ("kernel", "right"), ("cell", "right"), ("m", "right")):
                table.add_column(column, justify=justify)
            for layer in w.layers:
                rows = f" (rows {layer.rows[0]}:{layer.rows[1]})" if layer.rows else ""
                table.add_row(layer.name + rows, _dims(layer.weight_shape), _dims(w.cell), str(layer.cells))
            parts.append(table)
        where = f" (module {self.module})" if self.module else ""
        summary = Table(title=f"{self.model}{where} at b = {self.budget:g}: {len(self.warehouses)} warehouses",
                        title_justify="left")
        for column in ("warehouse", "layers", "cell", "m_t", "n", "warehouse params", "attention params"):
            summary.add_column(column, justify="left" if column == "warehouse" else "right")
        for w in self.warehouses:
            summary.add_row(w.name, str(len(w.layers)), _dims(w.cell), str(w.m_t), str(w.n),
                            f"{w.warehouse_params:,}", f"{w.attention_params:,}")
        parts.append(summary)
        if self.plain:
            plain = Table(title="plain layers", title_justify="left")
            plain.add_column("layer")
            plain.add_column("reason")
            for static in self.plain:
                plain.add_row(static.layer, static.reason)
            parts.append(plain)
        parts.append(Text(f"baseline params {self.params_baseline:,}   converted params "
                          f"{self.params_converted:,}   ratio {self.ratio:.3f}"))
        parts.extend(Text(f"note: {note}", style="dim") for note in self.notes)
        return Group(*parts)


def _dims(shape: tuple[int, ...]) -> str:
    return "x".join(map(str, shape))


def _warehouse_to_dict(w: WarehousePlan) -> dict[str, Any]:
    return {
        "name": w.name,
        "layers": list(w.layer_names),
        "cell": list(w.cell),
        "m": [layer.cells for layer in w.layers],
        "m_t": w.m_t,
        "n": w.n,
        "budget": w.budget,
        "params": {"warehouse": w.warehouse_params, "attention": w.attention_params},
        "attention": {"norm": w.attention_norm, "basis_ratio": w.basis_ratio},
        "init_error": w.init_error,
        "layer_details": [
            {"kind": l.kind, "weight_shape": list(l.weight_shape), "in_channels": l.in_channels,
             "groups": l.groups, "offset": l.offset, "hidden": l.hidden,
             "rows": list(l.rows) if l.rows else None}
            for l in w.layers
        ],
    }


def _warehouse_from_dict(data: Any, index: int) -> WarehousePlan:
    name = data.get("name") if isinstance(data, dict) else None
    warehouse = _Fields(data, f"warehouse {name}" if isinstance(name, str) else f"warehouses[{index}]")
    names, counts = warehouse.texts("layers"), warehouse.integers("m")
    details = warehouse.array("layer_details")
    if not (len(names) == len(counts) == len(details)):
        raise ValueError(f"plan JSON: {warehouse.where}: 'layers', 'm' and 'layer_details' differ in length "
                         f"({len(names)}, {len(counts)}, {len(details)})")
    layers = tuple(_layer_from_dict(detail, layer_name, m, warehouse.where)
                   for layer_name, m, detail in zip(names, counts, details))
    params, attention = warehouse.obj("params"), warehouse.obj("attention")
    return WarehousePlan(
        name=warehouse.text("name"), layers=layers, cell=warehouse.integers("cell"),
        m_t=warehouse.integer("m_t"), n=warehouse.integer("n"), budget=warehouse.number("budget"),
        attention_norm=attention.text("norm"), basis_ratio=attention.number("basis_ratio", default=None),
        warehouse_params=params.integer("warehouse"), attention_params=params.integer("attention"),
        init_error=warehouse.number("init_error", default=None))


def _layer_from_dict(data: Any, name: str, cells_of_layer: int, where: str) -> LayerPlan:
    detail = _Fields(data, f"{where}, layer {name}")
    rows = detail.integers("rows", default=None)
    if rows is not None and len(rows) != 2:
        raise ValueError(f"plan JSON: {detail.where}: 'rows' must be [start, stop], got {list(rows)}")
    return LayerPlan(name=name, kind=detail.text("kind"), weight_shape=detail.integers("weight_shape"),
                     in_channels=detail.integer("in_channels"), groups=detail.integer("groups"),
                     cells=cells_of_layer, offset=detail.integer("offset"), hidden=detail.integer("hidden"),
                     rows=rows or None)


def _static_from_dict(data: Any, index: int) -> StaticLayer:
    static = _Fields(data, f"plain[{index}]")
    return StaticLayer(layer=static.text("layer"), reason=static.text("reason"))


_REQUIRED = object()


class _Fields:
    """One JSON object of a plan, read field by field with its type checked.

    Plans are data a user may edit by hand; a missing key or a value of the wrong type is
    one ValueError naming where it is ("plan JSON: warehouse stage1.conv2d: 'n' must be an
    integer, got '27'"), not a KeyError or TypeError from deep inside the parser.
    """

    def __init__(self, data: Any, where: str):
        if not isinstance(data, dict):
            raise ValueError(f"plan JSON{f': {where}' if where else ''} must be an object, got {_json_type(data)}")
        self.data, self.where = data, where

    def integer(self, key: str, default: Any = _REQUIRED) -> int:
        return self._get(key, default, "an integer", _is_integer)

    def number(self, key: str, default: Any = _REQUIRED) -> float | None:
        value = self._get(key, default, "a number", _is_number)
        return float(value) if value is not None else None

    def text(self, key: str, default: Any = _REQUIRED) -> str:
        return self._get(key, default, "a string", lambda v: isinstance(v, str))

    def integers(self, key: str, default: Any = _REQUIRED) -> tuple[int, ...] | None:
        value = self._get(key, default, "a list of integers",
                          lambda v: isinstance(v, list) and all(map(_is_integer, v)))
        return tuple(value) if value is not None else None

    def texts(self, key: str, default: Any = _REQUIRED) -> tuple[str, ...]:
        value = self._get(key, default, "a list of strings",
                          lambda v: isinstance(v, list) and all(isinstance(x, str) for x in v))
        return tuple(value)

    def array(self, key: str) -> list:
        return self._get(key, _REQUIRED, "a list", lambda v: isinstance(v, list))

    def obj(self, key: str, default: Any = _REQUIRED) -> "_Fields":
        value = self._get(key, default, "an object", lambda v: isinstance(v, dict))
        return _Fields(value, f"{self.where}: '{key}'" if self.where else f"'{key}'")

    def _get(self, key: str, default: Any, expected: str, valid) -> Any:
        """The value at ``key``; ``default`` (or null, when the default is) if absent."""
        where = f"plan JSON: {self.where}: '{key}'" if self.where else f"plan JSON: '{key}'"
        if key not in self.data:
            if default is _REQUIRED:
                raise ValueError(f"{where} is missing")
            return default
        value = self.data[key]
        if value is None and default is None or valid(value):
            return value
        shown = f" {value!r}" if isinstance(value, (str, int, float)) and not isinstance(value, bool) else ""
        raise ValueError(f"{where} must be {expected}{' or null' if default is None else ''}, "
                         f"got {_json_type(value)}{shown[:80]}")


def _is_integer(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _json_type(value: Any) -> str:
    names = {dict: "an object", list: "a list", str: "a string", bool: "a boolean", int: "an integer",
             float: "a number", type(None): "null"}
    return names.get(type(value), type(value).__name__)


# =======================================================================================
# Consistency
# =======================================================================================
_KERNEL_RANK = {"conv1d": 3, "conv2d": 4, "conv3d": 5, "linear": 2}
_ATTENTION_NORMS = ("batchnorm", "layernorm")


def check_consistent(plan: Plan) -> None:
    """Refuse a plan whose numbers contradict each other, naming the warehouse and field.

    Plans are data a user may edit by hand.  :meth:`Plan.from_dict` runs this as it reads
    one, so an edited plan is refused before anything prints it, and
    :func:`kwconvert.rewrite.check_plan_fits` runs it before applying one (a plan edited
    in Python), and :func:`plan` on what it made.  These are the checks that need no model:
    each layer's m is the number of cells tiling its kernel, offsets follow the one-to-one
    walk (paper Sec. 3.3; :func:`kwconvert.cells.cells_handed_out`), m_t is the sum of m,
    n holds the walk and is ``max(floor(b * m_t), 1)``, and the parameter counts follow
    from them.  Whether the plan describes a given model is ``check_plan_fits``'s part.
    """
    try:
        check_budget(plan.budget)
    except ValueError as err:
        raise ValueError(f"plan: {err}") from None
    mode = plan.options.get("mode", "kernelwarehouse") if isinstance(plan.options, dict) else None
    if mode not in _MODE_CHOICES:
        raise ValueError(f"plan: options.mode must be one of {', '.join(_MODE_CHOICES)}, got {mode!r}")
    plain = {static.layer for static in plan.plain}
    warehouse_names: set[str] = set()
    warehouse_of: dict[str, str] = {}
    for warehouse in plan.warehouses:
        if warehouse.name in warehouse_names:
            raise ValueError(f"plan warehouse {warehouse.name}: two warehouses have that name")
        warehouse_names.add(warehouse.name)
        _check_warehouse(warehouse, mode)
        for name in warehouse.layer_names:
            where = f"plan warehouse {warehouse.name}, layer {name}"
            if name in warehouse_of:
                raise ValueError(f"{where}: the layer is planned twice (also in warehouse {warehouse_of[name]})")
            if name in plain:
                raise ValueError(f"{where}: the layer is also listed as plain")
            warehouse_of[name] = warehouse.name


def _check_warehouse(warehouse: WarehousePlan, mode: str) -> None:
    where = f"plan warehouse {warehouse.name}"
    if not warehouse.layers:
        raise ValueError(f"{where}: it has no layers")
    try:
        check_budget(warehouse.budget)
    except ValueError as err:
        raise ValueError(f"{where}: {err}") from None
    if warehouse.attention_norm not in _ATTENTION_NORMS:
        raise ValueError(f"{where}: attention norm must be one of {', '.join(_ATTENTION_NORMS)}, "
                         f"got {warehouse.attention_norm!r}")
    if warehouse.basis_ratio is not None and not 0 < warehouse.basis_ratio <= 1:
        raise ValueError(f"{where}: basis_ratio must be in (0, 1] or null, got {warehouse.basis_ratio}")
    handed_out = 0
    for layer in warehouse.layers:
        _check_layer(layer, warehouse, f"{where}, layer {layer.name}", handed_out)
        handed_out += cells.cells_handed_out(layer.cells, warehouse.budget)
    m_t = sum(layer.cells for layer in warehouse.layers)
    if m_t != warehouse.m_t:
        raise ValueError(f"{where}: m_t is {warehouse.m_t}, its layers' m sum to {m_t}")
    if warehouse.n < 1 or handed_out > warehouse.n:
        raise ValueError(f"{where}: n is {warehouse.n}, too few for the {handed_out} cells its layers start on")
    n = cells.warehouse_size(m_t, warehouse.budget)
    if mode == "kernelwarehouse" and n != warehouse.n:
        raise ValueError(f"{where}: n is {warehouse.n}, budget {warehouse.budget:g} x m_t {m_t} gives {n}")
    if warehouse.warehouse_params != warehouse.n * math.prod(warehouse.cell):
        raise ValueError(f"{where}: params.warehouse is {warehouse.warehouse_params}, n {warehouse.n} cells "
                         f"of {_dims(warehouse.cell)} hold {warehouse.n * math.prod(warehouse.cell)}")
    attention = sum(cells.attention_params(layer.in_channels, layer.hidden, layer.cells, warehouse.n,
                                           norm=warehouse.attention_norm, budget=warehouse.budget,
                                           basis_ratio=warehouse.basis_ratio) for layer in warehouse.layers)
    if warehouse.attention_params != attention:
        raise ValueError(f"{where}: params.attention is {warehouse.attention_params}, its layers' attention "
                         f"holds {attention}")


def _check_layer(layer: LayerPlan, warehouse: WarehousePlan, where: str, handed_out: int) -> None:
    """One layer's kind, kernel, sizes, rows, m and offset (``handed_out``: the walk so far)."""
    rank = _KERNEL_RANK.get(layer.kind)
    if rank is None:
        raise ValueError(f"{where}: kind is {layer.kind!r}, not one of {', '.join(cells.KINDS)}")
    if len(layer.weight_shape) != rank or min(layer.weight_shape) < 1:
        raise ValueError(f"{where}: weight_shape {list(layer.weight_shape)} is not a {layer.kind} kernel "
                         f"({rank} positive sizes)")
    for name in ("in_channels", "groups", "hidden"):
        if getattr(layer, name) < 1:
            raise ValueError(f"{where}: {name} must be positive, got {getattr(layer, name)}")
    if layer.rows is not None:
        start, stop = layer.rows
        if not 0 <= start < stop or stop - start != layer.weight_shape[0]:
            raise ValueError(f"{where}: rows {start}:{stop} do not match the {layer.weight_shape[0]} output "
                             f"rows of weight_shape {_dims(layer.weight_shape)}")
    try:
        count = cells.cells_in(layer.weight_shape, warehouse.cell)
    except ValueError as err:
        raise ValueError(f"{where}: {err}") from None
    if count != layer.cells:
        raise ValueError(f"{where}: m is {layer.cells} but cell {_dims(warehouse.cell)} tiles the kernel in "
                         f"{count} (kernel {_dims(layer.weight_shape)})")
    if layer.offset != handed_out:
        raise ValueError(f"{where}: offset is {layer.offset}, the one-to-one walk gives {handed_out}")


# =======================================================================================
# Options
# =======================================================================================
_STEM_CHOICES = ("auto", "plain", "warehouse")
_NORM_CHOICES = ("auto", "batchnorm", "layernorm")
_MODE_CHOICES = ("kernelwarehouse", "dynamic_conv")


@dataclass(frozen=True)
class PlanOptions:
    """How the planner groups layers into warehouses; the defaults reproduce the paper.

    Every field carries its help text (``PlanOptions.help()``), so the command line and
    the docs read them from one place.
    """
    stem: str = field(default="auto", metadata={"help": (
        "the first conv: 'auto' keeps a stem of kernel >= 7x7 plain (ResNet) and gives a "
        "smaller one its own warehouse (MobileNetV2, ConvNeXt); 'plain'; 'warehouse'")})
    stem_fed_pointwise_plain: bool = field(default=True, metadata={"help": (
        "keep 1x1 convs fed directly by the stem plain (ResNet50's layer1.0.conv1 and downsample)")})
    separate_depthwise: bool = field(default=True, metadata={"help": (
        "depthwise convs get their own warehouse per stage (paper: MobileNetV2, ConvNeXt)")})
    separate_grouped: bool = field(default=True, metadata={"help": (
        "grouped, non-depthwise convs get their own warehouse per stage (a GCD over "
        "C_in/groups shared with dense layers collapses the cells: ResNeXt)")})
    squeeze_excitation: str = field(default="warehouse", metadata={"help": (
        "convs on a pooled 1x1 map (squeeze-excitation): 'warehouse' gives them warehouses "
        "of their own per stage (mixed into a stage's warehouse they would collapse its GCDs: "
        "EfficientNet-B0 ~6.4 B parameters at 1x; MobileNetV3 holds 51% of its conv weights "
        "in them); 'plain' keeps them static")})
    expansion_split: bool | str = field(default="auto", metadata={"help": (
        "split pointwise convs into expansion convs (a 1x1 feeding a depthwise) and the rest: "
        "'auto' splits when b > 1 (the reference's MobileNetV2 4x), true, false")})
    max_blocks_per_stage: int | None = field(default=None, metadata={"help": (
        "cut a stage of more than N residual blocks (adds) into near-equal sub-stages of at "
        "most N, with no handover at the cuts (ConvNeXt-Tiny with 3: the paper's 16 warehouses); "
        "stages of attention blocks follow blocks_per_warehouse instead")})
    blocks_per_warehouse: int | None = field(default=3, metadata={"help": (
        "transformers: a stage of attention blocks (all of a ViT's blocks form one) shares its "
        "warehouses within groups of at most N consecutive blocks, a block being an attention "
        "add and the adds after it up to the next attention (3 meets the paper's DeiT counts); "
        "None: one group per stage")})
    static_query_key: bool = field(default=True, metadata={"help": (
        "transformers: keep query and key projections static and convert only the value rows "
        "of a fused qkv / kv projection (paper: DeiT); false converts them like any Linear")})
    include: tuple[str, ...] = field(default=(), metadata={"help": (
        "glob patterns (fnmatch) on layer names; when given, only matching layers may be converted")})
    exclude: tuple[str, ...] = field(default=(), metadata={"help": (
        "glob patterns (fnmatch) on layer names to keep static")})
    reduction: float = field(default=1 / 16, metadata={"help": (
        "attention hidden width = max(int(C_in * reduction), min_hidden)")})
    min_hidden: int = field(default=16, metadata={"help": "smallest attention hidden width"})
    attention_norm: str = field(default="auto", metadata={"help": (
        "norm after the attention's first FC: 'auto' uses LayerNorm when the model normalises "
        "with LayerNorm and has no BatchNorm (ConvNeXt), else BatchNorm1d; 'batchnorm'; 'layernorm'")})
    param_saver: bool | str = field(default="auto", metadata={"help": (
        "the reference's parameter saver for b < 1: 'auto' turns it on when the attention "
        "would otherwise hold more than half as many parameters as the warehouses; true; false")})
    basis_ratio: float = field(default=1 / 16, metadata={"help": (
        "parameter saver basis ratio r (reference 'nonlocal_basis_ratio')")})
    mode: str = field(default="kernelwarehouse", metadata={"help": (
        "'kernelwarehouse', or 'dynamic_conv': vanilla DY-Conv/CondConv as KernelWarehouse's "
        "degenerate case (whole kernels as cells, one warehouse per layer, n = max(int(b), 1))")})
    max_params_ratio: float | str = field(default="auto", metadata={"help": (
        "budget guard: the converted model may hold at most this many times the baseline "
        "parameters; 'auto' = b + 0.5 for b >= 1/2, else 1.0")})

    def __post_init__(self) -> None:
        def choice(name: str, value: Any, choices: tuple) -> None:
            if value not in choices:
                raise ValueError(f"option {name} must be one of {', '.join(map(repr, choices))}, got {value!r}")
        choice("stem", self.stem, _STEM_CHOICES)
        choice("attention_norm", self.attention_norm, _NORM_CHOICES)
        choice("mode", self.mode, _MODE_CHOICES)
        choice("squeeze_excitation", self.squeeze_excitation, ("plain", "warehouse"))
        choice("expansion_split", self.expansion_split, ("auto", True, False))
        choice("param_saver", self.param_saver, ("auto", True, False))
        for name in ("include", "exclude"):
            value = getattr(self, name)
            patterns = (value,) if isinstance(value, str) else tuple(value or ())
            if not all(isinstance(p, str) for p in patterns):
                raise ValueError(f"option {name} must be glob patterns (strings), got {value!r}")
            object.__setattr__(self, name, patterns)
        for name in ("max_blocks_per_stage", "blocks_per_warehouse"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                raise ValueError(f"option {name} must be a positive integer or None, got {value!r}")
        if not isinstance(self.static_query_key, bool):
            raise ValueError(f"option static_query_key must be true or false, got {self.static_query_key!r}")
        for name in ("reduction", "basis_ratio"):
            value = getattr(self, name)
            if not (isinstance(value, (int, float)) and 0 < value <= 1):
                raise ValueError(f"option {name} must be a number in (0, 1], got {value!r}")
        if not (isinstance(self.min_hidden, int) and self.min_hidden >= 1):
            raise ValueError(f"option min_hidden must be a positive integer, got {self.min_hidden!r}")
        if self.max_params_ratio != "auto" and not (
                isinstance(self.max_params_ratio, (int, float)) and self.max_params_ratio > 0):
            raise ValueError(f"option max_params_ratio must be 'auto' or a positive number, "
                             f"got {self.max_params_ratio!r}")

    @classmethod
    def from_kwargs(cls, **options: Any) -> "PlanOptions":
        """Options from keyword arguments; an unknown name is a ValueError listing the valid ones."""
        valid = [f.name for f in fields(cls)]
        unknown = sorted(set(options) - set(valid))
        if unknown:
            raise ValueError(f"unknown plan option(s) {', '.join(unknown)}; valid options: {', '.join(valid)}")
        return cls(**options)

    @classmethod
    def help(cls) -> dict[str, str]:
        return {f.name: f.metadata["help"] for f in fields(cls)}

    def to_dict(self) -> dict[str, Any]:
        return {f.name: list(v) if isinstance(v := getattr(self, f.name), tuple) else v for f in fields(self)}

    def params_ratio(self, budget: float) -> float:
        """The budget guard's bound on converted / baseline parameters."""
        if self.max_params_ratio != "auto":
            return float(self.max_params_ratio)
        return budget + 0.5 if budget >= 0.5 else 1.0


# =======================================================================================
# Budget
# =======================================================================================
def parse_budget(text: str | float) -> float:
    """The budget b from "0.5", "1/2", "4" (or "1/2x", "4x" as the paper writes them)."""
    raw = str(text).strip()
    body = raw[:-1] if raw.lower().endswith("x") else raw
    try:
        numerator, _, denominator = body.partition("/")
        value = float(numerator) / float(denominator) if denominator else float(numerator)
        check_budget(value)
    except (ValueError, ZeroDivisionError):
        raise ValueError(f"budget must be a positive finite number such as 0.5, 1/2, 1 or 4, "
                         f"got {raw!r}") from None
    return value


def check_budget(budget: float) -> float:
    if isinstance(budget, bool) or not isinstance(budget, (int, float)) or not (
            math.isfinite(budget) and budget > 0):
        raise ValueError(f"budget must be a positive finite number, got {budget!r}")
    return float(budget)


# =======================================================================================
# Planning
# =======================================================================================
def plan(model: nn.Module | None, budget: float | str, example_inputs=None, *, model_name: str | None = None,
         graph: LayerGraph | None = None, module: str | None = None, **options: Any) -> Plan:
    """Plan the KernelWarehouse conversion of ``model`` at budget ``budget``.

    Traces the model (or uses ``graph``), groups its Conv/Linear layers into warehouses by
    the paper's reassigned stages (see :func:`group_layers`), sizes cells, warehouses and
    attention with :mod:`kwconvert.cells`, and applies the budget guard.  ``options`` are
    :class:`PlanOptions` fields.

    ``module="backbone.body"`` plans only that sub-module (see :func:`_plan_module`); the
    plan still names the whole model's layers, so ``convert(model, plan)`` applies it.
    """
    budget = parse_budget(budget) if isinstance(budget, str) else check_budget(budget)
    if module:
        return _plan_module(model, budget, example_inputs, module, model_name, graph, options)
    opts = PlanOptions.from_kwargs(**options)
    if graph is None:
        if model is None:
            raise ValueError("plan() needs a model or a traced graph")
        graph = trace(model, example_inputs)
    name = model_name or (type(model).__name__ if model is not None else "model")
    grouping = group_layers(graph, budget, opts)
    norm = _attention_norm(graph, opts)
    sizing = _Sizing(budget, opts, norm)
    groups, plain, notes = grouping.groups, dict(grouping.plain), list(graph.notes) + grouping.notes
    limit = opts.params_ratio(budget) * graph.params_baseline
    groups, saver = _honour_budget(graph, groups, plain, sizing, limit, notes)
    warehouses = tuple(sizing.warehouse(g.name, g.members, saver) for g in groups)
    dropped = sum(math.prod(l.weight_shape) + graph.candidate(l.name).extra_params
                  for w in warehouses for l in w.layers)
    params = graph.params_baseline - dropped + sum(w.params for w in warehouses)
    order = {c.name: c.order for c in graph.candidates}
    static = tuple(StaticLayer(layer, reason) for layer, reason in
                   sorted(plain.items(), key=lambda kv: (order.get(kv[0], len(order)), kv[0])))
    converted = {layer.name for w in warehouses for layer in w.layers}
    unpacked = tuple(path for path in graph.unpacked_attention
                     if any(name.startswith(f"{path}.") for name in converted))
    result = Plan(model=name, budget=budget, warehouses=warehouses, plain=static,
                  params_baseline=graph.params_baseline, params_converted=params,
                  input_size=graph.input_shapes[0][1:] if len(graph.input_shapes) == 1 else None,
                  options=opts.to_dict(), notes=tuple(dict.fromkeys(notes)), unpacked_attention=unpacked)
    check_consistent(result)  # what convert() and Plan.from_dict will check: refuse it now, not then
    return result


def _plan_module(model: nn.Module | None, budget: float, example_inputs, path: str, model_name: str | None,
                 graph: LayerGraph | None, options: dict[str, Any]) -> Plan:
    """Plan sub-module ``path`` of ``model`` only; every layer outside it stays plain.

    The sub-module is traced on the input it receives in one forward of the whole model
    (``example_inputs`` are the whole model's; :func:`kwconvert.trace.module_inputs`), so
    a detector's backbone sees the normalised, resized batch its transform makes.  The
    budget guard bounds the sub-module against its own parameters; the plan's totals are
    the whole model's, so a converted model holds exactly ``params_converted``.
    """
    if model is None:
        raise ValueError(f"planning module {path} needs the whole model, not only a traced graph")
    inner_model = submodule(model, path)
    if graph is None:
        graph = trace(inner_model, module_inputs(model, path, example_inputs))
    name = model_name or type(model).__name__
    inner = plan(inner_model, budget, graph=graph, model_name=name, **options)
    prefix = f"{path}."
    warehouses = tuple(dataclasses.replace(w, layers=tuple(dataclasses.replace(l, name=prefix + l.name)
                                                           for l in w.layers)) for w in inner.warehouses)
    plain = [StaticLayer(prefix + s.layer, s.reason) for s in inner.plain]
    plain += [StaticLayer(n, f"outside module {path}") for n, m in model.named_modules()
              if layer_kind(m) and not n.startswith(prefix)]
    baseline = sum(p.numel() for p in model.parameters())
    notes = (f"only module {path} is converted ({inner.params_baseline:,} of the model's {baseline:,} "
             "parameters); the budget guard bounds it against its own parameters",) + inner.notes
    if isinstance(example_inputs, torch.Tensor):
        input_size = tuple(example_inputs.shape[1:])
    elif isinstance(example_inputs, (tuple, list)) and len(example_inputs) == 1 \
            and isinstance(example_inputs[0], torch.Tensor):
        input_size = tuple(example_inputs[0].shape[1:])
    else:
        input_size = None
    return dataclasses.replace(
        inner, warehouses=warehouses, plain=tuple(plain), params_baseline=baseline,
        params_converted=baseline - inner.params_baseline + inner.params_converted,
        input_size=input_size, notes=notes, module=path,
        unpacked_attention=tuple(prefix + p for p in inner.unpacked_attention))


@dataclass
class Group:
    """Layers that will share one warehouse (before sizing)."""
    name: str
    members: list[Candidate]


@dataclass
class Grouping:
    """Warehouse groups (by first member), static layers with reasons, and notes."""
    groups: list[Group]
    plain: dict[str, str]
    notes: list[str]


def group_layers(graph: LayerGraph, budget: float, options: PlanOptions) -> Grouping:
    """Decide which layers stay plain and which share a warehouse.

    The generic rule (KERNELWAREHOUSE.md "A generic grouping rule"): residual blocks in
    execution order form bodies; a body ends where the block shape changes or the chain of
    adds breaks, and the new body's layers reading the previous body's last add are handed
    over to it (the paper's "reassigned stages"); layers in no block join the body of the
    latest add upstream ("pre" when there is none).  The warehouse key is then (stage,
    layer kind, depthwise / grouped / expansion role).
    """
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
    stems = set(graph.stems) if graph.exact else {graph.candidates[0].name}
    stages = _stages(graph, options, notes)
    split_expansion = budget > 1 if options.expansion_split == "auto" else options.expansion_split
    keyed: dict[str, Group] = {}
    for cand in converted:
        stage = "stem" if cand.name in stems else stages.get(cand.name, "pre")
        name = f"{stage}.{_role(graph, cand, options, split_expansion)}"
        keyed.setdefault(name, Group(name, [])).members.append(cand)
    return Grouping(list(keyed.values()), plain, notes)


def _static_reason(graph: LayerGraph, cand: Candidate, options: PlanOptions) -> str | None:
    """Why a candidate stays a normal layer, or None when it may be converted."""
    if options.include and not any(fnmatch.fnmatchcase(cand.name, p) for p in options.include):
        return "excluded by option"
    if any(fnmatch.fnmatchcase(cand.name, p) for p in options.exclude):
        return "excluded by option"
    if cand.input_shape is not None and len(cand.input_shape) == 2:
        return "head"
    if cand.custom_forward and cand.custom_forward not in EQUIVALENT_FORWARDS | compat.EXTRAS.keys():
        return (f"{cand.custom_forward.rsplit('.', 1)[-1]} overrides torch's forward; a KernelWarehouse "
                "layer would not compute what it computes")
    if cand.weight_read:
        return "the model reads its weight outside its forward (e.g. for a dtype); a converted layer has none"
    if _on_pooled_map(cand) and options.squeeze_excitation == "plain":
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


#: Conv/Linear subclasses whose own forward computes exactly torch's (timm's Linear only
#: casts the weight to the input's dtype for TorchScript): they convert like their base.
#: Those of :data:`kwconvert.compat.EXTRAS` (timm's 'SAME' padding and weight
#: standardisation) convert too; any other subclass with its own forward stays static.
EQUIVALENT_FORWARDS = frozenset({"timm.layers.linear.Linear"})


def _on_pooled_map(cand: Candidate) -> bool:
    return bool(cand.input_spatial) and math.prod(cand.input_spatial) == 1


def _fed_by_stem(graph: LayerGraph, cand: Candidate) -> bool:
    if not graph.exact:
        return cand.order == 1
    inputs = graph.direct_inputs(cand.name)
    return bool(inputs) and all(i in graph.stems for i in inputs)


def _role(graph: LayerGraph, cand: Candidate, options: PlanOptions, split_expansion: bool) -> str:
    """The warehouse-key suffix: the layer kind, or its role when it gets its own warehouse."""
    if _on_pooled_map(cand):
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


def _stages(graph: LayerGraph, options: PlanOptions, notes: list[str]) -> dict[str, str]:
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


def _attention_norm(graph: LayerGraph, options: PlanOptions) -> str:
    if options.attention_norm != "auto":
        return options.attention_norm
    if "layernorm" in graph.norm_types and "batchnorm" not in graph.norm_types:
        return "layernorm"
    return "batchnorm"


@dataclass(frozen=True)
class _Sizing:
    """Cells, n and attention of a warehouse, from kwconvert.cells (paper Sec. 3)."""
    budget: float
    options: PlanOptions
    norm: str

    def warehouse(self, name: str, members: Sequence[Candidate], saver: bool = False) -> WarehousePlan:
        cell, counts, n, basis_ratio = self._layout(members, saver)
        layers, offset = [], 0
        for cand, m in zip(members, counts):
            layers.append(LayerPlan(name=cand.name, kind=cand.kind, weight_shape=tuple(cand.weight_shape),
                                    in_channels=cand.in_channels, groups=cand.groups, cells=m,
                                    offset=offset, hidden=self._hidden(cand), rows=cand.rows))
            offset += cells.cells_handed_out(m, self.budget)
        return WarehousePlan(name=name, layers=tuple(layers), cell=cell, m_t=sum(counts), n=n,
                             budget=self.budget, attention_norm=self.norm, basis_ratio=basis_ratio,
                             warehouse_params=n * math.prod(cell),
                             attention_params=self._attention(members, counts, n, basis_ratio))

    def cost(self, members: Sequence[Candidate], saver: bool = False) -> int:
        """Parameters a group adds over the static layers it replaces (may be negative).

        The arithmetic of :meth:`warehouse` without building the plan: the budget guard
        evaluates it for every split it considers.
        """
        cell, counts, n, basis_ratio = self._layout(members, saver)
        return (n * math.prod(cell) + self._attention(members, counts, n, basis_ratio)
                - sum(c.weight_numel for c in members))

    def _layout(self, members: Sequence[Candidate], saver: bool):
        """``(cell, m per layer, n, basis_ratio)``; dynamic_conv cells are whole kernels."""
        shapes = [c.weight_shape for c in members]
        if self.options.mode == "dynamic_conv":
            cell = tuple(shapes[0])
        else:
            cell = cells.cell_shape(shapes, self.budget)
        counts = [cells.cells_in(shape, cell) for shape in shapes]
        basis_ratio = self.options.basis_ratio if saver and self.budget < 1 else None
        return cell, counts, cells.warehouse_size(sum(counts), self.budget), basis_ratio

    def _hidden(self, cand: Candidate) -> int:
        return cells.hidden_size(cand.in_channels, self.options.reduction, self.options.min_hidden)

    def _attention(self, members: Sequence[Candidate], counts: Sequence[int], n: int,
                   basis_ratio: float | None) -> int:
        return sum(cells.attention_params(cand.in_channels, self._hidden(cand), m, n, norm=self.norm,
                                          budget=self.budget, basis_ratio=basis_ratio)
                   for cand, m in zip(members, counts))


def _use_saver(sizing: _Sizing, groups: list[Group]) -> bool:
    """Spec rule: the saver is on when b < 1 and attention > half the warehouse parameters."""
    if sizing.budget >= 1 or sizing.options.param_saver is False or sizing.options.mode == "dynamic_conv":
        return False
    if sizing.options.param_saver is True:
        return True
    planned = [sizing.warehouse(g.name, g.members) for g in groups]
    return sum(w.attention_params for w in planned) > 0.5 * sum(w.warehouse_params for w in planned)


def _honour_budget(graph: LayerGraph, groups: list[Group], plain: dict[str, str], sizing: _Sizing,
                   limit: float, notes: list[str]) -> tuple[list[Group], bool]:
    """Budget guard: keep the converted model under ``limit`` parameters.

    The attention of a warehouse grows with m_t squared (fc2 is hidden x m x (n + 1) per
    layer and n = b * m_t), so a warehouse whose GCDs collapse (MobileNetV3's gcd 8,
    DenseNet's one "pre" stage, RegNet's 208 -> 440 handover) explodes, and a layer whose
    cells are tiny against its input width (depthwise convs at b < 1) costs more than it
    holds.  Only while the model is over the limit (so plans that fit, such as the paper's
    four models at Table 14's budgets, are never touched), the guard applies:

    1. the split that saves the most parameters: one warehouse in two, by execution order
       or by channel pattern (:func:`_best_split`); repeat;
    2. when no split saves anything, keep static the layer whose conversion costs the
       most (reason "kept static to honour the budget"); repeat.

    Splits come first because they keep every layer dynamic: the paper finds sharing
    within each layer nearly as good as within each stage (ResNet18 KW 1x: 74.34 vs
    74.77 top-1), and a static layer loses the method altogether.
    """
    saver = _use_saver(sizing, groups)
    if saver:
        notes.append(f"parameter saver on (basis ratio {sizing.options.basis_ratio:g}): at b < 1 the "
                     "attention would otherwise hold more than half as many parameters as the warehouses")
    allowed = limit - graph.params_baseline  # total cost the warehouses may add
    parts = [_Part(g.name, list(g.members), sizing, saver) for g in groups]
    splits: dict[str, int] = {}
    kept_static = []
    while sum(p.cost for p in parts) > allowed:
        index, part = max(enumerate(parts), key=lambda ip: (ip[1].split_saving, -ip[0]))
        if part.split_saving > 0:
            _, first, second = part.split
            parts[index:index + 1] = [_Part(part.name, first, sizing, saver),
                                      _Part(part.name, second, sizing, saver)]
            splits[part.name] = splits.get(part.name, 1) + 1
        else:
            index, part = max(enumerate(parts), key=lambda ip: (ip[1].drop[0], -ip[0]))
            if part.drop[0] <= 0:
                break
            _, drop = part.drop
            kept_static.append(part.members[drop].name)
            plain[part.members[drop].name] = "kept static to honour the budget"
            rest = part.members[:drop] + part.members[drop + 1:]
            parts[index:index + 1] = [_Part(part.name, rest, sizing, saver)] if rest else []
    total = graph.params_baseline + sum(p.cost for p in parts)
    if splits:
        notes.append("budget guard: split " + ", ".join(f"{name} into {k}" for name, k in splits.items())
                     + " to bound the attention size")
    if kept_static:
        notes.append(f"budget guard: kept {len(kept_static)} layer(s) static to honour the budget")
    if total > limit:
        notes.append(f"budget guard: the plan holds {total / graph.params_baseline:.2f}x the baseline "
                     f"parameters, over the limit of {limit / graph.params_baseline:.2f}x; no remedy was left")
    return _renumber([(p.name, p.members) for p in parts]), saver


class _Part:
    """A warehouse under the guard: its cost, its best split and its costliest layer."""

    def __init__(self, name: str, members: list[Candidate], sizing: _Sizing, saver: bool):
        self.name, self.members, self.sizing, self.saver = name, members, sizing, saver
        self.cost = sizing.cost(members, saver)

    @functools.cached_property
    def split(self) -> tuple[int, list[Candidate], list[Candidate]] | None:
        """``(saving, first, second)`` of the best two-way split, None for one layer."""
        if len(self.members) < 2:
            return None
        first, second, costs = _best_split(self.sizing, self.members, self.saver)
        return self.cost - sum(costs), first, second

    @functools.cached_property
    def drop(self) -> tuple[int, int]:
        """``(saving, index)`` of keeping the costliest layer static."""
        members = self.members
        savings = [self.cost - (self.sizing.cost(members[:j] + members[j + 1:], self.saver) if len(members) > 1 else 0)
                   for j in range(len(members))]
        best = max(range(len(members)), key=lambda j: (savings[j], -j))
        return savings[best], best

    @property
    def split_saving(self) -> int:
        return self.split[0] if self.split is not None else 0


def _best_split(sizing: _Sizing, members: list[Candidate], saver: bool):
    """The two-way split of ``members`` whose parts cost the least: ``(left, right, costs)``.

    Candidates are every cut in execution order (fewer blocks per warehouse) and every
    split by channel pattern (one kernel size, output width or input width per group
    against the rest), which lifts the GCDs a few odd layers had collapsed.
    """
    best = None
    for left, right in _two_way_splits(members):
        costs = (sizing.cost(left, saver), sizing.cost(right, saver))
        if best is None or sum(costs) < sum(best[2]):
            best = (left, right, costs)
    return best


#: The guard tries at most this many cuts and channel patterns per split, so that a
#: warehouse of hundreds of layers still splits in milliseconds.
MAX_SPLITS_TRIED = 64


def _two_way_splits(members: list[Candidate]):
    count = len(members)
    cuts = range(1, count) if count <= MAX_SPLITS_TRIED else sorted(
        {round(i * count / MAX_SPLITS_TRIED) for i in range(1, MAX_SPLITS_TRIED)} - {0, count})
    for cut in cuts:
        yield members[:cut], members[cut:]
    for pattern in (lambda c: c.kernel_size, lambda c: c.out_channels, lambda c: c.weight_shape[1]):
        values = collections.Counter(pattern(c) for c in members)
        if len(values) > 1:
            for value, _ in values.most_common(MAX_SPLITS_TRIED // 4):
                yield ([c for c in members if pattern(c) == value],
                       [c for c in members if pattern(c) != value])


def _renumber(parts: list[tuple[str, list[Candidate]]]) -> list[Group]:
    """Groups ordered by first member; a split warehouse's parts are named NAME-1, NAME-2..."""
    counts: dict[str, int] = {}
    for name, _ in parts:
        counts[name] = counts.get(name, 0) + 1
    seen: dict[str, int] = {}
    groups = []
    for name, members in sorted(parts, key=lambda p: p[1][0].order):
        if counts[name] > 1:
            seen[name] = seen.get(name, 0) + 1
            name = f"{name}-{seen[name]}"
        groups.append(Group(name, list(members)))
    return groups
