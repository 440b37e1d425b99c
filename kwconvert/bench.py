"""Time a converted model against its original on this machine (``kwconvert bench``).

Both models run in one process with their repetitions interleaved, the order alternating
every repetition, so load from other processes hits them alike: on a shared machine
absolute times drift by a fifth from minute to minute while the ratio holds.  A ratio is
the median of the per-repetition ratios (converted time over the original's time in the
same repetition), its spread their 25-75 % range.  Deep copies are timed, so the caller's models, their
weights and their train/eval mode are left as they were.
"""
from __future__ import annotations

import contextlib
import copy
import platform
import statistics
import time
from dataclasses import asdict, dataclass
from typing import Any, Callable, Iterable

import torch
from torch import nn

MODES = ("inference", "training")
#: Untimed calls per model and mode first: oneDNN primitives and kwconvert's path timing.
WARMUP = 2


@dataclass(frozen=True)
class SpeedRow:
    """One mode's timing: milliseconds per call (medians) and converted / original."""
    mode: str
    batch: int
    original_ms: float
    converted_ms: float
    ratio: float
    ratio_p25: float
    ratio_p75: float
    repetitions: int

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def make_step(model: nn.Module, mode: str, inputs: torch.Tensor, *,
              context: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext,
              labels: torch.Tensor | None = None) -> Callable[[], None]:
    """One call of ``mode`` on ``model`` (which it puts in eval or train mode).

    inference: a forward without autograd.  training: forward, loss, backward and an SGD
    step with momentum; the loss is cross-entropy against ``labels`` when given, else the
    mean of every floating output (any model's output, a detector's dict as well).
    """
    _check_mode(mode)
    if mode == "inference":
        model.eval()

        def infer() -> None:
            with context(), torch.no_grad():
                model(inputs)
        return infer
    model.train()
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-6, momentum=0.9)

    def train() -> None:
        with context():
            output = model(inputs)
            loss = (nn.functional.cross_entropy(output, labels) if labels is not None
                    else sum(leaf.float().mean() for leaf in _float_leaves(output)))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
    return train


def _check_mode(mode: str) -> None:
    if mode not in MODES:
        raise ValueError(f"mode must be one of {', '.join(MODES)}, got {mode!r}")


def _float_leaves(output: Any) -> Iterable[torch.Tensor]:
    if isinstance(output, torch.Tensor):
        if output.is_floating_point():
            yield output
    elif isinstance(output, dict):
        for value in output.values():
            yield from _float_leaves(value)
    elif isinstance(output, (list, tuple)):
        for value in output:
            yield from _float_leaves(value)


def interleaved(steps: dict[str, Callable[[], None]], repetitions: int,
                on_repetition: Callable[[int], None] | None = None) -> dict[str, list[float]]:
    """Seconds of each step per repetition, the order rotating every repetition."""
    times: dict[str, list[float]] = {key: [] for key in steps}
    order = list(steps)
    for rep in range(repetitions):
        for key in order[rep % len(order):] + order[:rep % len(order)]:
            start = time.perf_counter()
            steps[key]()
            times[key].append(time.perf_counter() - start)
        if on_repetition is not None:
            on_repetition(rep + 1)
    return times


def quartiles(values: list[float]) -> tuple[float, float]:
    """25th and 75th percentile, interpolated between neighbours (numpy's default)."""
    if len(values) == 1:
        return values[0], values[0]
    low, _, high = statistics.quantiles(values, n=4, method="inclusive")
    return low, high


def compare_speed(original: nn.Module, converted: nn.Module, inputs: torch.Tensor, *,
                  modes: Iterable[str] = MODES, repetitions: int = 7,
                  progress: Callable[[str, int, int], None] | None = None) -> list[SpeedRow]:
    """Time ``converted`` against ``original`` on ``inputs`` for each mode, interleaved.

    ``progress(mode, done, total)`` is called before the warm-up and after every repetition.
    """
    if repetitions < 1:
        raise ValueError(f"repetitions must be at least 1, got {repetitions}")
    modes = tuple(modes)
    for mode in modes:  # before any model is copied
        _check_mode(mode)
    rows = []
    for mode in modes:
        report = (lambda done, mode=mode: progress(mode, done, repetitions)) if progress else None
        if report:
            report(0)
        steps = {"original": make_step(copy.deepcopy(original), mode, inputs),
                 "converted": make_step(copy.deepcopy(converted), mode, inputs)}
        for step in steps.values():
            for _ in range(WARMUP):
                step()
        times = interleaved(steps, repetitions, report)
        rows.append(_row(mode, inputs.shape[0], times["original"], times["converted"]))
    return rows


def _row(mode: str, batch: int, original: list[float], converted: list[float]) -> SpeedRow:
    """The ratio is the median of the per-repetition ratios: each pairs two calls made side by
    side, so a slow minute of the machine cancels out of it."""
    ratios = [c / o for o, c in zip(original, converted)]
    low, high = quartiles(ratios)
    return SpeedRow(mode, batch, 1e3 * statistics.median(original), 1e3 * statistics.median(converted),
                    statistics.median(ratios), low, high, len(ratios))


def cpu_description() -> str:
    """The CPU's name, family and model (Linux), e.g. "AMD EPYC (family 25, model 17)":
    ratios differ between CPU generations, so a timing says which one ran it."""
    fields = {}
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            for line in cpuinfo:
                key, _, value = line.partition(":")
                fields.setdefault(key.strip(), value.strip())
    except OSError:
        return platform.processor() or platform.machine()
    return f"{fields.get('model name', platform.machine())} (family {fields.get('cpu family', '?')}, " \
           f"model {fields.get('model', '?')})"
