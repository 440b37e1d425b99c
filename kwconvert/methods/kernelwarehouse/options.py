"""KernelWarehouse's plan options (``PlanOptions``): how layers group into warehouses and how
each warehouse is sized.  The defaults reproduce the paper (Table 14)."""
from __future__ import annotations

import fnmatch
from dataclasses import dataclass, field, fields
from typing import Any

from ... import methods
from ...plan.budget import check_budget, parse_budget
from ..options import check_globs, choice, is_number


_STEM_CHOICES = ("auto", "plain", "warehouse")
_NORM_CHOICES = ("auto", "batchnorm", "layernorm")


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
        choice("mode", self.mode, methods.WAREHOUSE_METHODS)
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
        if "reduction" in settings and not (is_number(settings["reduction"]) and 0 < settings["reduction"] <= 1):
            raise ValueError(f"{where}[{pattern!r}]: reduction must be a number in (0, 1], got {settings['reduction']!r}")
        if "cell" in settings:
            cell = settings["cell"]
            if not (isinstance(cell, (list, tuple)) and len(cell) == 2
                    and all(is_number(v) and 0 < v <= 1 for v in cell)):
                raise ValueError(f"{where}[{pattern!r}]: cell must be [out, in] fractions in (0, 1], got {cell!r}")
            settings["cell"] = [float(v) for v in cell]
        checked[pattern] = settings
    return checked
