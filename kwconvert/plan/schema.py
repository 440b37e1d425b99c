"""The ``Plan``: what planning hands to rewriting (trace -> plan -> rewrite -> io).

A plan names every converted layer and where its kernel comes from (a KernelWarehouse
warehouse's cells, or a per-layer method's own layer), every layer left static and why, and
the parameter counts that follow.  It can be printed (:mod:`.tables`), edited, saved as JSON
and applied later; reading one back checks it (:mod:`.checks`).
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from typing import Any

from .. import costs, methods
from ..methods.options import is_integer, is_number
from . import tables
from .checks import check_consistent
from ..formatting import count

#: Version of the plan's JSON schema; bump when a field changes meaning.
PLAN_FORMAT = 1


@dataclass(frozen=True)
class LayerPlan:
    """One converted layer: where its cells come from in its warehouse.

    ``weight_shape`` is ``(C_out, C_in/groups, *kernel)`` (Linear: ``(out, in)``);
    ``cells`` is m; ``offset`` is the number of warehouse cells handed out before this
    layer in the one-to-one walk (paper Sec. 3.3); ``hidden`` is the attention width.
    ``rows`` ``(start, stop)`` converts only those output rows of the layer (a fused qkv's
    value rows, :mod:`kwconvert.methods.kernelwarehouse.projections`); ``weight_shape`` is then the rows' shape.
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
        return tables.plan_table(self)


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
        return self._get(key, default, "an integer", is_integer)

    def number(self, key: str, default: Any = _REQUIRED) -> float | None:
        value = self._get(key, default, "a number", is_number)
        return float(value) if value is not None else None

    def text(self, key: str, default: Any = _REQUIRED) -> str:
        return self._get(key, default, "a string", lambda v: isinstance(v, str))

    def integers(self, key: str, default: Any = _REQUIRED) -> tuple[int, ...] | None:
        value = self._get(key, default, "a list of integers",
                          lambda v: isinstance(v, list) and all(map(is_integer, v)))
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


def _json_type(value: Any) -> str:
    names = {dict: "an object", list: "a list", str: "a string", bool: "a boolean", int: "an integer",
             float: "a number", type(None): "null"}
    return names.get(type(value), type(value).__name__)
