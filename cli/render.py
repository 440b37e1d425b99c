"""What the command line shows: a progress display and the conversion summary."""
from __future__ import annotations

import threading
import time
from contextlib import contextmanager
from typing import Callable, Iterator

from rich.console import Console, Group
from rich.progress import BarColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn
from rich.table import Table
from rich.text import Text

from kwconvert.methods import DERIVED_METHODS
from kwconvert.pipeline import LAYER_TOLERANCE
from kwconvert.formatting import count


#: Off a terminal (a log), a step running this long gets a line, and another this often.
LOG_AFTER_SECONDS = 10.0


@contextmanager
def progress(console: Console, enabled: bool = True) -> Iterator[Callable[..., None]]:
    """Say on stderr which step runs; ``step(text)`` starts the next one, and
    ``step(text, done, total)`` reports how far a counted step has come.

    On a terminal: a transient spinner with the elapsed time, and a bar for counted steps.
    Elsewhere (a log, a CI job): plain lines, only for steps that run longer than
    ``LOG_AFTER_SECONDS`` (one when it passes that, one every that many seconds more, one
    when it ends), so a log is never silent for long while a quick run, or a quick failure,
    prints nothing but its result; a counted step is one step there.
    """
    if not enabled:
        yield lambda text, done=None, total=None: None
    elif console.is_terminal:
        columns = (SpinnerColumn(), TextColumn("{task.description}"), BarColumn(), TextColumn("{task.fields[count]}"),
                   TimeElapsedColumn())
        with Progress(*columns, console=console, transient=True) as bar:
            task = bar.add_task("starting", total=None, count="")

            def step(text: str, done: int | None = None, total: int | None = None) -> None:
                bar.update(task, description=text, completed=done or 0, total=total,
                           count=f"{done or 0}/{total}" if total else "")
            yield step
    else:
        with _LogProgress(console) as log:
            yield lambda text, done=None, total=None: log.step(text) if not done else None


class _LogProgress:
    """Progress lines for a log: a watcher thread prints for the steps that run long."""

    def __init__(self, console: Console, every: float | None = None):
        self.console, self.every = console, every or LOG_AFTER_SECONDS
        self.lock, self.wake = threading.Lock(), threading.Event()
        self.started = time.monotonic()
        self.text: str | None = None
        self.step_started, self.reported = self.started, False
        self.watcher = threading.Thread(target=self._watch, daemon=True)

    def __enter__(self) -> "_LogProgress":
        self.watcher.start()
        return self

    def __exit__(self, *exc) -> None:
        with self.lock:
            if exc[0] is None:
                self._finish()
            self.text = None
        self.wake.set()
        self.watcher.join()

    def step(self, text: str) -> None:
        with self.lock:
            self._finish()
            self.text, self.step_started, self.reported = text, time.monotonic(), False

    def _finish(self) -> None:
        if self.text is not None and self.reported:
            self._line(f"{self.text}: done in {time.monotonic() - self.step_started:.0f} s")

    def _watch(self) -> None:
        while not self.wake.wait(self.every):
            with self.lock:
                if self.text is not None and time.monotonic() - self.step_started >= self.every:
                    self._line(f"{self.text}: {time.monotonic() - self.step_started:.0f} s so far")
                    self.reported = True

    def _line(self, message: str) -> None:
        self.console.print(f"kwconvert [{time.monotonic() - self.started:5.0f} s] {message}", markup=False,
                           highlight=False, soft_wrap=True)


def summary(job) -> Group:
    """Params before and after, warehouses, output check, where it saved, how to load it."""
    plan = job.result_plan
    table = Table(title=f"kwconvert {plan.model} {plan.setting}", show_header=False)
    table.add_column("what", style="bold")
    table.add_column("value")
    ratio = plan.params_converted / plan.params_baseline
    table.add_row("parameters", f"{plan.params_baseline:,} -> {plan.params_converted:,} ({ratio:.2f}x)")
    if plan.layers:
        table.add_row("layers", f"{count(len(plan.layers), plan.method + ' layer')}; "
                                f"{count(len(plan.plain), 'layer')} kept static")
    else:
        table.add_row("warehouses", f"{len(plan.warehouses)} holding {count(len(plan.converted_layers), 'layer')}; "
                                    f"{count(len(plan.plain), 'layer')} kept static")
    derived = plan.method in DERIVED_METHODS  # KernelDNA: no temperature
    symbol = "T" if plan.layers else "tau"
    if job.max_abs_diff is not None:
        for tau, diff in sorted(job.diff_at_temperature.items(), reverse=True):
            relative = diff / job.output_scale if job.output_scale and diff is not None else 0.0
            label, when = ("", "") if derived else (f" at {symbol} = {tau:g}", f" ({_when(plan, tau)})")
            table.add_row(f"max |output diff|{label}", f"{diff:.3g} = {relative:.2g} of max |output|{when}")
        if job.output_too_small:
            table.add_row("outputs", f"too small to compare (max |output| {job.output_scale:.2g}): "
                                     "the per-layer check below is the check")
        fitted_to = ("layers' outputs on the calibration inputs" if any(w.output_error is not None for w in plan.warehouses)
                     else "kernels")
        if derived:
            table.add_row("function", _derived_function(plan))
        else:
            table.add_row("function", "the original's at every temperature" if plan.budget >= 1 else
                          f"a least-squares fit of the original's {fitted_to} at every temperature: "
                          "fine-tune to recover")
    for tau, (layer, relative) in sorted(job.layer_diff_at_temperature.items(), reverse=True):
        if layer is not None:
            table.add_row("each exact layer vs its original" + ("" if derived else f" at {symbol} = {tau:g}"),
                          f"at most {relative:.2g} of its max |output| ({layer}; bound {LAYER_TOLERANCE:g})")
    if job.not_comparable:  # e.g. a detector's boxes: each model may find a different number
        table.add_row("outputs not comparable", f"{len(job.not_comparable)} tensor(s) differ in shape or "
                                                f"structure (first: {job.not_comparable[0]})")
    _add_fit_error(table, plan)
    table.add_row("saved to", str(job.saved_to))
    load = (f"import kwconvert\nmodel = kwconvert.load({str(job.saved_to)!r})")
    return Group(table, "Load it with:", load)


def _when(plan, temperature: float) -> str:
    """What a compared temperature means for the plan's method."""
    if plan.layers:  # ODConv: T = 1 after the warm-up and in service, 30 where training from scratch starts
        return "as served" if temperature == 1 else "where training from scratch starts"
    return "where training starts" if temperature == 1 else "as served" if temperature == 0 else "in training"


def result(job) -> dict:
    """``--json``: the plan's JSON, and after a conversion a ``conversion`` entry saying where
    it saved and what the output check found (max |diff| per temperature, the output scale)."""
    data = job.result_plan.to_dict()
    if job.saved_to is not None:
        data["conversion"] = {
            "saved_to": str(job.saved_to),
            "max_abs_diff": {f"{tau:g}": diff for tau, diff in sorted(job.diff_at_temperature.items(), reverse=True)},
            "output_scale": job.output_scale,
            "output_too_small": job.output_too_small,
            "not_comparable": list(job.not_comparable),
            "layer_diff": {f"{tau:g}": {"layer": layer, "relative": relative}
                           for tau, (layer, relative) in sorted(job.layer_diff_at_temperature.items(), reverse=True)},
        }
    return data


def saved(directory, meta: dict, plan) -> Table:
    """What ``kwconvert show`` tells of a save beyond its plan: where it came from, the
    temperatures its layers run at, the fit error of b < 1, the versions that wrote it."""
    table = Table(title=f"{directory}: {plan.model} {plan.setting}", show_header=False)
    table.add_column("what", style="bold")
    table.add_column("value")
    table.add_row("source", meta.get("source") or "not recorded: load(dir, model=...) needs the unconverted model")
    if meta.get("input_size"):
        table.add_row("input size", ",".join(str(size) for size in meta["input_size"]))
    table.add_row("temperatures", _temperatures(meta.get("temperatures") or {}, plan))
    _add_fit_error(table, plan)
    paths = meta.get("paths")
    if isinstance(paths, dict) and paths:
        table.add_row("timed paths", f"{count(len(paths), 'layer')} (kwconvert.tune): served without timing")
    half = meta.get("half_warehouses")
    if isinstance(half, list) and half:
        table.add_row("warehouses", f"{count(len(half), 'warehouse')} served from float16 copies in inference "
                                    "(kwconvert.half_warehouses)")
    versions = meta.get("versions") or {}
    table.add_row("written by", ", ".join(f"{name} {version}" for name, version in versions.items()))
    return table


def _temperatures(taus: dict[str, float], plan) -> str:
    values = sorted(set(taus.values()))
    if not values:
        return "none recorded"
    symbol = "T" if plan.layers else "tau"
    where = f"{values[0]:g}: {_when(plan, values[0])}" if len(values) == 1 and (
        values[0] in (0.0, 1.0) or plan.layers) else None
    if len(values) == 1:
        return f"{symbol} = {where or f'{values[0]:g}'} (all {count(len(taus), 'layer')})"
    return f"{symbol} from {values[0]:g} to {values[-1]:g} over {count(len(taus), 'layer')}"


def _derived_function(plan) -> str:
    """What a KernelDNA conversion keeps of the original: the parents exactly, or (their
    kernels fitted with the children's, option fit_parent) a joint fit of both."""
    if any(static.fit_error for static in plan.plain):
        return ("each parent's and child's kernel a joint least-squares fit of the trained ones (errors below): "
                "fine-tune to recover")
    return ("the parents' exactly; each child's kernel a least-squares fit from its parent (errors below): "
            "fine-tune to recover")


def _add_fit_error(table: Table, plan) -> None:
    for label, errors in (("kernel fit error (b < 1)", [w.init_error for w in plan.warehouses if w.init_error]),
                          ("output fit error (calibration)", [w.output_error for w in plan.warehouses
                                                               if w.output_error is not None]),
                          ("parent kernel fit error (KernelDNA)", [s.fit_error for s in plan.plain
                                                                   if s.fit_error is not None]),
                          ("child kernel fit error (KernelDNA)", [l.fit_error for l in plan.layers
                                                                  if l.fit_error is not None])):
        if errors:
            table.add_row(label, f"{min(errors):.3f} .. {max(errors):.3f} relative")


def speed(result: dict) -> Group:
    """``kwconvert bench``: milliseconds per call of each model and their ratio, per mode."""
    title = Text(f"{result['model']} {result['setting']}, converted / original: batch {result['batch']}, "
                 f"input {'x'.join(map(str, result['input_size']))}", style="italic")
    table = Table()
    for column in ("mode", "original ms", "converted ms", "ratio", "25-75 %"):
        table.add_column(column, justify="left" if column == "mode" else "right")
    for row in result["rows"]:
        table.add_row(row["mode"], f"{row['original_ms']:.1f}", f"{row['converted_ms']:.1f}",
                      f"{row['ratio']:.2f}x", f"{row['ratio_p25']:.2f}-{row['ratio_p75']:.2f}")
    where = (f"{result['cpu']}, {count(result['threads'], 'thread')}, torch {result['torch']}; medians of "
             f"{count(result['rows'][0]['repetitions'], 'repetition')}, interleaved in one process")
    if result.get("half_warehouses_error") is not None:
        where += (f"; inference from float16 warehouses (outputs moved by {result['half_warehouses_error']:.1e} "
                  f"of their scale; training reads float32)")
    return Group(title, table, Text(where))
