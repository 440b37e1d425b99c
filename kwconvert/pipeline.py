"""One conversion from a model name to a saved directory: build -> plan -> convert -> save.

The command line drives these steps one at a time (to show progress); Python users
usually call ``kwconvert.plan`` / ``kwconvert.convert`` / ``kwconvert.save`` directly.
"""
from __future__ import annotations

import copy
import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from . import io, methods
from .execution import reference_path
from .methods.layer_choice import OVERRIDES
from .models import build_model, canonical_source, default_input_size, load_weights, read_inputs
from .plan import Plan, plan as make_plan
from .report import SWEEP_BUDGETS, html_report, write_report
from .rewrite import convert, plan_of
from .trace import LayerGraph, trace
from .multihead import unpacked_attention

DEFAULT_OUT = Path("kwconvert-out")
#: Where the output check looks, per method: KernelWarehouse's start of training (tau = 1)
#: and serving (tau = 0); ODConv's serving (T = 1) and start of training from scratch (T = 30).
#: KernelDNA has no temperature.
COMPARED_TEMPERATURES = {"kernelwarehouse": (1.0, 0.0), "dynamic_conv": (1.0, 0.0), "odconv": (1.0, 30.0),
                         "kerneldna": (1.0,)}
#: Bound on each converted layer's max |diff| from its static original on the same input,
#: relative to that output's max |value|, where the conversion is exact (warehouse budget
#: >= 1): float32 rounding of one layer is ~1e-7..1e-6.
LAYER_TOLERANCE = 1e-5
#: Calibration inputs are run through the model this many at a time.
CALIBRATION_BATCH = 32
#: Outputs whose max |value| is below this compare nothing (a zero-initialised head, or
#: random weights that shrink the signal to ~1e-8): the per-layer check is then the check.
SMALL_OUTPUT = 1e-6


class ConversionMismatch(Exception):
    """A conversion that should reproduce the original does not (a bug, or a broken model)."""


@dataclass
class Conversion:
    """State of one conversion job; each step fills the fields the next one needs."""
    source: str
    budget: float
    input_size: tuple[int, ...] | None = None
    weights: Path | None = None
    init: str = "preserve"
    plan_options: dict[str, Any] = field(default_factory=dict)
    module: str | None = None  # convert only this sub-module (traced on what it receives)
    device: torch.device | None = None  # where to build, trace, convert and compare (None: the CPU)
    model_args: dict[str, Any] = field(default_factory=dict)  # to the model's constructor (-M)
    calibration: Path | None = None  # inputs the cells below b = 1 are fitted to the outputs on
    model: nn.Module | None = None
    graph: LayerGraph | None = None  # the whole model's trace, shared by every budget's plan
    plan: Plan | None = None
    converted: nn.Module | None = None
    max_abs_diff: float | None = None
    diff_at_temperature: dict[float, float | None] = field(default_factory=dict)
    output_scale: float | None = None
    not_comparable: tuple[str, ...] = ()
    #: tau -> (converted layer, max |diff| / max |output|) of the layer furthest from its original
    layer_diff_at_temperature: dict[float, tuple[str | None, float]] = field(default_factory=dict)
    saved_to: Path | None = None

    def build(self) -> nn.Module:
        self.source = canonical_source(self.source)
        self.model = build_model(self.source, **self.model_args).eval()
        if self.weights is not None:
            load_weights(self.model, self.weights)
        if self.device is not None:
            self.model.to(self.device)
        self.input_size = tuple(self.input_size or default_input_size(self.model))
        return self.model

    def example_input(self, batch: int = 1, seed: int = 0) -> torch.Tensor:
        generator = torch.Generator().manual_seed(seed)  # drawn on the CPU: the same input on every device
        return torch.randn(batch, *self.input_size, generator=generator).to(self.device or "cpu")

    def make_plan(self) -> Plan:
        self.plan = self._plan_at(self.budget)
        return self.plan

    def _plan_at(self, budget: float) -> Plan:
        """The model planned at ``budget``; the whole model is traced once for every budget."""
        inputs = (self.example_input(),)
        if self.module is None and self.graph is None:
            self.graph = trace(self.model, inputs)
        return make_plan(self.model, budget, inputs, model_name=self.source, module=self.module,
                         graph=self.graph if self.module is None else None, **self.plan_options)

    def report(self, path: Path) -> Path:
        """Write the plan's HTML page (:mod:`kwconvert.report`) with the chart over ``SWEEP_BUDGETS``."""
        sweep = []
        for budget in SWEEP_BUDGETS:
            try:
                sweep += [self._plan_at(budget)] if budget != self.plan.budget else []
            except ValueError:  # a budget the guard refuses for this model (memory): not on the chart
                continue
        order = [candidate.name for candidate in self.graph.candidates] if self.graph is not None else None
        return write_report(path, html_report(self.result_plan, sweep, order))

    def convert(self) -> nn.Module:
        if not self.plan.converted_layers:  # every candidate plain: a "conversion" would change nothing
            first = self.plan.plain[0] if self.plan.plain else None
            detail = f" ({first.layer}: {first.reason}{', ...' if len(self.plan.plain) > 1 else ''})" if first else ""
            overrides = sorted({OVERRIDES[s.reason] for s in self.plan.plain if s.reason in OVERRIDES})
            hint = f" ({' or '.join(overrides)} converts what the authors keep static)" if overrides else ""
            raise ValueError(f"the plan converts no layer: all {len(self.plan.plain)} candidate layers stay "
                             f"plain{detail}; --dry-run lists the reasons{hint}")
        self.converted = convert(self.model, self.plan, init=self.init, inplace=False,
                                 calibration=self._calibration_batches()).eval()
        return self.converted

    def _calibration_batches(self):
        """The calibration file's inputs in batches of ``CALIBRATION_BATCH``, on the model's device."""
        if self.calibration is None:
            return None
        inputs = read_inputs(self.calibration)
        device = self.device or "cpu"
        return [batch.to(device) for batch in inputs.split(CALIBRATION_BATCH)]

    @torch.no_grad()
    def compare(self) -> float | None:
        """Max |converted - original| on random inputs in eval mode, at tau = 1 and tau = 0,
        for the whole output and for every converted layer on the input it receives.

        tau = 1 is where training starts, tau = 0 where a trained KW model is served; with
        ``init="preserve"`` both give the original's function (b >= 1) or the same fit of it
        (b < 1).  ``max_abs_diff`` is the one at tau = 1, ``diff_at_temperature`` holds both.
        Outputs are compared tensor by tensor (:func:`compare_outputs`); tensors whose
        shapes differ (a detector's boxes, of which each model may find a different
        number) are listed in ``not_comparable`` instead.  None when no tensor compares.

        The output alone can compare nothing (a zero-initialised head gives 0 = 0, random
        weights may shrink it to 1e-8), so each converted layer is also compared with its
        static original (:class:`LayerCheck`); where the conversion is exact (warehouse
        budget >= 1) a layer beyond ``LAYER_TOLERANCE`` raises ``ConversionMismatch``.
        The forwards take the paper's straightforward path: the same function, without
        timing the fast paths on a shape the model is never served at.  The converted model
        is left at tau = 1.
        """
        sample = self.example_input(batch=2, seed=1)
        expected = self.model(sample)
        originals = static_originals(self.model, self.plan)
        exact = self._exact_layers()
        for tau in COMPARED_TEMPERATURES[self.plan.method]:
            set_temperatures(self.converted, tau)
            with reference_path(), LayerCheck(self.converted, originals) as layers:
                diff = compare_outputs(expected, self.converted(sample))
            self.diff_at_temperature[tau] = diff.max_abs_diff
            self.layer_diff_at_temperature[tau] = layers.worst(exact)
        set_temperatures(self.converted, 1.0)
        self.max_abs_diff, self.output_scale = self.diff_at_temperature[1.0], diff.output_scale
        self.not_comparable = diff.not_comparable
        self._refuse_a_mismatch()
        return self.max_abs_diff

    def _exact_layers(self) -> set[str]:
        """Converted layers that hold their kernel exactly (a warehouse at b >= 1, ODConv's;
        not KernelDNA's children, fitted from a parent)."""
        plan = self.result_plan
        return {name for w in plan.warehouses if w.budget >= 1 for name in w.layer_names} | {
            layer.name for layer in plan.layers if layer.parent is None}

    def _refuse_a_mismatch(self) -> None:
        for tau, (layer, relative) in self.layer_diff_at_temperature.items():
            if layer is not None and not relative <= LAYER_TOLERANCE:  # NaN fails too
                raise ConversionMismatch(
                    f"layer {layer} differs from its original by {relative:.3g} of its output at tau = {tau:g}, "
                    f"where the conversion should be exact (<= {LAYER_TOLERANCE:g}); nothing was saved")

    @property
    def output_too_small(self) -> bool:
        """Whether the outputs were too small for their difference to mean anything."""
        return self.output_scale is not None and self.output_scale < SMALL_OUTPUT

    def save(self, directory: Path | None = None) -> Path:
        directory = directory or default_out_dir(self.source, self.budget, self.plan.method)
        self.saved_to = io.save(self.converted, directory, source=self.source, input_size=self.input_size,
                                model_args=self.model_args)
        return self.saved_to

    @property
    def result_plan(self) -> Plan:
        """The converted model's plan (with init errors) once converted, else the plan."""
        return plan_of(self.converted) if self.converted is not None else self.plan


def parse_option(text: str) -> tuple[str, Any]:
    """``"stem=warehouse"`` -> ("stem", "warehouse"); values become bool / int / float / tuple.

    Lets the command line reach every ``PlanOptions`` field without a flag for each:
    ``true``/``false``, ``none``, numbers and fractions (``1/16``) convert, a comma makes a
    tuple (``exclude=layer4.*,fc``), a value starting with ``{`` or ``[`` is JSON
    (``warehouses={"stem.*": {"budget": 1}}``); anything else stays a string.  The planner validates.
    """
    key, sep, raw = text.partition("=")
    if not sep or not key.strip():
        raise ValueError(f"option '{text}' is not KEY=VALUE (e.g. stem=warehouse)")
    return key.strip().replace("-", "_"), _option_value(raw.strip())


def _option_value(raw: str) -> Any:
    if raw.startswith(("{", "[")):
        try:
            return json.loads(raw)
        except json.JSONDecodeError as err:
            raise ValueError(f"option value {raw!r} is not valid JSON: {err.msg}") from None
    if "," in raw:
        return tuple(_option_value(part.strip()) for part in raw.split(",") if part.strip())
    lowered = raw.lower()
    if lowered in ("true", "false"):
        return lowered == "true"
    if lowered == "none":
        return None
    for convert_number in (int, float):
        try:
            return convert_number(raw)
        except ValueError:
            pass
    numerator, slash, denominator = raw.partition("/")
    if slash:
        try:
            return float(numerator) / float(denominator)
        except (ValueError, ZeroDivisionError):
            pass
    return raw


def default_out_dir(source: str, budget: float, method: str = "kernelwarehouse") -> Path:
    """``./kwconvert-out/<model>-b<budget>/`` (ODConv: ``<model>-odconv<kernels>``, KernelDNA:
    ``<model>-kerneldna``), the model's short name made path-safe."""
    short = source.split(":", 1)[-1]
    setting = {"odconv": f"odconv{budget:g}", "kerneldna": "kerneldna"}.get(method, f"b{budget:g}")
    return DEFAULT_OUT / f"{re.sub(r'[^A-Za-z0-9_.-]+', '_', short)}-{setting}"


def set_temperatures(model: nn.Module, value: float) -> None:
    """Every dynamic layer's temperature at ``value`` (KW's tau, ODConv's T)."""
    for layer in methods.temperature_layers(model).values():
        methods.set_temperature_of(layer, value)


@dataclass(frozen=True)
class OutputDiff:
    """Two model outputs compared leaf tensor by leaf tensor.

    ``max_abs_diff`` and ``output_scale`` (max |expected|) are over the tensors present in
    both outputs with equal shapes, None when there are none; ``not_comparable`` names the
    others (``output[0]['boxes']: shape 3x4 vs 5x4``).
    """
    max_abs_diff: float | None
    output_scale: float | None
    not_comparable: tuple[str, ...]


def static_originals(model: nn.Module, plan: Plan) -> dict[str, nn.Module]:
    """Copies of the static layers ``plan`` converts, by name (attention the plan unpacks
    included), for :class:`LayerCheck`; take them before converting in place."""
    with unpacked_attention(model, plan.unpacked_attention):
        return {name: copy.deepcopy(model.get_submodule(name)) for name in plan.converted_layers}


class LayerCheck:
    """Forward hooks comparing each converted layer with its static original on the same input.

    The model-level check alone can be blind: a zero-initialised head (torchvision's ViT)
    or residual branch (timm's ``zero_init_last``), or a layer scale of 1e-6 (ConvNeXt),
    hides a converted layer's output from the logits; and in a deep model the rounding of
    every layer before it blurs it.  Each converted layer's output is compared with a copy
    of the static layer it replaced, run on the very input the converted layer received,
    relative to that output's max |value|: the conversion's own error, layer by layer.
    """

    def __init__(self, model: nn.Module, originals: dict[str, nn.Module]):
        self.model, self.originals = model, originals
        self.diffs: dict[str, float] = {}
        self.handles = []

    def __enter__(self) -> "LayerCheck":
        for name in self.originals:
            self.handles.append(self.model.get_submodule(name).register_forward_hook(self._hook(name)))
        return self

    def __exit__(self, *exc) -> None:
        for handle in self.handles:
            handle.remove()

    def _hook(self, name: str):
        def hook(module, args, output):
            expected = self.originals[name](*args)
            if expected.shape != output.shape:
                relative = math.inf
            elif not expected.numel():
                relative = 0.0
            else:
                scale = float(expected.abs().max())
                diff = float((output.float() - expected.float()).abs().max())
                relative = diff / scale if scale > 0 else diff
                relative = relative if math.isfinite(relative) else math.inf  # NaN counts as worst
            self.diffs[name] = max(self.diffs.get(name, 0.0), relative)
        return hook

    @property
    def missing(self) -> list[str]:
        """Converted layers the forward never called."""
        return [name for name in self.originals if name not in self.diffs]

    def worst(self, among: set[str] | None = None) -> tuple[str | None, float]:
        """The layer furthest from its original (of ``among``, if given) and its relative diff."""
        diffs = {name: diff for name, diff in self.diffs.items() if among is None or name in among}
        if not diffs:
            return None, 0.0
        name = max(diffs, key=diffs.__getitem__)
        return name, diffs[name]


def compare_outputs(expected: Any, actual: Any) -> OutputDiff:
    """Compare two outputs (tensors, or nested lists, tuples and dicts of them) leaf by leaf."""
    pairs, not_comparable = [], []
    for where, a, b in _leaves(expected, actual, "output"):
        if b is None:
            not_comparable.append(f"{where}: {a}")
        elif a.shape != b.shape:
            not_comparable.append(f"{where}: shape {_dims(a)} vs {_dims(b)}")
        elif a.numel():
            pairs.append((a.float(), b.float()))
    if not pairs:
        return OutputDiff(None, None, tuple(not_comparable))
    return OutputDiff(max_abs_diff=max(float((a - b).abs().max()) for a, b in pairs),
                      output_scale=max(float(a.abs().max()) for a, _ in pairs),
                      not_comparable=tuple(not_comparable))


def _leaves(a: Any, b: Any, where: str):
    """``(where, a, b)`` for each pair of tensors at the same place in ``a`` and ``b``, and
    ``(where, reason, None)`` where the structures part (a missing key, another type).
    Values that are neither tensors nor containers (None, sizes, names) are skipped."""
    if isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor):
        yield where, a, b
    elif isinstance(a, dict) and isinstance(b, dict):
        for key in [*a, *(k for k in b if k not in a)]:
            place = f"{where}[{key!r}]"
            if key in a and key in b:
                yield from _leaves(a[key], b[key], place)
            elif _holds_tensor(a.get(key, b.get(key))):
                yield place, f"only in the {'original' if key in a else 'converted'} model's output", None
    elif isinstance(a, (tuple, list)) and isinstance(b, (tuple, list)):
        for index, (x, y) in enumerate(zip(a, b)):
            yield from _leaves(x, y, f"{where}[{index}]")
        if _holds_tensor(a[len(b):] if len(a) > len(b) else b[len(a):]):
            yield where, f"length {len(a)} vs {len(b)}", None
    elif _holds_tensor(a) or _holds_tensor(b):
        yield where, f"{type(a).__name__} vs {type(b).__name__}", None


def _holds_tensor(value: Any) -> bool:
    if isinstance(value, torch.Tensor):
        return True
    if isinstance(value, dict):
        return any(_holds_tensor(v) for v in value.values())
    return isinstance(value, (tuple, list)) and any(_holds_tensor(v) for v in value)


def _dims(tensor: torch.Tensor) -> str:
    return "x".join(map(str, tensor.shape)) or "scalar"


def _max_abs_diff(a: Any, b: Any) -> float:
    """Largest absolute difference between two outputs (tensors, or nested tuples/dicts);
    NaN when some of their tensors cannot be compared (:func:`compare_outputs`)."""
    diff = compare_outputs(a, b)
    if diff.not_comparable:
        return float("nan")
    return diff.max_abs_diff if diff.max_abs_diff is not None else 0.0
