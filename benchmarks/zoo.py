"""Coverage sweep: does every model of the zoo plan, convert, run and match at tau = 1?

kwconvert promises "any model" (issue 6).  For every model of the zoo this script

1. builds it with random weights (no download) and traces it on one sample of its own
   input size (timm's ``pretrained_cfg``, torchvision's 224 / 299, the video models'
   clip size): plans at b = 1, 1/2 and 1/4 from the same trace;
2. converts it at b = 1 with ``init="preserve"`` and runs one forward at tau = 1 on a
   batch of two *small* inputs: the first size of a ladder (64, 96, 128, ... up to its own
   size) the original model accepts.  The check is equivalence, not accuracy, and a
   convolution computes the same function at any size;
   BatchNorm statistics are first set to that batch's (``_calibrate_batchnorm``), so
   activations have the scale of a trained model's;
3. checks the paper's bounds: outputs equal the original's (max |diff| within ``tolerance``,
   and every converted layer within 1e-5 of its static original: ``kwconvert.pipeline.LayerCheck``), parameters <= 1.5x the baseline at b = 1 and <= 1.0x at b = 1/2, and the
   converted model holds exactly the parameters the plan predicted;
4. reports the distribution of converted / baseline parameters per group and budget
   (min / median / max) against the targets of the issue "budgets below 1 shrink every
   model" (``budget_report``), and every model above its target with what holds its
   parameters (``why_b05`` / ``why_b025``: static layers by reason, cells, attention, the
   allocator's or the budget guard's last note).

``--plans-only`` does step 1 alone, building the models on the meta device where they
allow it (rows get status ``planned``, or ``fail`` when a plan breaks a bound), and writes
benchmarks/results/zoo_budgets.json: the budget report in minutes (5-8 without timm on two
busy cores), and the full results in zoo.json stay as they are.

The zoo: every classification model of torchvision
(``torchvision.models.list_models(module=torchvision.models)``), its video models (Conv3d),
``custom:conv1d_resnet`` (a 1-D residual CNN below), and the timm sample committed in
``benchmarks/zoo_timm_sample.txt`` (its header states the rule that drew it;
``--make-timm-sample`` draws it again).

Statuses: ``pass``; ``refused`` (kwconvert declined with a specific reason); ``fail``
(converted, but an output or a bound is off: the reason says which); ``error`` (an
unexpected exception: a bug); ``model-error`` (the original model itself did not build or
run; not kwconvert's doing, but counted against the totals); ``timeout``; ``planned``
(``--plans-only``: planned within the bounds, not converted).

    .venv/bin/python benchmarks/zoo.py                        # the whole sweep, ~1 h on 2 busy cores
    .venv/bin/python benchmarks/zoo.py --no-timm --jobs 2     # torchvision + video + conv1d
    .venv/bin/python benchmarks/zoo.py --subset 'timm:vit*' --subset torchvision:resnet18
    .venv/bin/python benchmarks/zoo.py --failed               # re-run what did not pass last time
    .venv/bin/python benchmarks/zoo.py --plans-only --jobs 2  # the budget report alone, in minutes

Results go to benchmarks/results/zoo.json (written atomically after every model; a run
over a subset updates those models' rows and keeps the others, unless ``--fresh``).
"""
from __future__ import annotations

import argparse
import concurrent.futures as futures
import contextlib
import datetime
import fnmatch
import gc
import json
import math
import multiprocessing
import platform
import signal
import statistics
import sys
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run as a script: make ``benchmarks.results_io`` importable
    sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
from torch import nn  # noqa: E402

from benchmarks.results_io import write_json  # noqa: E402
from kwconvert.pipeline import LAYER_TOLERANCE  # noqa: E402

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results" / "zoo.json"
BUDGET_RESULTS = HERE / "results" / "zoo_budgets.json"  # --plans-only: never overwrites RESULTS
#: --method odconv / kerneldna / dynamic_conv: results of their own; ODConv converts at ODCONV_KERNELS
#: per layer, DY-Conv at DYNAMIC_CONV_KERNELS whole kernels per layer.
METHOD_RESULTS = {method: HERE / "results" / f"zoo_{method}.json" for method in ("odconv", "kerneldna", "dynamic_conv")}
ODCONV_KERNELS = 4
DYNAMIC_CONV_KERNELS = 4
#: Per-layer methods and what they are planned with (KernelDNA: its parents chosen from the weights).
PER_LAYER_OPTIONS = {"odconv": {"kernels": ODCONV_KERNELS}, "kerneldna": {}}
#: What each method's one plan is made with (KernelWarehouse plans every budget of RATIO_FIELDS).
METHOD_OPTIONS = {**PER_LAYER_OPTIONS, "dynamic_conv": {"budget": DYNAMIC_CONV_KERNELS}}
TIMM_SAMPLE = HERE / "zoo_timm_sample.txt"
RESULTS_FORMAT = 1

#: The paper's budget bounds (planner issue): converted / baseline parameters.
BOUNDS = {1.0: 1.5, 0.5: 1.0}
#: Budgets every model is planned at, and the row field holding each plan's ratio.
RATIO_FIELDS = {1.0: "ratio_b1", 0.5: "ratio_b05", 0.25: "ratio_b025"}
#: Row fields explaining the b < 1 plans (``_why``).
WHY_FIELDS = {0.5: "why_b05", 0.25: "why_b025"}
#: The targets of the issue "budgets below 1 shrink every model", converted / baseline
#: parameters over torchvision's classifiers (group "torchvision"): the median at b = 1/2
#: <= 0.75 and at b = 1/4 <= 0.60; at b = 1/2 every model of at least 2 M parameters
#: <= 0.85, and mobilenet_v2 <= 0.77.  Reported by ``budget_report``, not pass / fail:
#: BOUNDS stays the hard bound of a row.
TARGET_GROUP = "torchvision"
MEDIAN_TARGETS = {0.5: 0.75, 0.25: 0.60}
EACH_TARGET = {0.5: (2_000_000, 0.85)}  # budget: (models with at least this many parameters, target)
MODEL_TARGETS = {("torchvision:mobilenet_v2", 0.5): 0.77}
#: Absolute bound on max |converted - original| at tau = 1 (issue 6).
ABSOLUTE_TOLERANCE = 1e-4
#: Models with large outputs: this many times the original's own float32 error (see tolerance).
FLOAT32_ERROR_FACTOR = 4.0
#: Models above this many parameters are not run in float64 (8 bytes a parameter: regnet_y_128gf,
#: the largest torchvision classifier, takes 5.2 GB); they get a relative bound.
FLOAT64_MAX_PARAMS = 700_000_000
#: Where float32 misses its bound, converted and original are compared in float64 too: an
#: exact conversion is then within this fraction of max(1, max |output|).
FLOAT64_TOLERANCE = 1e-9
#: Relative bound (fraction of max |original output|) when the float32 error is not measured.
RELATIVE_TOLERANCE = 1e-5
#: Spatial sizes tried for the comparison, smallest first (then the model's own size).
CHECK_SIZES = (64, 96, 128, 160, 192, 224)
CHECK_BATCH = 2
STATUSES = ("pass", "refused", "fail", "error", "model-error", "timeout", "planned")
GROUPS = ("torchvision", "video", "custom", "timm")


def tolerance(output_scale: float, float32_error: float | None) -> float:
    """Max |converted - original| allowed at tau = 1 and b = 1.

    At b = 1 and tau = 1 the converted model multiplies the same weights with the same
    activations; only the order of float32 additions differs (a per-sample convolution
    with the batch folded into the groups runs another algorithm than the dense one).  It
    cannot be closer to the original than float32 itself is to exact arithmetic, and in a
    deep model with large activations that gap is far above 1e-4 (efficientnet_v2_m:
    logits of ~670, the original's own float32 error 0.05, and its batch-1 and batch-2
    outputs differ by 0.1).  So the bound is 1e-4 absolute, or FLOAT32_ERROR_FACTOR times
    the original's own float32 error (max |float32 - float64| on the same batch) when that
    is larger; for models too big to run in float64, RELATIVE_TOLERANCE of max |output|.
    The per-layer check (``kwconvert.pipeline.LayerCheck``) is not blurred by depth and stays at 1e-5.
    """
    if float32_error is None:
        return max(ABSOLUTE_TOLERANCE, RELATIVE_TOLERANCE * output_scale)
    return max(ABSOLUTE_TOLERANCE, FLOAT32_ERROR_FACTOR * float32_error)


# =======================================================================================
# The zoo
# =======================================================================================
class Conv1dResNet(nn.Module):
    """A 1-D residual CNN (signals, e.g. audio or ECG): stem, three stages, a head.

    Stages double the width and halve the length through a strided first block with a
    1x1 projection shortcut, as ResNet does in 2-D, so the planner's stages, handovers and
    stem rules all apply to Conv1d.
    """

    def __init__(self, in_channels: int = 2, classes: int = 10, widths=(32, 64, 128), blocks: int = 2):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv1d(in_channels, widths[0], 7, stride=2, padding=3, bias=False),
                                  nn.BatchNorm1d(widths[0]), nn.ReLU())
        stages, width = [], widths[0]
        for stage, out in enumerate(widths):
            for index in range(blocks):
                stride = 2 if stage > 0 and index == 0 else 1
                stages.append(_Block1d(width, out, stride))
                width = out
        self.stages = nn.Sequential(*stages)
        self.head = nn.Linear(width, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.stages(self.stem(x)).mean(-1))


class _Block1d(nn.Module):
    def __init__(self, width: int, out: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv1d(width, out, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm1d(out)
        self.conv2 = nn.Conv1d(out, out, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm1d(out)
        self.shortcut = (nn.Sequential(nn.Conv1d(width, out, 1, stride=stride, bias=False), nn.BatchNorm1d(out))
                         if stride != 1 or width != out else nn.Identity())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.relu(self.bn1(self.conv1(x)))
        return torch.relu(self.bn2(self.conv2(y)) + self.shortcut(x))


#: Custom models: id -> (builder, input size of one sample).
CUSTOM = {"conv1d_resnet": (Conv1dResNet, (2, 1024))}
#: Video models whose clip is 112 x 112 (torchvision's docs); the others read 224 x 224.
VIDEO_112 = ("r3d_18", "mc3_18", "r2plus1d_18")


@dataclass(frozen=True)
class Case:
    """One model of the zoo: ``id`` is ``group:name``."""
    id: str

    @property
    def group(self) -> str:
        return self.id.partition(":")[0]

    @property
    def name(self) -> str:
        return self.id.partition(":")[2]

    def build(self) -> nn.Module:
        import torchvision
        if self.group in ("torchvision", "video"):
            return torchvision.models.get_model(self.name, weights=None)
        if self.group == "timm":
            import timm
            return timm.create_model(self.name, pretrained=False)
        return CUSTOM[self.name][0]()

    def own_size(self, model: nn.Module) -> tuple[int, ...]:
        """One sample at the size the model is made for (its trace and plan use it)."""
        from kwconvert.models import default_input_size
        if self.group == "video":
            side = 112 if self.name in VIDEO_112 else 224
            return (3, 16, side, side)
        if self.group == "custom":
            return CUSTOM[self.name][1]
        return default_input_size(model)

    def check_sizes(self, own: tuple[int, ...]) -> list[tuple[int, ...]]:
        """Sample sizes to try for the comparison, smallest first, ending at ``own``."""
        if self.group == "custom":
            return [own[:-1] + (256,), own]
        sides = [s for s in CHECK_SIZES if s < min(own[-2:])]
        if self.group == "video":
            return [(3, 8, s, s) for s in sides] + [own[:1] + (8,) + own[2:], own]
        return [(own[0], s, s) for s in sides] + [own]


def timm_sample(path: Path = TIMM_SAMPLE) -> list[str]:
    """Model names of the committed timm sample (first word of every non-comment line)."""
    if not path.exists():
        return []
    names = []
    for line in path.read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            names.append(line.split()[0])
    return names


def all_cases(with_timm: bool = True) -> list[Case]:
    import torchvision
    cases = [Case(f"torchvision:{n}") for n in torchvision.models.list_models(module=torchvision.models)]
    cases += [Case(f"video:{n}") for n in torchvision.models.list_models(module=torchvision.models.video)]
    cases += [Case(f"custom:{n}") for n in CUSTOM]
    if with_timm:
        cases += [Case(f"timm:{n}") for n in timm_sample()]
    return cases


# =======================================================================================
# One model
# =======================================================================================
class _Timeout(Exception):
    pass


@contextlib.contextmanager
def _time_limit(seconds: float | None):
    """SIGALRM-based limit (Linux, main thread of a worker); no limit when None."""
    if not seconds:
        yield
        return

    def expired(signum, frame):
        raise _Timeout()

    previous = signal.signal(signal.SIGALRM, expired)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def _one_line(err: BaseException) -> str:
    text = " ".join(str(err).split()) or type(err).__name__
    return text[:400]


def _first_accepted(model: nn.Module, sizes: list[tuple[int, ...]], seed: int):
    """The first sample size the original model runs on, a batch of that size, its output."""
    failure = None
    for size in sizes:
        generator = torch.Generator().manual_seed(seed)
        x = torch.randn(CHECK_BATCH, *size, generator=generator)
        try:
            return size, x, model(x)
        except Exception as err:  # the original rejects this size: try the next one
            failure = err
    raise _ModelError(f"the original model runs on none of {', '.join('x'.join(map(str, s)) for s in sizes)}: "
                      f"{type(failure).__name__}: {_one_line(failure)}")


def _calibrate_batchnorm(model: nn.Module, x: torch.Tensor) -> bool:
    """Give the BatchNorms the statistics of ``x``, as a trained model's would fit its data.

    With weights=None every BatchNorm holds mean 0 and variance 1, which in eval mode
    normalises nothing: activations shrink or grow layer after layer (mobilenet_v2's
    logits ~1e-9, inception_v3's ~1e9), and an absolute bound then means nothing.  One
    training-mode forward with momentum 1 sets each running statistic to the batch's.
    When the training-mode forward fails part-way (inception_v3's auxiliary head on a
    small input), the BatchNorms it reached keep the batch's statistics.  Returns True
    when any BatchNorm was calibrated.
    """
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)
             and m.track_running_stats]
    if not norms:
        return False
    momenta = [m.momentum for m in norms]
    try:
        for m in norms:
            m.reset_running_stats()
            m.momentum = 1.0
        model.train()
        model(x)
    except Exception:  # keep what the forward reached
        pass
    finally:
        for m, momentum in zip(norms, momenta):
            m.momentum = momentum
        model.eval()
    return any(int(m.num_batches_tracked) > 0 for m in norms)


class _ModelError(Exception):
    """The original model (not kwconvert) failed."""


def _float32_error(model: nn.Module, x: torch.Tensor, expected: Any) -> tuple[float | None, Any]:
    """max |float32 output - float64 output| of the original on ``x``, its own rounding error,
    and its float64 output (for :func:`_float64_diff`).

    The model goes to float64 and back (exact).  (None, None) for models above
    FLOAT64_MAX_PARAMS parameters (memory) or that do not run in float64.
    """
    from kwconvert.pipeline import _max_abs_diff
    if sum(p.numel() for p in model.parameters()) > FLOAT64_MAX_PARAMS:
        return None, None
    try:
        model.double()
        exact = model(x.double())
        return _max_abs_diff(expected, exact), exact
    except Exception:
        return None, None
    finally:
        model.float()


def _float64_diff(case: Case, plan: Any, x: torch.Tensor, exact: Any) -> float | None:
    """max |converted - original| with both built, converted and run in float64: the second
    opinion where float32's rounding, amplified by a deep model, hides whether a conversion is
    exact (ODConv's n kernels are spread copies of the trained one, rounded once more in
    float32).  The model is built again as the float32 run built it."""
    from kwconvert import reference_path
    from kwconvert.pipeline import _max_abs_diff
    from kwconvert.rewrite import convert
    try:
        model, _ = _build(case, {})
        _calibrate_batchnorm(model, x)
        converted = convert(model.double(), plan, init="preserve", inplace=True).eval()
        with reference_path():
            return _max_abs_diff(exact, converted(x.double()))
    except Exception:
        return None


def run_case(case_id: str, timeout: float | None = None, fast_path: bool = False,
             plans_only: bool = False, method: str = "kernelwarehouse") -> dict[str, Any]:
    """Plan, convert and check one model (only plan it with ``plans_only``); a result row (never raises)."""
    case = Case(case_id)
    row: dict[str, Any] = {"model": case.id, "group": case.group, "status": None, "reason": "",
                           "ratio_b1": None, "ratio_b05": None, "ratio_b025": None, "why_b05": None,
                           "why_b025": None, "max_diff": None, "output_scale": None,
                           "float32_error": None, "tolerance": None, "layer_diff": None, "worst_layer": None, "plan_convert_s": None, "forward_s": None,
                           "warehouses": None, "converted_layers": None, "plain_layers": None,
                           "own_size": None, "check_size": None, "params_baseline": None,
                           "when": datetime.datetime.now().isoformat(timespec="seconds")}
    stage = "build"
    start = time.perf_counter()
    try:
        with _time_limit(timeout), warnings.catch_warnings(), torch.no_grad():
            warnings.simplefilter("ignore")
            stage = _plans_only(case, row) if plans_only else _check(case, row, fast_path, method)
    except _Timeout:
        row.update(status="timeout", reason=f"over {timeout:g} s (stage: {row.get('stage', stage)})")
    except _ModelError as err:
        row.update(status="model-error", reason=str(err))
    except ValueError as err:  # kwconvert's refusals are ValueErrors naming the reason
        row.update(status="refused" if row.get("stage") in ("plan", "convert") else "error",
                   reason=f"{row.get('stage')}: {_one_line(err)}")
    except Exception as err:
        row.update(status="error", reason=f"{row.get('stage')}: {type(err).__name__}: {_one_line(err)}")
    row["total_s"] = round(time.perf_counter() - start, 2)
    row.pop("stage", None)
    gc.collect()
    return row


def _check(case: Case, row: dict[str, Any], fast_path: bool, method: str = "kernelwarehouse") -> str:
    from kwconvert import reference_path
    from kwconvert.methods.kernelwarehouse.layers import set_temperature
    from kwconvert.pipeline import LayerCheck, _max_abs_diff, compare_outputs, static_originals
    from kwconvert.plan import plan
    from kwconvert.rewrite import convert, plan_of
    from kwconvert.trace import trace

    model, own = _build(case, row)

    row["stage"] = "original forward"
    size, x, expected = _first_accepted(model, case.check_sizes(own), seed=1)
    row["check_size"] = list(size)
    if _calibrate_batchnorm(model, x):
        expected = model(x)
    scale = compare_outputs(expected, expected).output_scale or 0.0  # max |output|
    noise, exact_output = _float32_error(model, x, expected)

    row["stage"] = "plan"
    started = time.perf_counter()
    graph = trace(model, torch.randn(1, *own, generator=torch.Generator().manual_seed(0)))
    if method in METHOD_OPTIONS:  # one plan: the budget bounds are KernelWarehouse's
        plan_b1 = plan(model, graph=graph, model_name=case.id, method=method, **METHOD_OPTIONS[method])
        plans = {}
        _count_layers(row, plan_b1)
    else:
        plan_b1 = plan(model, 1.0, graph=graph, model_name=case.id)
        plans = _plan_budgets(case, model, graph, row, plan_b1)
    planned = time.perf_counter() - started
    originals = static_originals(model, plan_b1)

    row["stage"] = "convert"
    started = time.perf_counter()
    converted = convert(model, plan_b1, init="preserve", inplace=True).eval()
    row["plan_convert_s"] = round(planned + time.perf_counter() - started, 3)
    params = sum(p.numel() for p in converted.parameters())

    row["stage"] = "kw forward"
    set_temperature(converted, 1.0)
    started = time.perf_counter()
    with (contextlib.nullcontext() if fast_path else reference_path()), \
            LayerCheck(converted, originals) as compared:
        actual = converted(x)
    row["forward_s"] = round(time.perf_counter() - started, 3)
    diff = _max_abs_diff(expected, actual)
    allowed = tolerance(scale, noise)
    # KernelDNA's children are least-squares fits from their parents: compared only where exact
    exact = {layer.name for layer in plan_b1.layers if layer.parent is None} if plan_b1.layers else None
    worst_layer, layer_diff = compared.worst(exact)
    row.update(max_diff=diff, output_scale=scale, float32_error=noise, tolerance=allowed,
               layer_diff=layer_diff, worst_layer=worst_layer)

    problems = []
    fitted = [layer.fit_error for layer in plan_of(converted).layers if layer.parent is not None]
    if fitted:  # the output is the fit's, not the original's: its error must be a number in [0, 1]
        allowed = math.inf if all(0 <= error <= 1 for error in fitted) else -math.inf
        row["fit_errors"] = [round(min(fitted), 4), round(max(fitted), 4)]
    if not diff <= allowed and exact_output is not None and not fitted:
        row["max_diff_float64"] = _float64_diff(case, plan_b1, x, exact_output)
    diff64 = row.get("max_diff_float64")
    if not (diff <= allowed or (diff64 is not None and diff64 <= FLOAT64_TOLERANCE * max(scale, 1.0))):  # NaN fails
        also = f"; in float64 {diff64:.3g}" if diff64 is not None else ""
        problems.append(f"max |diff| {diff:.3g} > {allowed:.3g} (max |output| {scale:.3g}{also})")
    if not layer_diff <= LAYER_TOLERANCE:
        problems.append(f"layer {worst_layer}: max |diff| {layer_diff:.3g} of its max |output| > {LAYER_TOLERANCE:g}")
    if compared.missing:
        problems.append(f"{len(compared.missing)} converted layer(s) never called (first: {compared.missing[0]})")
    problems += _bound_problems(plans) if plans else []
    if params != plan_b1.params_converted:
        problems.append(f"the converted model holds {params:,} parameters, the plan predicted "
                        f"{plan_b1.params_converted:,}")
    row.update(status="fail" if problems else "pass", reason="; ".join(problems))
    return "done"


def _build(case: Case, row: dict[str, Any], device: str = "cpu") -> tuple[nn.Module, tuple[int, ...]]:
    """The model in eval mode (seed 0) and its own input size; fills the row's size and parameters."""
    row["stage"] = "build"
    torch.manual_seed(0)
    try:
        with torch.device(device):
            model = case.build().eval()
    except Exception as err:
        raise _ModelError(f"the model does not build: {type(err).__name__}: {_one_line(err)}") from None
    own = case.own_size(model)
    row.update(own_size=list(own), params_baseline=sum(p.numel() for p in model.parameters()))
    return model, own


def _plan_budgets(case: Case, model: nn.Module, graph, row: dict[str, Any], plan_b1) -> dict[float, Any]:
    """Plans at every budget of RATIO_FIELDS from one trace (``plan_b1`` given: it is timed).

    Fills the row's ratios, its layer counts at b = 1 and, for b < 1, what holds the
    parameters (``_why``), so the budget report can say why a model is above its target.
    Raises ValueError when the plan at b = 1 converts no layer (a refusal).
    """
    from kwconvert.plan import plan
    plans = {1.0: plan_b1}
    for budget in RATIO_FIELDS:
        if budget not in plans:
            plans[budget] = plan(model, budget, graph=graph, model_name=case.id)
    row.update({RATIO_FIELDS[b]: round(p.ratio, 4) for b, p in plans.items()})
    sizes = _layer_sizes(model, graph.unpacked_attention, {s.layer for p in plans.values() for s in p.plain})
    row.update({WHY_FIELDS[b]: _why(plans[b], sizes) for b in WHY_FIELDS})
    _count_layers(row, plan_b1)
    return plans


def _count_layers(row: dict[str, Any], plan_b1) -> None:
    """The row's layer counts; a ValueError (a refusal) when the plan converts no layer."""
    row.update(warehouses=len(plan_b1.warehouses), converted_layers=len(plan_b1.converted_layers),
               plain_layers=len(plan_b1.plain))
    if not plan_b1.converted_layers:
        raise ValueError(f"the plan converts no layer ({'; '.join(sorted({s.reason for s in plan_b1.plain}))})")


def _bound_problems(plans: dict[float, Any]) -> list[str]:
    """The plans above BOUNDS (the paper's hard bounds), one phrase each."""
    return [f"b={b:g}: {plans[b].ratio:.3f}x the baseline parameters > {bound:g}x"
            for b, bound in BOUNDS.items() if plans[b].ratio > bound]


def _layer_sizes(model: nn.Module, unpacked: tuple[str, ...], names: set[str]) -> dict[str, int]:
    """Parameters of the layers ``names`` (those inside nn.MultiheadAttention unpacked, as the
    plan names them); 0 for a name that is no module."""
    from kwconvert.multihead import unpacked_attention
    sizes = {}
    with unpacked_attention(model, unpacked):
        for name in names:
            try:
                sizes[name] = sum(p.numel() for p in model.get_submodule(name).parameters())
            except AttributeError:
                sizes[name] = 0
    return sizes


#: Characters of a plan note quoted in a row's ``why``.
WHY_NOTE_CHARS = 150


def _why(plan, sizes: dict[str, int]) -> str:
    """What holds a plan's parameters, as shares of the baseline, and what the allocator did.

    ``static: head 12%, stem 3%; cells 41%; attention 9%; rest 5%`` (the shares add up to
    the ratio: ``rest`` is what no candidate layer holds, norms and embeddings), then the
    last note of the allocator or the budget guard: the budget report quotes it for a model
    above its target, so the reader sees whether the static layers, the attention or a
    stopped allocator keep it there.
    """
    baseline = plan.params_baseline or 1
    static: dict[str, int] = {}
    for layer in plan.plain:
        label = _reason_label(layer.reason)
        static[label] = static.get(label, 0) + sizes.get(layer.layer, 0)
    cells = sum(w.warehouse_params for w in plan.warehouses)
    attention = sum(w.attention_params for w in plan.warehouses)
    rest = plan.params_converted - sum(static.values()) - cells - attention
    shares = ", ".join(f"{label} {_percent(n / baseline)}"
                       for label, n in sorted(static.items(), key=lambda item: -item[1]) if n)
    parts = [f"static: {shares or 'none'}", f"cells {_percent(cells / baseline)}",
             f"attention {_percent(attention / baseline)}", f"rest {_percent(rest / baseline)}"]
    notes = [n for n in plan.notes if n.startswith(("allocator:", "budget guard"))]
    if notes:
        last = notes[-1] if len(notes[-1]) <= WHY_NOTE_CHARS else notes[-1][:WHY_NOTE_CHARS - 3] + "..."
        parts.append(f"last of {len(notes)} note(s): {last}")
    return "; ".join(parts)


def _reason_label(reason: str, chars: int = 40) -> str:
    """A static layer's reason without its explanation: "query/key projection (static in
    ViTs, ...)" is "query/key projection"; a long one is cut at a word."""
    for separator in (" (", ";", ":"):
        reason = reason.split(separator)[0]
    return reason if len(reason) <= chars else reason[:chars].rsplit(" ", 1)[0] + "..."


def _percent(share: float) -> str:
    return "<1%" if 0 < share < 0.005 else f"{100 * share:.0f}%"


def _plans_only(case: Case, row: dict[str, Any]) -> str:
    """``--plans-only``: build, trace and plan at every budget; no conversion, no forward.

    The model is built on the meta device (no weights allocated or initialised: the
    plan needs shapes, not values), and again on the CPU when anything fails there (a
    model that reads a tensor's value while it builds or runs); ``row["device"]`` says
    which.  Status ``planned``, or ``fail`` when a plan breaks BOUNDS.
    """
    try:
        plans = _plan_on(case, row, "meta")
    except _Timeout:
        raise
    except Exception:
        plans = _plan_on(case, row, "cpu")
    problems = _bound_problems(plans)
    row.update(status="fail" if problems else "planned", reason="; ".join(problems))
    return "done"


def _plan_on(case: Case, row: dict[str, Any], device: str) -> dict[float, Any]:
    """Build ``case`` on ``device``, trace it on one sample of its own size, plan every budget."""
    from kwconvert.plan import plan
    from kwconvert.trace import trace

    row["device"] = device
    model, own = _build(case, row, device)

    row["stage"] = "plan"
    started = time.perf_counter()
    sample = (torch.empty(1, *own, device=device) if device == "meta"
              else torch.randn(1, *own, generator=torch.Generator().manual_seed(0)))
    graph = trace(model, sample)
    plans = _plan_budgets(case, model, graph, row, plan(model, 1.0, graph=graph, model_name=case.id))
    row["plan_s"] = round(time.perf_counter() - started, 3)  # the trace and every plan
    return plans


# =======================================================================================
# The sweep
# =======================================================================================
def _worker_init(threads: int) -> None:
    torch.set_num_threads(threads)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent handles Ctrl-C


#: A worker process is replaced after this many models, to give its memory back.
MODELS_PER_WORKER = 8


def sweep(cases: list[Case], jobs: int, threads: int, timeout: float | None, fast_path: bool,
          on_row: Callable[[dict], None], plans_only: bool = False, method: str = "kernelwarehouse") -> None:
    """Run ``cases`` in ``jobs`` worker processes, in rounds of fresh workers.

    Each round's pool is shut down before the next starts (``max_tasks_per_child`` can
    hang on Python 3.11), so no worker runs more than MODELS_PER_WORKER models.
    """
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    context = multiprocessing.get_context("spawn")
    columns = (TextColumn("[progress.description]{task.description}"), BarColumn(), MofNCompleteColumn(),
               TimeElapsedColumn(), TextColumn("{task.fields[last]}"))
    per_round = jobs * MODELS_PER_WORKER
    with Progress(*columns, transient=False) as progress:
        task = progress.add_task("zoo sweep", total=len(cases), last="")
        for start in range(0, len(cases), per_round):
            pool = futures.ProcessPoolExecutor(max_workers=jobs, mp_context=context, initializer=_worker_init,
                                               initargs=(threads,))
            try:
                pending = {pool.submit(run_case, case.id, timeout, fast_path, plans_only, method): case
                           for case in cases[start:start + per_round]}
                for done in futures.as_completed(pending):
                    case = pending[done]
                    try:
                        row = done.result()
                    except Exception as err:  # the worker died (out of memory, a crash in native code)
                        row = {"model": case.id, "group": case.group, "status": "error",
                               "reason": f"worker died: {type(err).__name__}: {_one_line(err)}"}
                    on_row(row)
                    progress.update(task, advance=1, last=f"{row['model']}: {row['status']}")
            except KeyboardInterrupt:
                for process in list(getattr(pool, "_processes", {}).values()):
                    process.terminate()
                pool.shutdown(wait=False, cancel_futures=True)
                raise
            pool.shutdown()


def summarise(rows: list[dict]) -> dict[str, Any]:
    """Counts per group and status, and the pass rate per group."""
    summary: dict[str, Any] = {}
    for group in GROUPS + ("all",):
        members = [r for r in rows if group == "all" or r["group"] == group]
        if not members:
            continue
        counts = {status: sum(r["status"] == status for r in members) for status in STATUSES}
        summary[group] = {"models": len(members), **counts,
                          "pass_percent": round(100 * counts["pass"] / len(members), 1)}
    return summary


def budget_report(rows: list[dict]) -> dict[str, Any]:
    """Converted / baseline parameters per group and budget against the issue's targets.

    ``distribution``: per group (and "all") and budget, min / median / max over the rows
    that planned, the models at the extremes, and for TARGET_GROUP the median target and
    whether it is met (None elsewhere: the issue sets targets for torchvision only).
    ``above_target``: every TARGET_GROUP model above its own target (EACH_TARGET,
    MODEL_TARGETS; the stricter when both apply) with the row's ``why``, and every one
    with no ratio at a budget that has a target: it would hide from the median.
    """
    distribution = []
    for group in GROUPS + ("all",):
        members = [r for r in rows if group == "all" or r["group"] == group]
        for budget, field_name in RATIO_FIELDS.items():
            planned = sorted((r[field_name], r["model"]) for r in members if r.get(field_name) is not None)
            if not planned:
                continue
            median = statistics.median(ratio for ratio, _ in planned)
            target = MEDIAN_TARGETS.get(budget) if group == TARGET_GROUP else None
            distribution.append({
                "group": group, "budget": budget, "models": len(planned), "of": len(members),
                "min": planned[0][0], "min_model": planned[0][1], "median": round(median, 4),
                "max": planned[-1][0], "max_model": planned[-1][1],
                "target": target, "met": None if target is None else median <= target})
    return {"targets": _targets(), "distribution": distribution, "above_target": _above_target(rows)}


def _targets() -> dict[str, Any]:
    """The targets as JSON (string keys), so a results file says what it was held to."""
    return {"group": TARGET_GROUP, "median": {str(b): t for b, t in MEDIAN_TARGETS.items()},
            "each": {str(b): {"min_params": n, "target": t} for b, (n, t) in EACH_TARGET.items()},
            "model": {f"{m}@{b:g}": t for (m, b), t in MODEL_TARGETS.items()}}


def model_target(row: dict, budget: float) -> tuple[float, str] | None:
    """A TARGET_GROUP model's own target at ``budget`` and the rule it comes from (the
    stricter of EACH_TARGET and MODEL_TARGETS), or None when it has none."""
    if row["group"] != TARGET_GROUP:
        return None
    found = []
    if budget in EACH_TARGET and (row.get("params_baseline") or 0) >= EACH_TARGET[budget][0]:
        found.append((EACH_TARGET[budget][1], f"every model >= {EACH_TARGET[budget][0] / 1e6:g} M parameters"))
    if (row["model"], budget) in MODEL_TARGETS:
        found.append((MODEL_TARGETS[row["model"], budget], "its own target"))
    return min(found) if found else None


def _above_target(rows: list[dict]) -> list[dict]:
    """TARGET_GROUP models above their own target, or with no plan where a target applies."""
    budgets = set(MEDIAN_TARGETS) | set(EACH_TARGET) | {b for _, b in MODEL_TARGETS}
    above = []
    for row in sorted(rows, key=lambda r: r["model"]):
        if row["group"] != TARGET_GROUP:
            continue
        for budget in sorted(budgets, reverse=True):
            ratio = row.get(RATIO_FIELDS[budget])
            target = model_target(row, budget)
            if ratio is None:
                above.append({"model": row["model"], "budget": budget, "ratio": None, "target": None,
                              "rule": "no plan", "why": f"{row['status']}: {row.get('reason') or ''}"})
            elif target is not None and ratio > target[0]:
                above.append({"model": row["model"], "budget": budget, "ratio": ratio, "target": target[0],
                              "rule": target[1], "why": row.get(WHY_FIELDS.get(budget, "")) or ""})
    return above


def _header(args) -> dict[str, Any]:
    import timm
    import torchvision
    return {"format": RESULTS_FORMAT, "torch": torch.__version__, "torchvision": torchvision.__version__,
            "timm": timm.__version__, "python": platform.python_version(),
            "settings": {"method": args.method, "method_options": METHOD_OPTIONS.get(args.method),
                         "check_batch": CHECK_BATCH, "check_sizes": list(CHECK_SIZES),
                         "absolute_tolerance": ABSOLUTE_TOLERANCE, "float32_error_factor": FLOAT32_ERROR_FACTOR,
                         "relative_tolerance": RELATIVE_TOLERANCE, "float64_max_params": FLOAT64_MAX_PARAMS,
                         "float64_tolerance": FLOAT64_TOLERANCE,
                         "layer_tolerance": LAYER_TOLERANCE,
                         "bounds": {str(b): v for b, v in BOUNDS.items()}, "init": "preserve", "tau": 1.0,
                         "targets": _targets(), "plans_only": args.plans_only,
                         "forward_path": "fast" if args.fast_path else "reference",
                         "threads_per_job": args.threads, "jobs": args.jobs}}


def print_table(rows: list[dict], summary: dict[str, Any], plans_only: bool = False) -> None:
    from rich.table import Table

    table = Table(title="kwconvert zoo: plans at b = 1, 1/2, 1/4 (--plans-only)" if plans_only else
                  "kwconvert zoo: plan, convert (init=preserve), forward at tau = 1, b = 1")
    columns = ("model", "status", "reason", "ratio b=1", "ratio b=1/2", "ratio b=1/4") + (
        ("plan s",) if plans_only else ("max |diff|", "plan+convert s"))
    for column in columns:
        table.add_column(column, justify="right" if column not in ("model", "status", "reason") else "left",
                         overflow="fold")
    style = {"pass": "green", "planned": "green", "refused": "yellow"}
    order = {g: i for i, g in enumerate(GROUPS)}
    for row in sorted(rows, key=lambda r: (order.get(r["group"], 9), r["model"])):
        cells = [_fmt(row.get("plan_s"), ".2f")] if plans_only else [
            _fmt(row.get("max_diff"), ".1e"), _fmt(row.get("plan_convert_s"), ".2f")]
        table.add_row(row["model"], f"[{style.get(row['status'], 'red')}]{row['status']}[/]", row.get("reason") or "",
                      _fmt(row.get("ratio_b1"), ".3f"), _fmt(row.get("ratio_b05"), ".3f"),
                      _fmt(row.get("ratio_b025"), ".3f"), *cells)
    console = _console()
    console.print(table)
    done = "planned" if plans_only else "pass"
    for group, counts in summary.items():
        others = ", ".join(f"{counts[s]} {s}" for s in STATUSES if s != done and counts[s])
        console.print(f"{group:12s} {counts[done]}/{counts['models']} {done}"
                      + ("" if plans_only else f" ({counts['pass_percent']}%)") + (f"; {others}" if others else ""))


def print_budget_report(report: dict[str, Any]) -> None:
    """The distribution per group and budget, then every model above its target with why."""
    from rich.table import Table

    table = Table(title=f"converted / baseline parameters per budget (targets: {TARGET_GROUP})")
    for column in ("group", "budget", "models", "min", "median", "max", "target", "met"):
        table.add_column(column, justify="left" if column == "group" else "right")
    for line in report["distribution"]:
        met = "" if line["met"] is None else "[green]yes[/]" if line["met"] else "[red]no[/]"
        table.add_row(line["group"], _budget(line["budget"]), f"{line['models']}/{line['of']}",
                      f"{line['min']:.3f}", f"{line['median']:.3f}", f"{line['max']:.3f}",
                      _fmt(line["target"], ".2f"), met)
    console = _console()
    console.print(table)
    above = report["above_target"]
    console.print(f"above target: {len(above) or 'none'}", markup=False)
    for item in above:
        if item["ratio"] is None:
            console.print(f"  {item['model']} b={_budget(item['budget'])}: no plan ({item['why']})", markup=False)
        else:
            console.print(f"  {item['model']} b={_budget(item['budget'])}: {item['ratio']:.3f} > "
                          f"{item['target']:.2f} ({item['rule']}): {item['why']}", markup=False)


def _budget(budget: float) -> str:
    return {1.0: "1", 0.5: "1/2", 0.25: "1/4"}.get(budget, f"{budget:g}")


def _console():
    from rich.console import Console
    return Console() if sys.stdout.isatty() else Console(width=200)  # a log keeps whole rows


def _fmt(value, spec: str) -> str:
    return "" if value is None else format(value, spec)


# =======================================================================================
# The timm sample
# =======================================================================================
#: Per timm module: the K smallest models, K = min(MAX_PER_MODULE, 2 + models // PER_EXTRA).
MIN_PER_MODULE, PER_EXTRA, MAX_PER_MODULE = 2, 50, 5


def make_timm_sample(path: Path = TIMM_SAMPLE) -> list[str]:
    """Draw the timm sample by the rule in its header (builds every model on the meta device)."""
    import timm
    chosen, lines, unbuildable = [], [], []
    modules = sorted(timm.list_modules())
    for module in modules:
        names = sorted(n for n in timm.list_models(module=module) if not n.startswith("test_"))
        sized = []
        for name in names:
            try:
                with warnings.catch_warnings(), torch.device("meta"):
                    warnings.simplefilter("ignore")
                    model = timm.create_model(name, pretrained=False)
                sized.append((sum(p.numel() for p in model.parameters()), name))
            except Exception:
                unbuildable.append(name)
        keep = min(MAX_PER_MODULE, MIN_PER_MODULE + len(names) // PER_EXTRA)
        for params, name in sorted(sized)[:keep]:
            chosen.append(name)
            lines.append(f"{name:48s} # {module}, {params / 1e6:.2f} M parameters")
    header = f"""\
# timm sample of benchmarks/zoo.py (issue 6), drawn by `benchmarks/zoo.py --make-timm-sample`.
#
# Rule: for every timm module (timm.list_modules(): one source file per architecture
# family, {len(modules)} in timm {timm.__version__}), list its models (timm.list_models(module=...),
# without the miniature "test_*" models), build each on the meta device to count its
# parameters, and keep the K with the fewest parameters (ties by name), where
# K = min({MAX_PER_MODULE}, {MIN_PER_MODULE} + models_in_module // {PER_EXTRA}): big families (vision_transformer,
# resnet, efficientnet, ...) get up to {MAX_PER_MODULE}.  Every family is in (CNNs, ViTs, hybrids,
# MLP-mixers, mobile nets); the smallest members keep the sweep affordable on a CPU.
# {len(unbuildable)} model(s) could not be built on the meta device and were not drawn.
#
# {len(chosen)} models; one per line: name  # module, parameters
"""
    path.write_text(header + "\n".join(lines) + "\n")
    return chosen


# =======================================================================================
# Command line
# =======================================================================================
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--subset", action="append", default=[], metavar="GLOB",
                        help="only models whose id (group:name, e.g. 'timm:vit*') matches; repeatable")
    parser.add_argument("--timm", action=argparse.BooleanOptionalAction, default=True,
                        help="include the timm sample (default: yes)")
    parser.add_argument("--failed", action="store_true", help="only models that did not pass in --out")
    parser.add_argument("--method", choices=("kernelwarehouse", *METHOD_RESULTS), default="kernelwarehouse",
                        help=f"conversion method (default kernelwarehouse); odconv converts at {ODCONV_KERNELS} kernels "
                             f"per layer, dynamic_conv at {DYNAMIC_CONV_KERNELS}; each writes results/zoo_<method>.json")
    parser.add_argument("--jobs", type=int, default=1, help="worker processes (default 1)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per worker (default 1)")
    parser.add_argument("--timeout", type=float, default=900, help="seconds per model (default 900; 0: none)")
    parser.add_argument("--fast-path", action="store_true",
                        help="run the KW forward on kwconvert's autotuned paths (default: the "
                             "straightforward path, cheaper for one forward)")
    parser.add_argument("--fresh", action="store_true", help="drop the rows of models not run this time")
    parser.add_argument("--plans-only", action="store_true",
                        help="plan at b = 1, 1/2, 1/4 only (no conversion, no forward; models built on the "
                             "meta device where they allow it) for the budget report; default --out "
                             "benchmarks/results/zoo_budgets.json")
    parser.add_argument("--out", type=Path, default=None,
                        help="results file (default benchmarks/results/zoo.json)")
    parser.add_argument("--make-timm-sample", action="store_true",
                        help=f"draw {TIMM_SAMPLE.name} again by its rule, then stop")
    args = parser.parse_args(argv)
    args.out = args.out or (BUDGET_RESULTS if args.plans_only else METHOD_RESULTS.get(args.method, RESULTS))
    done = "planned" if args.plans_only else "pass"
    if args.make_timm_sample:
        print(f"{len(make_timm_sample())} models written to {TIMM_SAMPLE}")
        return 0

    previous = json.loads(args.out.read_text()).get("per_model", []) if args.out.exists() else []
    cases = all_cases(with_timm=args.timm)
    if args.subset:
        cases = [c for c in cases if any(fnmatch.fnmatchcase(c.id, p) for p in args.subset)]
    if args.failed:
        failed = {r["model"] for r in previous if r["status"] not in ("pass", "planned")}
        cases = [c for c in cases if c.id in failed]
    if not cases:
        print("no model matches", file=sys.stderr)
        return 2

    rows = {} if args.fresh else {r["model"]: r for r in previous}
    header = _header(args)

    def record(row: dict) -> None:
        rows[row["model"]] = row
        per_model = sorted(rows.values(), key=lambda r: r["model"])
        write_json({**header, "summary": summarise(per_model), "budgets": budget_report(per_model),
                    "per_model": per_model}, args.out)

    signal.signal(signal.SIGTERM, signal.default_int_handler)  # kill -TERM stops the workers too
    try:
        sweep(cases, args.jobs, args.threads, args.timeout or None, args.fast_path, record, args.plans_only,
              args.method)
    except KeyboardInterrupt:
        print(f"interrupted; the models done so far are in {args.out}", file=sys.stderr)
        return 130
    ran = [rows[c.id] for c in cases]
    print_table(ran, summarise(ran), args.plans_only)
    if len(ran) < len(rows):
        print(f"all {len(rows)} models in {args.out}:")
        for group, counts in summarise(list(rows.values())).items():
            print(f"  {group:12s} {counts[done]}/{counts['models']} {done}")
    if args.method == "kernelwarehouse":  # the budget targets are KernelWarehouse's
        print_budget_report(budget_report(ran))
    if len(ran) < len(rows):
        print(f"the budget report above covers the {len(ran)} models run; {args.out} holds it over all {len(rows)}")
    print(f"written to {args.out}")
    return 0 if all(r["status"] == done for r in ran) else 1


if __name__ == "__main__":
    sys.exit(main())
