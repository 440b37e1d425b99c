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

from . import cells, compat, costs, methods
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
    ``positions`` is the output positions per sample at the traced input size (a conv's
    output map, a Linear's tokens; :mod:`kwconvert.costs`), None when not known.
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
    positions: int | None = None


@dataclass(frozen=True)
class WarehousePlan:
    """One warehouse: its cell shape, its n cells, and the layers that mix them.

    ``basis_ratio`` is the reference's ``nonlocal_basis_ratio`` when the parameter saver
    is on (b < 1), else None.  ``attention_norm`` is "batchnorm" or "layernorm".
    ``init_error`` is filled by the rewriter for b < 1 weight-preserving conversion: the
    relative error of the kernels rebuilt from the cells; ``output_error`` after a fit to
    calibration inputs (:mod:`kwconvert.calibrate`): the relative error of the layers' outputs.
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
    output_error: float | None = None

    @property
    def layer_names(self) -> tuple[str, ...]:
        return tuple(layer.name for layer in self.layers)

    @property
    def params(self) -> int:
        """Parameters this warehouse adds to the model: its cells and its layers' attention."""
        return self.warehouse_params + self.attention_params

    @property
    def cost(self) -> costs.Cost:
        """Multiply-adds per sample and bytes read per forward (:mod:`kwconvert.costs`)."""
        return costs.warehouse_cost(self)


@dataclass(frozen=True)
class DynamicLayerPlan:
    """One layer a per-layer method converts on its own (ODConv: no sharing between layers).

    ``kernels`` is n, the layer's own kernels; ``hidden`` its attention (KernelDNA: gate)
    width; ``params`` what the converted layer holds besides its bias (the kernel it
    replaces is gone); the other fields as in :class:`LayerPlan`.  A KernelDNA child names
    the static layer whose kernel it derives from in ``parent``; ``fit_error`` is filled by
    the rewriter: the relative error of the child's kernel fitted to the trained one.
    """
    name: str
    kind: str
    weight_shape: tuple[int, ...]
    in_channels: int
    groups: int
    kernels: int
    hidden: int
    params: int
    positions: int | None = None
    parent: str | None = None
    fit_error: float | None = None


@dataclass(frozen=True)
class StaticLayer:
    """A candidate layer left as it is, and why (stem, head, squeeze-excitation, ...).

    A KernelDNA parent stays an ordinary layer, but its kernel may be fitted with its
    children's (option ``fit_parent``): ``fit_error`` is then filled by the rewriter, the
    relative error of its kernel against the trained one (0 when kept exactly); None for
    every other layer, before conversion, and in plans written before it existed.
    """
    layer: str
    reason: str
    fit_error: float | None = None


@dataclass(frozen=True)
class Plan:
    """Everything the rewriter needs, and everything a user needs to judge the plan.

    ``baseline_macs`` is the original's Conv/Linear multiply-adds per sample at the traced
    input size (the planned sub-module's with ``module``), None when not known.

    ``method`` is the conversion method (:mod:`kwconvert.methods`): KernelWarehouse and
    DY-Conv plans list ``warehouses``; a per-layer method's (ODConv) lists ``layers``, and
    its ``budget`` is the kernels per layer (the authors' "4x").
    """
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
    baseline_macs: int | None = None
    method: str = "kernelwarehouse"
    layers: tuple[DynamicLayerPlan, ...] = ()

    # --- JSON -------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        """The documented JSON schema (README "Plan JSON"), plus per-layer details."""
        return {
            "format": PLAN_FORMAT,
            "method": self.method,
            "model": self.model,
            "budget": self.budget,
            "input_size": list(self.input_size) if self.input_size else None,
            "params": {"baseline": self.params_baseline, "converted": self.params_converted},
            "warehouses": [_warehouse_to_dict(w) for w in self.warehouses],
            "layers": [{**asdict(layer), "weight_shape": list(layer.weight_shape),
                        "cost": costs.per_layer_cost(layer).to_dict()} for layer in self.layers],
            "plain": [_static_to_dict(s) for s in self.plain],
            "options": self.options,
            "notes": list(self.notes),
            "module": self.module,
            "unpacked_attention": list(self.unpacked_attention),
            "cost": {"baseline_macs": self.baseline_macs, "macs_ratio": costs.macs_ratio(self),
                     **self.cost.to_dict()},
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
        options = dict(plan.obj("options", default={}).data)
        result = cls(
            model=plan.text("model"),
            budget=plan.number("budget"),
            warehouses=tuple(_warehouse_from_dict(w, index) for index, w in enumerate(plan.array("warehouses"))),
            plain=tuple(_static_from_dict(s, index) for index, s in enumerate(plan.array("plain"))),
            params_baseline=params.integer("baseline"),
            params_converted=params.integer("converted"),
            input_size=input_size or None,
            options=options,
            notes=plan.texts("notes", default=()),
            module=plan.text("module", default=None),
            unpacked_attention=plan.texts("unpacked_attention", default=()),
            baseline_macs=plan.obj("cost", default={}).integer("baseline_macs", default=None),
            method=plan.text("method", default=options.get("mode", "kernelwarehouse")),
            layers=tuple(_dynamic_layer_from_dict(layer, index) for index, layer
                         in enumerate(plan.array("layers") if "layers" in data else ())),
        )
        check_consistent(result)
        return result

    @classmethod
    def from_json(cls, text: str) -> "Plan":
        return cls.from_dict(json.loads(text))

    # --- views ------------------------------------------------------------------------
    @property
    def converted_layers(self) -> tuple[str, ...]:
        return tuple(name for w in self.warehouses for name in w.layer_names) + tuple(l.name for l in self.layers)

    def warehouse_of(self, layer_name: str) -> WarehousePlan | None:
        for warehouse in self.warehouses:
            if layer_name in warehouse.layer_names:
                return warehouse
        return None

    def __repr__(self) -> str:
        """One line: ``print(plan)`` of a dataclass this size would print pages
        (``plan.table()`` draws the tables, ``plan.to_json()`` gives everything)."""
        layers = sum(len(w.layers) for w in self.warehouses)
        if self.method in methods.DERIVED_METHODS:
            what = f"method={self.method!r}, {count(len(self.layers), 'child layer')}"
        elif self.layers:
            what = f"method={self.method!r}, kernels={self.budget:g}, {count(len(self.layers), 'layer')}"
        else:
            what = f"budget={self.budget:g}, {count(len(self.warehouses), 'warehouse')} of {count(layers, 'layer')}"
        return (f"Plan(model={self.model!r}, {what}, {len(self.plain)} static, parameters {self.params_baseline:,} -> "
                f"{self.params_converted:,} ({self.ratio:.2f}x))")

    @property
    def cost(self) -> costs.Cost:
        """What the converted layers cost, summed over the warehouses (:mod:`kwconvert.costs`)."""
        return costs.plan_cost(self)

    @property
    def setting(self) -> str:
        """How the plan converts, in a few words: "at budget 0.5", "with odconv, 4 kernels per layer"."""
        if self.method in methods.DERIVED_METHODS:
            return f"with {self.method} (children derived from parent kernels)"
        if self.method in methods.PER_LAYER_METHODS:
            return f"with {self.method}, {count(int(self.budget), 'kernel')} per layer"
        return f"at budget {self.budget:g}" + (" (dynamic_conv)" if self.method == "dynamic_conv" else "")

    @property
    def ratio(self) -> float:
        """Converted / baseline parameters."""
        return self.params_converted / self.params_baseline if self.params_baseline else float("nan")

    def table(self):
        """A rich renderable: one table per warehouse, a summary, the plain layers, totals."""
        from rich.console import Group
        from rich.table import Table
        from rich.text import Text

        # Names fold onto a second line where the width runs out, numbers never shrink, and
        # titles stand above their table (a table's title wraps at the table's width): at 80
        # columns "stage5.conv..." would not tell a stage's split parts apart.
        if self.method in methods.PER_LAYER_METHODS:
            return Group(*self._layers_table(), *self._plain_and_totals())
        parts = []
        for w in self.warehouses:
            parts.append(Text(f"{w.name}: cell {_dims(w.cell)}, m_t {w.m_t}, n {w.n}", style="italic"))
            table = Table()
            table.add_column("layer", overflow="fold")
            for column in ("kernel", "cell", "m"):
                table.add_column(column, justify="right", no_wrap=True)
            for layer in w.layers:
                rows = f" (rows {layer.rows[0]}:{layer.rows[1]})" if layer.rows else ""
                table.add_row(layer.name + rows, _dims(layer.weight_shape), _dims(w.cell), str(layer.cells))
            parts.append(table)
        where = f" (module {self.module})" if self.module else ""
        parts.append(Text(f"{self.model}{where} at b = {self.budget:g}: {len(self.warehouses)} warehouses "
                          "(l layers sharing n cells for m_t mixtures)", style="italic"))
        summary = Table(pad_edge=False)
        own_budgets = any(w.budget != self.budget for w in self.warehouses)
        columns = ("warehouse", "l", "cell", "n/m_t") + (("b'",) if own_budgets else ()) + (
            "cell\nparams", "attention\nparams")
        for column in columns:
            if column == "warehouse":
                summary.add_column(column, overflow="fold")
            else:
                summary.add_column(column, justify="right", no_wrap=True)
        for w in self.warehouses:
            budget = (f"{w.budget:g}",) if own_budgets else ()
            summary.add_row(w.name, str(len(w.layers)), _dims(w.cell), f"{w.n}/{w.m_t}", *budget,
                            f"{w.warehouse_params:,}", f"{w.attention_params:,}")
        parts.append(summary)
        parts.extend(self._cost_table())
        return Group(*parts, *self._plain_and_totals())

    def _layers_table(self) -> list:
        """A per-layer method's plan (ODConv): each layer's kernels, attention and cost."""
        from rich.table import Table
        from rich.text import Text

        size = f" at {_dims(self.input_size)}" if self.input_size else ""
        where = f" (module {self.module})" if self.module else ""
        derived = self.method in methods.DERIVED_METHODS  # KernelDNA: a parent and a fit, no kernels
        title = Text(f"{self.model}{where} {self.setting}: {count(len(self.layers), 'layer')} converted "
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
        for layer in self.layers:
            cost = costs.per_layer_cost(layer)
            middle = (layer.parent,) if derived else (str(layer.kernels),)
            last = ((f"{layer.fit_error:.3f}" if layer.fit_error is not None else "-"),) if derived else ()
            table.add_row(layer.name, _dims(layer.weight_shape), *middle, str(layer.hidden), f"{layer.params:,}",
                          _si(cost.conv_macs), _si(cost.added_macs), *last)
        return [title, table]

    def _plain_and_totals(self) -> list:
        """The static layers with their reasons, the parameter totals, the cost line and notes."""
        from rich.table import Table
        from rich.text import Text

        parts = []
        if self.plain:
            parts.append(Text("plain layers", style="italic"))
            plain = Table()
            plain.add_column("layer", overflow="fold")
            plain.add_column("reason")
            # KernelDNA: a parent's kernel may be fitted with its children's (option fit_parent)
            parents = {layer.parent for layer in self.layers if layer.parent is not None}
            if parents:
                plain.add_column("fit\nerror", justify="right", no_wrap=True)
            for static in self.plain:
                error = (f"{static.fit_error:.3f}" if static.fit_error is not None else "-") \
                    if static.layer in parents else ""
                plain.add_row(static.layer, static.reason, *((error,) if parents else ()))
            parts.append(plain)
        parts.append(Text(f"baseline params {self.params_baseline:,}   converted params "
                          f"{self.params_converted:,}   ratio {self.ratio:.3f}"))
        parts.append(Text(self._cost_line()))
        parts.extend(Text(f"note: {note}", style="dim") for note in self.notes)
        return parts

    def _cost_table(self) -> list:
        """Per warehouse: multiply-adds per sample and warehouse bytes read per forward."""
        from rich.table import Table
        from rich.text import Text

        size = f" at {_dims(self.input_size)}" if self.input_size else ""
        table = Table(pad_edge=False)
        table.add_column("warehouse", overflow="fold")
        for column in ("conv\nMACs", "assembly\nMACs", "attention\nMACs", "warehouse read\nper forward"):
            table.add_column(column, justify="right", no_wrap=True)
        for w in self.warehouses:
            cost = w.cost
            table.add_row(w.name, _si(cost.conv_macs), _si(cost.assembly_macs), _si(cost.attention_macs),
                          _si(cost.warehouse_bytes, "B"))
        return [Text(f"cost per sample{size} (multiply-adds; warehouse bytes in float32)", style="italic"), table]

    def _cost_line(self) -> str:
        """Multiply-adds per sample, before and after, and the warehouses read per forward."""
        cost = self.cost
        size = f" at {_dims(self.input_size)}" if self.input_size else ""
        ratio = costs.macs_ratio(self)
        before = (f"baseline MACs {_si(self.baseline_macs)}   converted {_si(self.baseline_macs + cost.added_macs)}"
                  f" ({ratio:.3f}x)   ") if ratio is not None else ""
        read = "kernels" if self.layers else "warehouses"
        return (f"per sample{size}: {before}assembly {_si(cost.assembly_macs)}, attention "
                f"{_si(cost.attention_macs)}   {read} read per forward {_si(cost.warehouse_bytes, 'B')} "
                "(float32)")


def _si(number: int | None, unit: str = "") -> str:
    """1234567 -> "1.23 M" (decimal prefixes, three significant digits); None -> "?"."""
    if number is None:
        return "?"
    for prefix, scale in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(number) >= scale:
            return f"{number / scale:.3g} {prefix}{unit}"
    return f"{number} {unit}".rstrip()


def count(number: int, noun: str) -> str:
    """``"1 layer"``, ``"3 layers"``."""
    return f"{number:,} {noun}{'' if number == 1 else 's'}"


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
        "output_error": w.output_error,
        "cost": w.cost.to_dict(),
        "layer_details": [
            {"kind": l.kind, "weight_shape": list(l.weight_shape), "in_channels": l.in_channels,
             "groups": l.groups, "offset": l.offset, "hidden": l.hidden,
             "rows": list(l.rows) if l.rows else None, "positions": l.positions}
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
        init_error=warehouse.number("init_error", default=None),
        output_error=warehouse.number("output_error", default=None))


def _layer_from_dict(data: Any, name: str, cells_of_layer: int, where: str) -> LayerPlan:
    detail = _Fields(data, f"{where}, layer {name}")
    rows = detail.integers("rows", default=None)
    if rows is not None and len(rows) != 2:
        raise ValueError(f"plan JSON: {detail.where}: 'rows' must be [start, stop], got {list(rows)}")
    return LayerPlan(name=name, kind=detail.text("kind"), weight_shape=detail.integers("weight_shape"),
                     in_channels=detail.integer("in_channels"), groups=detail.integer("groups"),
                     cells=cells_of_layer, offset=detail.integer("offset"), hidden=detail.integer("hidden"),
                     rows=rows or None, positions=detail.integer("positions", default=None))


def _dynamic_layer_from_dict(data: Any, index: int) -> DynamicLayerPlan:
    name = data.get("name") if isinstance(data, dict) else None
    layer = _Fields(data, f"layer {name}" if isinstance(name, str) else f"layers[{index}]")
    return DynamicLayerPlan(name=layer.text("name"), kind=layer.text("kind"), weight_shape=layer.integers("weight_shape"),
                            in_channels=layer.integer("in_channels"), groups=layer.integer("groups"),
                            kernels=layer.integer("kernels"), hidden=layer.integer("hidden"),
                            params=layer.integer("params"), positions=layer.integer("positions", default=None),
                            parent=layer.text("parent", default=None),
                            fit_error=layer.number("fit_error", default=None))


def _static_to_dict(static: StaticLayer) -> dict[str, Any]:
    """``{"layer", "reason"}``, and ``fit_error`` only where there is one (a converted
    KernelDNA parent): every other plain layer keeps the two fields it always had."""
    data = asdict(static)
    if static.fit_error is None:
        del data["fit_error"]
    return data


def _static_from_dict(data: Any, index: int) -> StaticLayer:
    static = _Fields(data, f"plain[{index}]")
    return StaticLayer(layer=static.text("layer"), reason=static.text("reason"),
                       fit_error=static.number("fit_error", default=None))


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
    try:
        methods.check_method(plan.method)
    except ValueError as err:
        raise ValueError(f"plan: {err}") from None
    plain = {static.layer for static in plan.plain}
    _check_parent_errors(plan)
    if plan.method in methods.PER_LAYER_METHODS:
        _check_dynamic_layers(plan, plain)
        return
    if plan.layers:
        raise ValueError(f"plan: a {plan.method} plan holds warehouses, not 'layers' ({plan.layers[0].name})")
    mode = plan.options.get("mode", "kernelwarehouse") if isinstance(plan.options, dict) else None
    if mode not in _MODE_CHOICES:
        raise ValueError(f"plan: options.mode must be one of {', '.join(_MODE_CHOICES)}, got {mode!r}")
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


def _check_parent_errors(plan: Plan) -> None:
    """Only a KernelDNA parent has a kernel fit error among the plain layers, and it is a
    relative error (>= 0); ``options.fit_parent``, where present, is a boolean."""
    parents = {layer.parent for layer in plan.layers if layer.parent is not None}
    for static in plan.plain:
        if static.fit_error is None:
            continue
        if static.layer not in parents:
            raise ValueError(f"plan plain layer {static.layer}: only a KernelDNA parent has a fit_error")
        if not static.fit_error >= 0:  # NaN fails too
            raise ValueError(f"plan plain layer {static.layer}: fit_error must be >= 0, got {static.fit_error}")
    fit_parent = plan.options.get("fit_parent", False) if isinstance(plan.options, dict) else False
    if not isinstance(fit_parent, bool):
        raise ValueError(f"plan: options.fit_parent must be true or false, got {fit_parent!r}")


def _check_dynamic_layers(plan: Plan, plain: set[str]) -> None:
    """A per-layer method's plan: no warehouses; each layer a convolution whose kernels are
    the plan's (``budget``) and whose parameters follow from its sizes."""
    if plan.warehouses:
        raise ValueError(f"plan: a {plan.method} plan lists layers, not warehouses ({plan.warehouses[0].name})")
    seen: set[str] = set()
    for layer in plan.layers:
        where = f"plan layer {layer.name}"
        if layer.name in seen or layer.name in plain:
            raise ValueError(f"{where}: the layer is planned twice (or also listed as plain)")
        seen.add(layer.name)
        rank = _KERNEL_RANK.get(layer.kind)
        if rank is None or layer.kind == "linear":
            raise ValueError(f"{where}: kind is {layer.kind!r}; {plan.method} converts conv1d, conv2d and conv3d")
        if len(layer.weight_shape) != rank or min(layer.weight_shape) < 1:
            raise ValueError(f"{where}: weight_shape {list(layer.weight_shape)} is not a {layer.kind} kernel "
                             f"({rank} positive sizes)")
        for name in ("in_channels", "groups", "kernels", "hidden") + (
                ("positions",) if layer.positions is not None else ()):
            if getattr(layer, name) < 1:
                raise ValueError(f"{where}: {name} must be positive, got {getattr(layer, name)}")
        if layer.in_channels != layer.weight_shape[1] * layer.groups:
            raise ValueError(f"{where}: in_channels {layer.in_channels} is not groups {layer.groups} x "
                             f"{layer.weight_shape[1]} (the kernel's input channels)")
        if layer.kernels != plan.budget:
            raise ValueError(f"{where}: kernels is {layer.kernels}, the plan's is {plan.budget:g}")
        derived = plan.method in methods.DERIVED_METHODS
        if derived != (layer.parent is not None):
            raise ValueError(f"{where}: " + (f"a {plan.method} child needs a parent" if derived else
                                             f"a {plan.method} layer has no parent"))
        if derived and layer.parent not in plain:
            raise ValueError(f"{where}: its parent {layer.parent} must stay a static layer of the plan")
        expected = methods.layer_params(plan.method, layer)
        if layer.params != expected:
            raise ValueError(f"{where}: params is {layer.params}, its sizes give {expected}")


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
    for name in ("in_channels", "groups", "hidden") + (("positions",) if layer.positions is not None else ()):
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
    head: str = field(default="auto", metadata={"help": (
        "heads (layers on a rank-2 input: the classifier): 'auto' keeps them static unless the "
        "allocator needs them below 1; 'warehouse' gives each a warehouse of its own with cells "
        "of all its outputs and 1/40 of its inputs (the reference's MobileNetV2 1/2x classifier); "
        "'plain' keeps them static")})
    allocate: bool = field(default=True, metadata={"help": (
        "below 1, spend the budget where the parameters are: while the model holds more than "
        "b + 1/4 of its parameters, apply the change that saves the most (a warehouse at "
        "b' = 1, a head in a warehouse, a narrower attention, the saver, a split, coarser "
        "cells; README 'Budgets below 1'); false gives every warehouse the paper's layout at b")})
    warehouses: dict = field(default_factory=dict, metadata={"help": (
        "pin warehouses' layouts: {glob on the warehouse name (as in the plan, before a "
        "split's -1, -2): {budget, cell: [out, in] fractions of the GCDs, reduction, "
        "param_saver, static}}; the allocator never changes a pinned field")})
    max_params_ratio: float | str = field(default="auto", metadata={"help": (
        "budget guard: the converted model may hold at most this many times the baseline "
        "parameters; 'auto' = b + 0.5 for b >= 1, else 1.0 (a budget below 1 never grows a model)")})

    def __post_init__(self) -> None:
        choice("stem", self.stem, _STEM_CHOICES)
        choice("attention_norm", self.attention_norm, _NORM_CHOICES)
        choice("mode", self.mode, _MODE_CHOICES)
        choice("squeeze_excitation", self.squeeze_excitation, ("plain", "warehouse"))
        choice("expansion_split", self.expansion_split, ("auto", True, False))
        choice("param_saver", self.param_saver, ("auto", True, False))
        for name in ("include", "exclude"):
            object.__setattr__(self, name, check_globs(name, getattr(self, name)))
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
        choice("head", self.head, ("auto", "plain", "warehouse"))
        if not isinstance(self.allocate, bool):
            raise ValueError(f"option allocate must be true or false, got {self.allocate!r}")
        object.__setattr__(self, "warehouses", _checked_pins(self.warehouses))
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

    def pins(self, warehouse: str) -> dict[str, Any]:
        """The ``warehouses`` option's settings for one warehouse (later patterns win)."""
        found: dict[str, Any] = {}
        for pattern, settings in self.warehouses.items():
            if fnmatch.fnmatchcase(warehouse, pattern):
                found.update(settings)
        return found

    def params_ratio(self, budget: float) -> float:
        """The budget guard's bound on converted / baseline parameters."""
        if self.max_params_ratio != "auto":
            return float(self.max_params_ratio)
        return budget + 0.5 if budget >= 1 else 1.0


def choice(name: str, value: Any, choices: tuple) -> None:
    """Refuse an option whose value is not one of ``choices``, listing them."""
    if value not in choices:
        raise ValueError(f"option {name} must be one of {', '.join(map(repr, choices))}, got {value!r}")


def check_globs(name: str, value) -> tuple[str, ...]:
    """An include / exclude option as a tuple of glob strings."""
    patterns = (value,) if isinstance(value, str) else tuple(value or ())
    if not all(isinstance(p, str) for p in patterns):
        raise ValueError(f"option {name} must be glob patterns (strings), got {value!r}")
    return patterns


_PIN_KEYS = ("budget", "cell", "reduction", "param_saver", "static")


def _checked_pins(pins: Any) -> dict[str, dict[str, Any]]:
    """The ``warehouses`` option, validated; budgets may be written "1/2"."""
    where = "option warehouses"
    if not isinstance(pins, dict):
        raise ValueError(f"{where} must map warehouse-name patterns to settings, got {pins!r}")
    checked = {}
    for pattern, settings in pins.items():
        if not isinstance(pattern, str) or not isinstance(settings, dict):
            raise ValueError(f"{where}: {pattern!r} must map a name pattern to a dict of settings, got {settings!r}")
        unknown = sorted(set(settings) - set(_PIN_KEYS))
        if unknown:
            raise ValueError(f"{where}[{pattern!r}]: unknown setting(s) {', '.join(unknown)}; "
                             f"valid: {', '.join(_PIN_KEYS)}")
        settings = dict(settings)
        if "budget" in settings:
            value = settings["budget"]
            settings["budget"] = parse_budget(value) if isinstance(value, str) else check_budget(value)
        for key in ("param_saver", "static"):
            if key in settings and not isinstance(settings[key], bool):
                raise ValueError(f"{where}[{pattern!r}]: {key} must be true or false, got {settings[key]!r}")
        if "reduction" in settings and not (_is_number(settings["reduction"]) and 0 < settings["reduction"] <= 1):
            raise ValueError(f"{where}[{pattern!r}]: reduction must be a number in (0, 1], got {settings['reduction']!r}")
        if "cell" in settings:
            cell = settings["cell"]
            if not (isinstance(cell, (list, tuple)) and len(cell) == 2
                    and all(_is_number(v) and 0 < v <= 1 for v in cell)):
                raise ValueError(f"{where}[{pattern!r}]: cell must be [out, in] fractions in (0, 1], got {cell!r}")
            settings["cell"] = [float(v) for v in cell]
        checked[pattern] = settings
    return checked


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
def plan(model: nn.Module | None, budget: float | str | None = None, example_inputs=None, *,
         model_name: str | None = None, graph: LayerGraph | None = None, module: str | None = None,
         method: str = "kernelwarehouse", **options: Any) -> Plan:
    """Plan the KernelWarehouse conversion of ``model`` at budget ``budget``.

    ``method`` picks another conversion (:mod:`kwconvert.methods`): ``"dynamic_conv"`` is
    ``mode="dynamic_conv"``; ``"odconv"`` plans ODConv layers, ``kernels=n`` of them per
    layer (``budget``, if given, is that n: the authors' "4x"), with the options of
    :class:`kwconvert.methods.odconv.planning.ODConvOptions`; ``"kerneldna"`` plans KernelDNA
    families (no budget), with those of ``KernelDNAOptions``.

    Traces the model (or uses ``graph``), groups its Conv/Linear layers into warehouses by
    the paper's reassigned stages (see :func:`group_layers`), sizes cells, warehouses and
    attention with :mod:`kwconvert.cells`, and applies the budget guard.  ``options`` are
    :class:`PlanOptions` fields.

    ``module="backbone.body"`` plans only that sub-module (see :func:`_plan_module`); the
    plan still names the whole model's layers, so ``convert(model, plan)`` applies it.
    """
    budget = _method_budget(methods.check_method(method), budget, options)
    if module:
        return _plan_module(model, budget, example_inputs, module, model_name, graph, dict(options, method=method))
    per_layer = _per_layer_planning(method)
    opts = (per_layer.Options if per_layer else PlanOptions).from_kwargs(**options)  # refused before tracing
    if graph is None:
        if model is None:
            raise ValueError("plan() needs a model or a traced graph")
        graph = trace(model, example_inputs)
    name = model_name or (type(model).__name__ if model is not None else "model")
    if per_layer:
        return per_layer.plan(graph, model, opts, name, _baseline_macs(graph))
    return _plan_warehouses(graph, budget, opts, name)


def check_options(method: str, budget: float | str | None = None, **options: Any) -> Any:
    """The options object a ``method`` plan at ``budget`` is made with (``PlanOptions``,
    ``ODConvOptions``, ``KernelDNAOptions``), or the ValueError :func:`plan` would raise for
    them before tracing anything: a front end's early check."""
    _method_budget(methods.check_method(method), budget, options)
    per_layer = _per_layer_planning(method)
    return (per_layer.Options if per_layer else PlanOptions).from_kwargs(**options)


def _method_budget(method: str, budget: float | str | None, options: dict[str, Any]) -> float:
    """The plan's budget for ``method`` (ODConv's: its kernels per layer; KernelDNA's: 1), with
    ``options`` completed where the method reads the budget (``mode``, ``kernels``)."""
    if method == "dynamic_conv" and options.setdefault("mode", "dynamic_conv") != "dynamic_conv":
        raise ValueError(f"method 'dynamic_conv' is mode 'dynamic_conv', not {options['mode']!r}")
    if method == "odconv":
        options["kernels"] = _kernels(budget, options.get("kernels"))
        budget = float(options["kernels"])
    elif method == "kerneldna":
        if budget is not None and (isinstance(budget, bool) or budget not in (1, "1")):
            raise ValueError(f"KernelDNA takes no budget (got {budget}): its children share their parents' "
                             "kernels (options share=, children_per_parent=)")
        budget = 1.0
    elif budget is None:
        raise ValueError(f"a {method} plan needs a budget: plan(model, 1), plan(model, '1/2')")
    return parse_budget(budget) if isinstance(budget, str) else check_budget(budget)


def _per_layer_planning(method: str):
    """The planning module of a per-layer method (its ``Options`` and ``plan``), else None.
    Imported when used: the method folders import this module."""
    if method == "odconv":
        from .methods.odconv import planning
    elif method == "kerneldna":
        from .methods.kerneldna import planning
    else:
        return None
    return planning


def _plan_warehouses(graph: LayerGraph, budget: float, opts: PlanOptions, name: str) -> Plan:
    """KernelWarehouse's (and DY-Conv's) plan of a traced model: warehouses, sizes, the guard."""
    grouping = group_layers(graph, budget, opts)
    sizing = _Sizing(opts, _attention_norm(graph, opts))
    notes = list(graph.notes) + grouping.notes
    groups = _layouts(grouping, budget, sizing, notes)
    plain = grouping.plain
    if budget < 1 and opts.allocate:
        groups = _allocate(graph, groups, grouping.heads, plain, sizing, budget, notes)
    groups = _honour_budget(graph, groups, plain, sizing, opts.params_ratio(budget) * graph.params_baseline, notes)
    warehouses = tuple(sizing.warehouse(g.name, g.members, g.layout) for g in _renumber(groups))
    dropped = sum(math.prod(l.weight_shape) + graph.candidate(l.name).extra_params
                  for w in warehouses for l in w.layers)
    params = graph.params_baseline - dropped + sum(w.params for w in warehouses)
    order = {c.name: c.order for c in graph.candidates}
    static = tuple(StaticLayer(layer, reason) for layer, reason in
                   sorted(plain.items(), key=lambda kv: (order.get(kv[0], len(order)), kv[0])))
    converted = {layer.name for w in warehouses for layer in w.layers}
    unpacked = tuple(path for path in graph.unpacked_attention
                     if any(name.startswith(f"{path}.") for name in converted))
    result = Plan(model=name, budget=budget, warehouses=warehouses, plain=static, method=opts.mode,
                  params_baseline=graph.params_baseline, params_converted=params,
                  input_size=graph.input_shapes[0][1:] if len(graph.input_shapes) == 1 else None,
                  options=opts.to_dict(), notes=tuple(dict.fromkeys(notes)), unpacked_attention=unpacked,
                  baseline_macs=_baseline_macs(graph))
    check_consistent(result)  # what convert() and Plan.from_dict will check: refuse it now, not then
    return result


def _kernels(budget: float | str | None, kernels: Any) -> int:
    """ODConv's kernels per layer, from ``kernels=`` or the budget (its "Nx"), which must agree."""
    if kernels is not None and (isinstance(kernels, bool) or not isinstance(kernels, int) or kernels < 1):
        raise ValueError(f"ODConv option kernels must be a positive integer, got {kernels!r}")
    if isinstance(budget, bool):
        raise ValueError(f"ODConv's budget is its kernels per layer, a whole number >= 1: got {budget}")
    if budget is not None:
        value = parse_budget(budget) if isinstance(budget, str) else budget
        if not float(value).is_integer() or value < 1:
            raise ValueError(f"ODConv's budget is its kernels per layer, a whole number >= 1: got {budget}")
        if kernels is not None and kernels != int(value):
            raise ValueError(f"ODConv: budget {budget} and kernels={kernels} disagree; give one")
        return int(value)
    return 1 if kernels is None else kernels


def _baseline_macs(graph: LayerGraph) -> int | None:
    """The traced model's Conv/Linear multiply-adds per sample (None if one output went unseen)."""
    macs = [cand.macs for cand in graph.candidates]
    return None if None in macs else sum(macs)


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
    layers = tuple(dataclasses.replace(l, name=prefix + l.name) for l in inner.layers)
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
        inner, warehouses=warehouses, layers=layers, plain=tuple(plain), params_baseline=baseline,
        params_converted=baseline - inner.params_baseline + inner.params_converted,
        input_size=input_size, notes=notes, module=path,
        unpacked_attention=tuple(prefix + p for p in inner.unpacked_attention))


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


#: Conv/Linear subclasses whose own forward computes exactly torch's (timm's Linear only
#: casts the weight to the input's dtype for TorchScript): they convert like their base.
#: Those of :data:`kwconvert.compat.EXTRAS` (timm's 'SAME' padding and weight
#: standardisation) convert too; any other subclass with its own forward stays static.
EQUIVALENT_FORWARDS = frozenset({"timm.layers.linear.Linear"})


def on_pooled_map(cand: Candidate) -> bool:
    return bool(cand.input_spatial) and math.prod(cand.input_spatial) == 1


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


def _attention_norm(graph: LayerGraph, options: PlanOptions) -> str:
    if options.attention_norm != "auto":
        return options.attention_norm
    if "layernorm" in graph.norm_types and "batchnorm" not in graph.norm_types:
        return "layernorm"
    return "batchnorm"


@dataclass(frozen=True)
class Layout:
    """How one warehouse is sized: its own budget b', cell, attention width and saver.

    The paper gives every warehouse the model's b, cells of the GCDs (halved below 1),
    attention reduction 1/16 and, at b < 1, the parameter saver where attention dominates.
    Below 1 the allocator (:func:`_allocate`) may give a warehouse another layout, and the
    ``warehouses`` option pins any field.  ``cell_ratio`` ``(out, in)`` are fractions of the
    GCDs (:func:`kwconvert.cells.cell_shape`); None is the paper's rule.
    """
    budget: float
    cell_ratio: tuple[float, float] | None = None
    reduction: float = 1 / 16
    saver: bool = False


#: A converted head's cell spans every output and 1/40 of the inputs, as the reference's
#: MobileNetV2 1/2x classifier (cells 1000 x 32 of its 1000 x 1280 kernel: 40 mixtures).
#: A head warehouse has one layer, so the GCDs are the kernel itself and the paper's rule
#: would cut it into 4 cells: too few mixtures to be dynamic.
HEAD_CELL_RATIO = (1.0, 1 / 40)


@dataclass(frozen=True)
class _Sizing:
    """Cells, n and attention of a warehouse under a layout, from kwconvert.cells (paper Sec. 3)."""
    options: PlanOptions
    norm: str

    def warehouse(self, name: str, members: Sequence[Candidate], layout: Layout) -> WarehousePlan:
        cell, counts, n, basis_ratio = self._layout(members, layout)
        layers, offset = [], 0
        for cand, m in zip(members, counts):
            layers.append(LayerPlan(name=cand.name, kind=cand.kind, weight_shape=tuple(cand.weight_shape),
                                    in_channels=cand.in_channels, groups=cand.groups, cells=m,
                                    offset=offset, hidden=self._hidden(cand, layout), rows=cand.rows,
                                    positions=cand.positions))
            offset += cells.cells_handed_out(m, layout.budget)
        return WarehousePlan(name=name, layers=tuple(layers), cell=cell, m_t=sum(counts), n=n,
                             budget=layout.budget, attention_norm=self.norm, basis_ratio=basis_ratio,
                             warehouse_params=n * math.prod(cell),
                             attention_params=self._attention(members, counts, n, layout, basis_ratio))

    def cost(self, members: Sequence[Candidate], layout: Layout) -> int:
        """Parameters a group adds over the static layers it replaces (may be negative).

        The arithmetic of :meth:`warehouse` without building the plan: the allocator and
        the budget guard evaluate it for every choice they consider.
        """
        cell, counts, n, basis_ratio = self._layout(members, layout)
        return (n * math.prod(cell) + self._attention(members, counts, n, layout, basis_ratio)
                - sum(c.weight_numel for c in members))

    def _layout(self, members: Sequence[Candidate], layout: Layout):
        """``(cell, m per layer, n, basis_ratio)``; dynamic_conv cells are whole kernels."""
        shapes = [c.weight_shape for c in members]
        if self.options.mode == "dynamic_conv":
            cell = tuple(shapes[0])
        else:
            cell = cells.cell_shape(shapes, layout.budget, layout.cell_ratio)
        counts = [cells.cells_in(shape, cell) for shape in shapes]
        basis_ratio = self.options.basis_ratio if layout.saver and layout.budget < 1 else None
        return cell, counts, cells.warehouse_size(sum(counts), layout.budget), basis_ratio

    def _hidden(self, cand: Candidate, layout: Layout) -> int:
        return cells.hidden_size(cand.in_channels, layout.reduction, self.options.min_hidden)

    def _attention(self, members: Sequence[Candidate], counts: Sequence[int], n: int, layout: Layout,
                   basis_ratio: float | None) -> int:
        return sum(cells.attention_params(cand.in_channels, self._hidden(cand, layout), m, n, norm=self.norm,
                                          budget=layout.budget, basis_ratio=basis_ratio)
                   for cand, m in zip(members, counts))


def _use_saver(sizing: _Sizing, groups: list[Group], budget: float) -> bool:
    """Spec rule: the saver is on when b < 1 and attention > half the warehouse parameters."""
    options = sizing.options
    if budget >= 1 or options.param_saver is False or options.mode == "dynamic_conv":
        return False
    if options.param_saver is True:
        return True
    planned = [sizing.warehouse(g.name, g.members, g.layout) for g in groups]
    return sum(w.attention_params for w in planned) > 0.5 * sum(w.warehouse_params for w in planned)


def _layouts(grouping: Grouping, budget: float, sizing: _Sizing, notes: list[str]) -> list[Group]:
    """Every group's layout: the paper's, then the ``warehouses`` option's pins.

    Heads (``head='warehouse'``) join as warehouses of their own with narrow cells
    (:data:`HEAD_CELL_RATIO`); a warehouse pinned ``static`` leaves its layers plain.
    """
    options = sizing.options
    paper = Layout(budget=budget, reduction=options.reduction)
    groups = [dataclasses.replace(g, layout=paper) for g in grouping.groups]
    if options.head == "warehouse":
        groups += [Group(f"head.{cand.kind}", [cand], _head_layout(budget, options)) for cand in grouping.heads]
        for cand in grouping.heads:
            del grouping.plain[cand.name]
    if _use_saver(sizing, groups, budget):
        groups = [dataclasses.replace(g, layout=dataclasses.replace(g.layout, saver=True)) for g in groups]
        notes.append(f"parameter saver on (basis ratio {options.basis_ratio:g}): at b < 1 the "
                     "attention would otherwise hold more than half as many parameters as the warehouses")
    pinned = []
    for group in groups:
        pins = options.pins(group.name)
        if pins.get("static"):
            grouping.plain.update((c.name, "kept static by option warehouses") for c in group.members)
        else:
            group.layout = _pinned(group.layout, pins)
            pinned.append(group)
    return pinned


def _head_layout(budget: float, options: PlanOptions) -> Layout:
    return Layout(budget=budget, cell_ratio=HEAD_CELL_RATIO, reduction=options.reduction)


def _pinned(layout: Layout, pins: dict[str, Any]) -> Layout:
    changes = {"budget": pins.get("budget"), "reduction": pins.get("reduction"), "saver": pins.get("param_saver"),
               "cell_ratio": tuple(pins["cell"]) if "cell" in pins else None}
    return dataclasses.replace(layout, **{k: v for k, v in changes.items() if v is not None})


# =======================================================================================
# Allocation below 1 and the budget guard
# =======================================================================================
def allocation_target(budget: float) -> float:
    """Converted / baseline parameters the allocator works down to below 1.

    ``b + 1/4`` up to b = 1/2, then halfway from b to 1 (0.875 at 3/4).  The budget scales
    the warehouses' cells; a converted model also holds attention and the layers it keeps
    static, so b itself is out of reach.  The target is what the paper's own b < 1 models
    reach (ResNet18 1/4x 0.35, 1/2x 0.64, ResNet50 1/2x 0.69, the authors' MobileNetV2
    1/2x 0.76, ConvNeXt-T 3/4x 0.86): the allocator leaves those layouts as they are.
    """
    return min(budget + 0.25, (1 + budget) / 2)


def _allocate(graph: LayerGraph, groups: list[Group], heads: list[Candidate], plain: dict[str, str],
              sizing: _Sizing, budget: float, notes: list[str]) -> list[Group]:
    """Spend a budget below 1 where the parameters are.

    The paper's layout at b everywhere leaves mobile models near 1x: attention grows with
    m_t squared and their classifiers (a third of MobileNetV2) stay static.  While the model
    holds more than :func:`allocation_target` of its baseline parameters, apply the change
    that saves the most (:meth:`_Part.moves`): a warehouse at b' = 1, its GCD cells
    one-to-one, where its attention at b costs more than the smaller cells save (the
    reference's MobileNetV2 1/2x keeps its small early warehouses at ratio 1); a head in a
    warehouse of its own; half a warehouse's attention width, down to a quarter of
    ``reduction`` (the reference's MobileNetV2 1/2x uses 1/32); its parameter saver; a
    split in two (:func:`_best_split`); cells of its whole GCDs (a quarter of the
    mixtures, a sixteenth of the attention).  Each change is noted per warehouse.

    No layer is kept static here, no b' leaves [b, 1], and the ``warehouses`` option's pins
    are never changed.  The paper's b < 1 ResNets are under the target already and keep
    their layouts.
    """
    options = sizing.options
    parts = [_Part(g.name, g.members, g.layout, sizing, frozenset(options.pins(g.name))) for g in groups]
    changes: dict[str, list[str]] = collections.defaultdict(list)
    waiting = []  # heads the allocator may convert, as their pins would have them
    for cand in heads if options.head == "auto" else []:
        pins = options.pins(f"head.{cand.kind}")
        if cand.name in plain and not pins.get("static"):
            waiting.append(_Part(f"head.{cand.kind}", [cand], _pinned(_head_layout(budget, options), pins), sizing,
                                 frozenset(pins), converted=False))
    limit = allocation_target(budget) * graph.params_baseline
    while graph.params_baseline + sum(p.cost for p in parts) > limit:
        moves = [(move, part) for part in parts + waiting for move in part.moves]
        if not moves:
            break
        (saving, label, replacement), part = max(moves, key=lambda mp: mp[0][0])
        if saving <= 0:
            break
        if part in waiting:
            waiting.remove(part)
            del plain[part.members[0].name]
            parts.extend(replacement)
        else:
            index = parts.index(part)
            parts[index:index + 1] = replacement
        changes[part.name].append(f"{label} (saves {saving:,})")
    for name, done in changes.items():
        notes.append(f"allocator: {name}: " + "; ".join(done))
    return [Group(p.name, p.members, p.layout) for p in parts]


def _honour_budget(graph: LayerGraph, groups: list[Group], plain: dict[str, str], sizing: _Sizing,
                   limit: float, notes: list[str]) -> list[Group]:
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
    allowed = limit - graph.params_baseline  # total cost the warehouses may add
    parts = [_Part(g.name, list(g.members), g.layout, sizing) for g in groups]
    splits: dict[str, int] = {}
    kept_static = []
    while sum(p.cost for p in parts) > allowed:
        index, part = max(enumerate(parts), key=lambda ip: (ip[1].split_saving, -ip[0]))
        if part.split_saving > 0:
            _, first, second = part.split
            parts[index:index + 1] = [part.with_members(first), part.with_members(second)]
            splits[part.name] = splits.get(part.name, 1) + 1
        else:
            index, part = max(enumerate(parts), key=lambda ip: (ip[1].drop[0], -ip[0]))
            if part.drop[0] <= 0:
                break
            _, drop = part.drop
            kept_static.append(part.members[drop].name)
            plain[part.members[drop].name] = "kept static to honour the budget"
            rest = part.members[:drop] + part.members[drop + 1:]
            parts[index:index + 1] = [part.with_members(rest)] if rest else []
    total = graph.params_baseline + sum(p.cost for p in parts)
    if splits:
        notes.append("budget guard: split " + ", ".join(f"{name} into {k}" for name, k in splits.items())
                     + " to bound the attention size")
    if kept_static:
        notes.append(f"budget guard: kept {len(kept_static)} layer(s) static to honour the budget")
    if total > limit:
        notes.append(f"budget guard: the plan holds {total / graph.params_baseline:.2f}x the baseline "
                     f"parameters, over the limit of {limit / graph.params_baseline:.2f}x; no remedy was left")
    return [Group(p.name, p.members, p.layout) for p in parts]


class _Part:
    """A warehouse under the allocator or the guard: its cost and the changes it allows.

    A head the allocator has not converted yet is a part with ``converted=False``: it costs
    nothing, and its one move converts it.
    """

    def __init__(self, name: str, members: list[Candidate], layout: Layout, sizing: _Sizing,
                 pinned: frozenset[str] = frozenset(), converted: bool = True):
        self.name, self.members, self.layout, self.sizing = name, list(members), layout, sizing
        self.pinned, self.converted = pinned, converted
        self.cost = sizing.cost(members, layout) if converted else 0

    def replaced(self, layout: Layout) -> "_Part":
        return _Part(self.name, self.members, layout, self.sizing, self.pinned)

    def with_members(self, members: list[Candidate]) -> "_Part":
        return _Part(self.name, members, self.layout, self.sizing, self.pinned)

    @functools.cached_property
    def moves(self) -> list[tuple[int, str, list["_Part"]]]:
        """The allocator's changes to this part: ``(saving, label, replacement parts)``.

        Cached: a part never changes (the allocator replaces it), so each loop of the
        allocator only sizes the moves of the parts the last change made."""
        if not self.converted:
            head = self.replaced(self.layout)
            return [(-head.cost, f"{self.members[0].name} converted, cells {_dims(head.cell)}", [head])]
        layout, options, found = self.layout, self.sizing.options, []
        if "budget" not in self.pinned and layout.budget < 1:
            found.append(self._relayout("b' = 1", budget=1.0, saver=False))
        if "reduction" not in self.pinned and layout.reduction > options.reduction / 4 * (1 + 1e-9):
            found.append(self._relayout(f"attention reduction 1/{round(2 / layout.reduction)}",
                                        reduction=layout.reduction / 2))
        if "param_saver" not in self.pinned and layout.budget < 1 and not layout.saver \
                and options.param_saver is not False:
            found.append(self._relayout("parameter saver on", saver=True))
        if "cell" not in self.pinned and layout.budget < 1 and layout.cell_ratio is None \
                and options.mode != "dynamic_conv":
            found.append(self._relayout("cells of the whole GCDs", cell_ratio=(1.0, 1.0)))
        if self.split is not None:
            saving, first, second = self.split
            found.append((saving, f"split before {second[0].name}" if first[-1].order < second[0].order
                          else f"split off {second[0].name} and {len(second) - 1} more",
                          [self.with_members(first), self.with_members(second)]))
        return found

    def _relayout(self, label: str, **change: Any) -> tuple[int, str, list["_Part"]]:
        other = self.replaced(dataclasses.replace(self.layout, **change))
        return self.cost - other.cost, label, [other]

    @property
    def cell(self) -> tuple[int, ...]:
        return self.sizing._layout(self.members, self.layout)[0]

    @functools.cached_property
    def split(self) -> tuple[int, list[Candidate], list[Candidate]] | None:
        """``(saving, first, second)`` of the best two-way split, None for one layer."""
        if len(self.members) < 2:
            return None
        first, second, costs = _best_split(self.sizing, self.members, self.layout)
        return self.cost - sum(costs), first, second

    @functools.cached_property
    def drop(self) -> tuple[int, int]:
        """``(saving, index)`` of keeping the costliest layer static."""
        members = self.members
        savings = [self.cost - (self.sizing.cost(members[:j] + members[j + 1:], self.layout)
                                if len(members) > 1 else 0) for j in range(len(members))]
        best = max(range(len(members)), key=lambda j: (savings[j], -j))
        return savings[best], best

    @property
    def split_saving(self) -> int:
        return self.split[0] if self.split is not None else 0


def _best_split(sizing: _Sizing, members: list[Candidate], layout: Layout):
    """The two-way split of ``members`` whose parts cost the least: ``(left, right, costs)``.

    Candidates are every cut in execution order (fewer blocks per warehouse) and every
    split by channel pattern (one kernel size, output width or input width per group
    against the rest), which lifts the GCDs a few odd layers had collapsed.
    """
    best = None
    for left, right in _two_way_splits(members):
        costs = (sizing.cost(left, layout), sizing.cost(right, layout))
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


def _renumber(groups: list[Group]) -> list[Group]:
    """Groups ordered by first member; a split warehouse's parts are named NAME-1, NAME-2..."""
    counts = collections.Counter(group.name for group in groups)
    seen: dict[str, int] = collections.defaultdict(int)
    numbered = []
    for group in sorted(groups, key=lambda g: g.members[0].order):
        name = group.name
        if counts[name] > 1:
            seen[name] += 1
            name = f"{name}-{seen[name]}"
        numbered.append(Group(name, list(group.members), group.layout))
    return numbered
