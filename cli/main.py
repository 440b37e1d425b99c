"""``kwconvert`` command line: parse, call the library, render.  No logic of its own.

Usage errors (bad model name, budget, input size, --module path) exit 2, other failures exit 1; each is
one line on stderr, with the traceback only under ``--debug``.
"""
from __future__ import annotations

import json
import os
import sys
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated, Iterator, Optional

import typer
from rich.console import Console
from rich.markup import escape
from typer.core import TyperGroup

try:  # typer vendors click: its ClickException derives from TyperException
    from typer import TyperException as ClickError
except ImportError:  # older typer, on click itself
    from click import ClickException as ClickError

from . import render

#: Output read by a program or kept in a log is as wide as this (rich's 80 would fold every
#: table); a terminal, or COLUMNS, sets its own width.
PIPED_WIDTH = 160


def _console(stderr: bool = False) -> Console:
    stream = sys.stderr if stderr else sys.stdout
    piped = not (hasattr(stream, "isatty") and stream.isatty()) and "COLUMNS" not in os.environ
    return Console(stderr=stderr, width=PIPED_WIDTH if piped else None)


out = _console()
err = _console(stderr=True)
COMMANDS = ("convert", "show", "export", "bench")


def _print_error(message: str) -> None:
    # escaped: a message may hold brackets ("install kwconvert[export]") that rich would take as markup
    err.print(f"[bold red]error:[/] {escape(message)}", highlight=False, soft_wrap=True)


class OneLineErrors(TyperGroup):
    """Click's own usage errors (unknown option, missing argument, malformed number) as one
    stderr line with exit code 2, like kwconvert's errors; help prints as usual."""

    def main(self, args=None, prog_name=None, complete_var=None, standalone_mode=True, **extra):
        if not standalone_mode:
            return super().main(args, prog_name, complete_var, standalone_mode=False, **extra)
        try:
            result = super().main(args, prog_name, complete_var, standalone_mode=False, **extra)
        except ClickError as error:
            if type(error).__name__ == "NoArgsIsHelpError":  # run bare: the help, not silence
                out.print(error.ctx.get_help(), markup=False, highlight=False)
                sys.exit(2)
            hint = f"; see '{error.ctx.command_path} --help'" if getattr(error, "ctx", None) else ""
            _print_error(error.format_message().strip().replace("\n", " ").rstrip(".") + hint)
            sys.exit(getattr(error, "exit_code", 2))
        except typer.Abort:
            _print_error("aborted")
            sys.exit(1)
        sys.exit(result if isinstance(result, int) else 0)


app = typer.Typer(add_completion=False, rich_markup_mode=None, no_args_is_help=True, pretty_exceptions_enable=False, cls=OneLineErrors,
                  context_settings={"help_option_names": ["-h", "--help"]},
                  help="Turn a PyTorch vision model into a KernelWarehouse dynamic-convolution model.")


def _print_version(wanted: bool) -> None:
    if wanted:
        from importlib.metadata import version
        out.print(f"kwconvert {version('kwconvert')}", highlight=False)
        raise typer.Exit()


@app.callback()
def _options(version: Annotated[Optional[bool], typer.Option(
        "--version", callback=_print_version, is_eager=True, help="print the version and exit")] = None) -> None:
    """Options before the command (``kwconvert --version``)."""


class Failure(Exception):
    """A failure already worded for the user; ``code`` is the exit code."""

    def __init__(self, message: str, code: int = 1):
        super().__init__(message)
        self.code = code


@contextmanager
def reported(debug: bool) -> Iterator[None]:
    """Turn library errors into one stderr line and an exit code (traceback with --debug)."""
    from kwconvert.models import CheckpointError, ModelSourceError
    from kwconvert.methods.kernelwarehouse.grouping import PatternError
    from kwconvert.trace import UnknownModuleError
    try:
        yield
    except typer.Exit:
        raise
    except Exception as error:  # every failure ends here, worded for the user
        if debug:
            raise
        code = 2 if isinstance(error, (ModelSourceError, PatternError, UnknownModuleError, UsageError)) else 1
        if isinstance(error, Failure):
            code = error.code
        message = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        if isinstance(error, (OSError, RuntimeError)) and not isinstance(error, Failure):
            message = f"{type(error).__name__}: {message}"
        if isinstance(error, CheckpointError):
            code = 1
        _print_error(message)
        raise typer.Exit(code) from None


class UsageError(ValueError):
    """Bad command-line input (exit code 2)."""


def _budget(text: str) -> float:
    from kwconvert.plan import parse_budget
    try:
        return parse_budget(text)
    except ValueError as error:
        raise UsageError(f"--budget: {error}") from None


def _input_size(text: Optional[str]) -> Optional[tuple[int, ...]]:
    if text is None:
        return None
    from kwconvert.models import parse_input_size
    try:
        return parse_input_size(text)
    except ValueError as error:
        raise UsageError(f"--input-size: {error}") from None


def _check_input_size(model, size: tuple[int, ...]) -> None:
    from kwconvert.models import check_input_size
    try:
        check_input_size(model, size)
    except ValueError as error:
        raise UsageError(f"--input-size: {error}") from None


def _writable_out(out_dir: Optional[Path], model: str, budget: float, method: str, force: bool) -> Path:
    """--out (or the default), checked before a conversion spends its seconds."""
    from kwconvert.io import SavedModelError, check_target
    from kwconvert.models import canonical_source
    from kwconvert.pipeline import default_out_dir
    try:
        return check_target(out_dir or default_out_dir(canonical_source(model), budget, method), replace=force)
    except SavedModelError as error:
        raise UsageError(f"--out: {error}") from None


def _device(text: str):
    from kwconvert.io import checked_device
    try:
        return checked_device(text)
    except ValueError as error:
        raise UsageError(f"--device: {error}") from None


def _key_value(flag: str, text: str) -> tuple[str, object]:
    from kwconvert.pipeline import parse_option
    try:
        return parse_option(text)
    except ValueError as error:
        raise UsageError(f"{flag}: {error}") from None


def _check_plan_options(options: dict, budget: float) -> None:
    from kwconvert.plan import check_options
    options = dict(options)
    try:
        check_options(options.pop("method", "kernelwarehouse"), budget, **options)
    except ValueError as error:
        raise UsageError(str(error)) from None


def _compared_at(method: str) -> str:
    """" at tau = 1 and 0": the temperatures the output check runs at (none for KernelDNA)."""
    from kwconvert.pipeline import COMPARED_TEMPERATURES
    temperatures = COMPARED_TEMPERATURES[method]
    symbol = "T" if method == "odconv" else "tau"
    return f" at {symbol} = {' and '.join(f'{t:g}' for t in temperatures)}" if len(temperatures) > 1 else ""


def _method_options(method: str, budget: Optional[str], kernels: Optional[int], calibration,
                    max_blocks_per_stage: Optional[int]) -> tuple[float, dict]:
    """The budget and plan options that ``--method`` / ``--budget`` / ``--kernels`` ask for,
    or a UsageError where they do not go together."""
    from kwconvert.methods import METHODS
    if method not in METHODS:
        raise UsageError(f"--method must be one of {', '.join(METHODS)}, got '{method}'")
    if method in ("kernelwarehouse", "dynamic_conv"):
        if kernels is not None:
            raise UsageError("--kernels is ODConv's (add --method odconv); KernelWarehouse and dynamic_conv take --budget")
        return _budget("1" if budget is None else budget), ({"method": method} if method != "kernelwarehouse" else {})
    name = {"odconv": "ODConv", "kerneldna": "KernelDNA"}[method]
    if budget is not None:
        raise UsageError(f"--budget is KernelWarehouse's; {name} takes " + (
            "--kernels N (the authors' 1x, 4x)" if method == "odconv" else "no budget (-O share=..., children_per_parent=N)"))
    if kernels is not None and method != "odconv":
        raise UsageError("--kernels is ODConv's; KernelDNA shares its parents' kernels")
    for flag, value in (("--calibration", calibration), ("--max-blocks-per-stage", max_blocks_per_stage)):
        if value is not None:
            raise UsageError(f"{flag} is a KernelWarehouse option; {name} does not take it")
    if method == "kerneldna":
        return 1.0, {"method": "kerneldna"}
    return float(kernels or 1), {"method": "odconv", "kernels": kernels or 1}


@app.command()
def convert(
    model: Annotated[str, typer.Argument(help="torchvision name (resnet50), timm:NAME, or pkg.module:callable")],
    budget: Annotated[Optional[str], typer.Option("--budget", "-b", help="warehouse budget b = n / m_t, any b > 0: 0.5, 1/2, 0.4, 1, 4 [default: 1]")] = None,
    method: Annotated[str, typer.Option(help="kernelwarehouse; dynamic_conv (DY-Conv: n = --budget kernels per layer); odconv (ODConv, with --kernels); kerneldna (KernelDNA: children of parent kernels, -O share=...)")] = "kernelwarehouse",
    kernels: Annotated[Optional[int], typer.Option(min=1, help="odconv: kernels per layer, the authors' 1x / 4x [default: 1]")] = None,
    out_dir: Annotated[Optional[Path], typer.Option("--out", "-o", help="output directory [default: ./kwconvert-out/<model>-b<budget>/]")] = None,
    weights: Annotated[Optional[Path], typer.Option(help="checkpoint for the base model: .safetensors, or a .pt/.pth state dict")] = None,
    input_size: Annotated[Optional[str], typer.Option(help="one sample's input size C,H,W (C,L / C,T,H,W for Conv1d / Conv3d models) [default: the model's own, else 3,224,224]")] = None,
    init: Annotated[str, typer.Option(help="preserve (cells from the model's kernels) or random (paper's from-scratch init)")] = "preserve",
    calibration: Annotated[Optional[Path], typer.Option(metavar="FILE", help="inputs (N x C x H x W, .safetensors or a torch.save tensor) on which the cells below b = 1 are fitted to the layers' outputs instead of their kernels")] = None,
    max_blocks_per_stage: Annotated[Optional[int], typer.Option(min=1, help="cut long stages into warehouses of at most N residual blocks")] = None,
    exclude: Annotated[Optional[list[str]], typer.Option(help="glob of layer names to keep static (repeatable)")] = None,
    include: Annotated[Optional[list[str]], typer.Option(help="glob of layer names that may be converted (repeatable)")] = None,
    module: Annotated[Optional[str], typer.Option("--module", metavar="PATH", help="convert only this sub-module (e.g. backbone.body), traced on the input it receives in one forward of the whole model")] = None,
    model_arg: Annotated[Optional[list[str]], typer.Option("--model-arg", "-M", help="argument of the model's constructor as KEY=VALUE, e.g. num_classes=10 (repeatable; saved, so load rebuilds the same model)")] = None,
    option: Annotated[Optional[list[str]], typer.Option("--option", "-O", help="any plan option as KEY=VALUE, e.g. stem=warehouse (repeatable; see README 'Plan options')")] = None,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="plan only: print the tables, convert nothing")] = False,
    report: Annotated[Optional[Path], typer.Option("--report", metavar="FILE.html", help="write the plan as one self-contained HTML page: layers in execution order coloured by warehouse, the tables, parameters against the budget from 1/4 to 4")] = None,
    force: Annotated[bool, typer.Option("--force", help="replace a kwconvert save already at --out")] = False,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="print nothing but errors (and --json's output)")] = False,
    json_output: Annotated[bool, typer.Option("--json", help="print only JSON on stdout: the plan, and once converted where it saved and the output check")] = False,
    device: Annotated[str, typer.Option(help="device to build, trace and convert the model on: cpu, cuda, cuda:1, meta (with --dry-run: plans without allocating weights)")] = "cpu",
    debug: Annotated[bool, typer.Option("--debug", help="show tracebacks")] = False,
) -> None:
    """Plan, convert and save MODEL (or only plan it with --dry-run)."""
    with reported(debug):
        from kwconvert.pipeline import Conversion
        if init not in ("preserve", "random"):
            raise UsageError(f"--init must be preserve or random, got '{init}'")
        if calibration is not None and init != "preserve":
            raise UsageError("--calibration fits the cells to the model's outputs: it needs --init preserve")
        if calibration is not None and not calibration.is_file():
            raise UsageError(f"--calibration: {calibration} " + ("is not a file" if calibration.exists() else "does not exist"))
        budget_value, method_options = _method_options(method, budget, kernels, calibration, max_blocks_per_stage)
        on_device = _device(device)
        if on_device.type == "meta" and not dry_run:
            raise UsageError("--device meta holds no weights to convert or save: add --dry-run, or pick cpu / cuda")
        if not dry_run:
            out_dir = _writable_out(out_dir, model, budget_value, method, force)
        if report is not None and not report.parent.is_dir():
            raise UsageError(f"--report: {report.parent} is not a directory")
        options = {"max_blocks_per_stage": max_blocks_per_stage,
                   "exclude": tuple(exclude or ()), "include": tuple(include or ())}
        options = {k: v for k, v in options.items() if v not in (None, ())}
        options.update(method_options)
        options.update(_key_value("--option", text) for text in option or ())
        _check_plan_options(options, budget_value)
        job = Conversion(model, budget_value, input_size=_input_size(input_size), weights=weights,
                         init=init, plan_options=options, module=module, device=on_device, calibration=calibration,
                         model_args=dict(_key_value("--model-arg", text) for text in model_arg or ()))
        with render.progress(err, enabled=not quiet) as step:
            step("building the model")
            job.build()
            if input_size is not None:
                _check_input_size(job.model, job.input_size)
            step("tracing and planning")
            job.make_plan()
            if not dry_run:
                step("converting" + (", fitting cells to the outputs on the calibration inputs" if calibration else ""))
                job.convert()
                if init == "preserve":
                    step("comparing outputs and each converted layer with the original" + _compared_at(method))
                    job.compare()
                step("saving")
                job.save(out_dir)
            if report is not None:
                step("planning at budgets 1/4 to 4 for the report")
                job.report(report)
        if json_output:
            print(json.dumps(render.result(job), indent=2))
        elif quiet:
            pass
        elif dry_run:
            out.print(job.plan.table())
        else:
            out.print(render.summary(job))
        if report is not None and not (quiet or json_output):
            out.print(f"report: {report}", markup=False, highlight=False, soft_wrap=True)


@app.command()
def show(
    directory: Annotated[Path, typer.Argument(help="a directory written by kwconvert")],
    json_output: Annotated[bool, typer.Option("--json", help="print only the plan JSON")] = False,
    debug: Annotated[bool, typer.Option("--debug", help="show tracebacks")] = False,
) -> None:
    """Print a saved model's origin, temperatures and fit error, and its plan tables."""
    with reported(debug):
        from kwconvert.io import check_saved
        from kwconvert.plan import Plan
        meta = check_saved(directory)
        plan = Plan.from_dict(meta["plan"])
        if json_output:
            print(plan.to_json())
        else:
            out.print(render.saved(directory, meta, plan))
            out.print(plan.table())


@app.command("export")
def export_saved(
    directory: Annotated[Path, typer.Argument(help="a directory written by kwconvert")],
    format: Annotated[str, typer.Option("--format", "-f", help="onnx, or torch_export (a .pt2 of torch.export.save)")] = "onnx",
    out_file: Annotated[Optional[Path], typer.Option("--out", "-o", help="file to write (default: DIR.onnx or DIR.pt2 beside DIR)")] = None,
    batch: Annotated[int, typer.Option(min=1, help="batch of the example input that is traced; the exported batch stays dynamic")] = 2,
    opset: Annotated[int, typer.Option(help="ONNX opset, 18 or newer")] = 18,
    temperature: Annotated[Optional[float], typer.Option(help="temperature to export at: KernelWarehouse's CAF tau, 0 to 1, or ODConv's T > 0 (default: the temperatures saved with the model)")] = None,
    device: Annotated[str, typer.Option(help="device to load the model on and trace it: cpu, cuda, cuda:1, ...")] = "cpu",
    base_model: Annotated[Optional[str], typer.Option("--model", metavar="MODEL", help="the unconverted model (as for convert) when the save records no source")] = None,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="print nothing but errors")] = False,
    debug: Annotated[bool, typer.Option("--debug", help="show tracebacks")] = False,
) -> None:
    """Export a saved model to ONNX or torch.export with a dynamic batch, checked against eager."""
    with reported(debug):
        from kwconvert.export import FORMATS, MIN_OPSET, example_input_for, export, require_onnx
        from kwconvert.io import load, read_metadata
        from kwconvert.pipeline import set_temperatures
        if format not in FORMATS:
            raise UsageError(f"--format must be one of {', '.join(FORMATS)}, got '{format}'")
        if format == "onnx" and opset < MIN_OPSET:
            raise UsageError(f"--opset must be {MIN_OPSET} or newer (torch's ONNX exporter writes no older), "
                             f"got {opset}")
        meta = read_metadata(directory)
        odconv = meta.get("plan", {}).get("method") == "odconv"
        if temperature is not None and not (temperature > 0 if odconv else 0.0 <= temperature <= 1.0):
            raise UsageError(f"--temperature must be positive (ODConv's T), got {temperature:g}" if odconv else
                             f"--temperature must lie in [0, 1], got {temperature:g}")
        target_device = _device(device)
        if format == "onnx":
            require_onnx()
        input_size = meta.get("input_size")
        base = None
        if base_model is not None:
            from kwconvert.models import build_model
            base = build_model(base_model)
        target = out_file or directory.resolve().with_name(directory.resolve().name + FORMATS[format])
        with render.progress(err, enabled=not quiet) as step:
            step("loading the saved model")
            model = load(directory, base, device=target_device)
            if temperature is not None:
                set_temperatures(model, temperature)
            step(f"exporting to {format} and checking it against eager")
            report = export(model, target, format, example_input_for(model, batch, input_size), opset=opset)
        if quiet:
            return
        checked = "onnxruntime" if format == "onnx" else "torch.export.load"
        diffs = ", ".join(f"{diff:.2g} at batch {size}" for size, diff in report.max_abs_diff.items())
        opset_note = f", opset {report.opset}" if report.opset else ""
        tau = f"{report.temperature:g}" if report.temperature is not None else "mixed"
        out.print(f"wrote {report.path} ({format}{opset_note}, dynamic batch, tau = {tau})", markup=False,
                  highlight=False, soft_wrap=True)
        out.print(f"max |{checked} - eager|: {diffs}", markup=False, highlight=False, soft_wrap=True)


@app.command()
def bench(
    target: Annotated[str, typer.Argument(metavar="DIR|MODEL", help="a directory written by kwconvert, or a model as for convert (converted at --budget first)")],
    budget: Annotated[Optional[str], typer.Option("--budget", "-b", help="budget to convert MODEL at [default: 1]; a DIR is already converted")] = None,
    method: Annotated[str, typer.Option(help="method to convert MODEL with, as for convert")] = "kernelwarehouse",
    kernels: Annotated[Optional[int], typer.Option(min=1, help="odconv: kernels per layer [default: 1]")] = None,
    batch: Annotated[int, typer.Option(min=1, help="batch size of the timed calls")] = 16,
    mode: Annotated[Optional[list[str]], typer.Option("--mode", help="inference (eval, no grad) or training (forward, backward, SGD step); repeatable [default: both]")] = None,
    repetitions: Annotated[int, typer.Option("--reps", min=1, help="timed calls per model and mode, interleaved")] = 7,
    threads: Annotated[Optional[int], typer.Option(min=1, help="torch threads [default: torch's]")] = None,
    input_size: Annotated[Optional[str], typer.Option(help="one sample's input size C,H,W [default: the save's, else the model's own]")] = None,
    base_model: Annotated[Optional[str], typer.Option("--model", metavar="MODEL", help="the unconverted model (as for convert) when the save records no source")] = None,
    model_arg: Annotated[Optional[list[str]], typer.Option("--model-arg", "-M", help="argument of MODEL's constructor as KEY=VALUE (repeatable)")] = None,
    half_warehouses: Annotated[bool, typer.Option("--half-warehouses", help="serve the KW model's inference from float16 warehouse copies (kwconvert.half_warehouses: refused when its outputs move by more than 1e-3 of their scale)")] = False,
    json_output: Annotated[bool, typer.Option("--json", help="print only JSON on stdout")] = False,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="print nothing but errors (and --json's output)")] = False,
    debug: Annotated[bool, typer.Option("--debug", help="show tracebacks")] = False,
) -> None:
    """Time a converted model against its original on this machine, interleaved in one process."""
    with reported(debug):
        import torch

        from kwconvert.bench import MODES, compare_speed, cpu_description
        modes = tuple(dict.fromkeys(mode or MODES))
        for name in modes:
            if name not in MODES:
                raise UsageError(f"--mode must be {' or '.join(MODES)}, got '{name}'")
        if threads is not None:
            torch.set_num_threads(threads)
        size = _input_size(input_size)
        args = dict(_key_value("--model-arg", text) for text in model_arg or ())
        with render.progress(err, enabled=not quiet) as step:
            if Path(target).is_dir():
                given = [flag for flag, value in (("--budget", budget), ("--kernels", kernels),
                                                  ("--method", method != "kernelwarehouse" or None)) if value is not None]
                if given:
                    raise UsageError(f"{given[0]} applies to a MODEL; {target} is a saved model, already converted")
                step("loading the saved model and building its original")
                original, converted, size = _saved_pair(Path(target), base_model, args, size)
            else:
                step("building and converting the model")
                budget_value, options = _method_options(method, budget, kernels, None, None)
                original, converted, size = _converted_pair(target, budget_value, options, args, size)
            inputs = torch.randn(batch, *size, generator=torch.Generator().manual_seed(0))
            error = None
            if half_warehouses:
                from kwconvert import half_warehouses as serve_half
                step("measuring float16 warehouses against float32")
                error = serve_half(converted.eval(), inputs)
            rows = compare_speed(original, converted, inputs, modes=modes, repetitions=repetitions,
                                 progress=lambda name, done, total: step(f"timing {name}, interleaved", done, total))
        from kwconvert.rewrite import plan_of
        plan = plan_of(converted)
        result = {"model": plan.model, "setting": plan.setting, "method": plan.method, "budget": plan.budget,
                  "input_size": list(size), "batch": batch,
                  "threads": torch.get_num_threads(), "cpu": cpu_description(), "torch": torch.__version__,
                  "rows": [row.to_dict() for row in rows]}
        if half_warehouses:
            result["half_warehouses_error"] = error
        if json_output:
            print(json.dumps(result, indent=2))
        elif not quiet:
            out.print(render.speed(result))


def _saved_pair(directory: Path, base_model: Optional[str], model_args: dict, size):
    """(original, converted, input size) of a save: the original rebuilt from its source."""
    from kwconvert.io import load, read_metadata
    from kwconvert.models import build_model, default_input_size
    meta = read_metadata(directory)
    source = base_model or meta.get("source")
    if not source:
        raise UsageError(f"{directory} records no model source: pass the unconverted model with --model MODEL")
    model_args = model_args or meta.get("model_args") or {}
    original = build_model(source, **model_args).eval()
    converted = load(directory, build_model(source, **model_args))
    return original, converted, tuple(size or meta.get("input_size") or default_input_size(original))


def _converted_pair(source: str, budget: float, plan_options: dict, model_args: dict, size):
    """(original, converted, input size) of MODEL at ``budget``; random cells, as the weights
    do not change the speed (a least-squares fit at b < 1 would only cost time)."""
    from kwconvert.pipeline import Conversion
    job = Conversion(source, budget, input_size=size, init="random", plan_options=plan_options,
                     model_args=model_args)
    job.build()
    if size is not None:
        _check_input_size(job.model, size)
    job.make_plan()
    return job.model, job.convert(), job.input_size


def run() -> None:
    """Console-script entry: ``kwconvert MODEL ...`` means ``kwconvert convert MODEL ...``."""
    args = sys.argv[1:]
    if args and args[0] not in COMMANDS and args[0] not in ("--help", "-h", "--version"):
        sys.argv.insert(1, "convert")
    app()


if __name__ == "__main__":
    run()
