"""Export a model, converted or not, to ``torch.export`` (.pt2) or ONNX with a dynamic batch.

A KernelWarehouse layer convolves every sample with its own kernel, rebuilt from the
warehouse by that sample's attention (paper Sec. 3.2).

* ``torch.export`` (.pt2) traces the fast CPU paths of :mod:`kwconvert.methods.kernelwarehouse.paths` as they are: the
  compiled kernel is a set of registered operators (``torch.ops.kwconvert.conv``,
  ``depthwise``, ``mix``, ``im2col``) with shape-only fake implementations, and under tracing every
  layer takes a path without a Python loop over the batch, so the batch stays dynamic.
  Loading such a program needs ``import kwconvert`` first (it registers the operators);
  where the kernel is not built, the operators compute the same in PyTorch ops.
* ONNX has no such operators, and the straightforward path (``reference_path()``) folds
  the batch into the convolution's groups, so ONNX's ``Conv`` would need a ``group``
  attribute that depends on the batch, which ONNX attributes cannot (the exporter stops
  with "Unsupported attribute type").  ``export_path(model)`` (``use_path("im2col")``)
  therefore runs the convolutions as im2col and one batched matrix product:
  ``Tensor.unfold`` cuts the windows of the padded input, and each sample's columns are
  multiplied by that sample's kernel (``Gather``, ``Transpose``, ``Reshape`` and ``MatMul``
  in ONNX).  No op attribute depends on the batch, and the arithmetic is the same as
  eager's to float rounding.  The assembly ``w_i = sum_j alpha_ij e_j`` and KWLinear
  already are batched matrix products on the reference path, which the block selects.

``export`` traces the model in eval mode at its current temperature (a plain float, so
it is baked into the graph), writes the file atomically, then loads what it wrote and
compares it with the eager model at batch 1 and 4 before putting it in place.
"""
from __future__ import annotations

import contextlib
import io
import itertools
import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Sequence

import torch
from torch import Tensor, nn

from . import execution, methods
from .files import atomic_file
from .formatting import dims
from .models import default_input_size
from .rewrite import PLAN_ATTR

__all__ = ["CHECK_BATCHES", "DEFAULT_OPSET", "FORMATS", "MIN_OPSET", "ExportError", "ExportReport",
           "MissingExportPackages", "example_input_for", "export", "export_path"]

#: Formats ``export`` writes, with their usual file suffix.
FORMATS = {"onnx": ".onnx", "torch_export": ".pt2"}
#: Oldest ONNX opset written: torch's exporter has no translations below 18 and cannot
#: convert its output down to 17 (see the README, "Export").
MIN_OPSET = 18
#: The opset ``export`` writes unless told.
DEFAULT_OPSET = 18
#: Batch sizes the written file is compared with eager at (dynamic batch).
CHECK_BATCHES = (1, 4)
#: Protobuf cannot hold an ONNX file over 2 GiB without external data.
_ONNX_LIMIT_BYTES = 2**31


class ExportError(Exception):
    """An export that cannot be done or did not reproduce the eager model."""


class MissingExportPackages(ExportError, ImportError):
    """onnx / onnxscript / onnxruntime are not installed."""


@dataclass(frozen=True)
class ExportReport:
    """What ``export`` wrote and how close the written file came to eager."""
    path: Path
    format: str
    example_shape: tuple[int, ...]
    dynamic_batch: bool
    opset: int | None
    temperature: float | None
    max_abs_diff: dict[int, float]  # batch size -> max |file - eager| (empty without check)


# --- the export-friendly formulation -------------------------------------------------------


def export_path(model: nn.Module) -> contextlib.AbstractContextManager:
    """Run ``model``'s KW layers on the export-friendly formulation inside the block.

    The straightforward path (batched-matmul assembly, bmm for KWLinear) with each KW
    convolution's per-sample convolution as im2col and one batched matrix product
    (``use_path("im2col")``, ``_KWConvNd._im2col_conv``).  Use it to call
    ``torch.onnx.export`` or ``torch.jit.trace`` directly (``torch.export`` needs no switch).
    ``model`` is taken for symmetry with ``export``; the switch holds in this thread only,
    like ``use_path``.
    """
    del model
    return execution.use_path("im2col")


# --- the example input ----------------------------------------------------------------------


def example_input_for(model: nn.Module, batch: int = 2, input_size: Sequence[int] | None = None) -> Tensor:
    """A seeded random batch of ``input_size``, else the size the plan recorded, else the
    model's default (``kwconvert.models.default_input_size``)."""
    if input_size is None:
        plan = getattr(model, PLAN_ATTR, None)
        input_size = plan.input_size if plan is not None and plan.input_size else default_input_size(model)
    parameter = next(model.parameters(), None)
    dtype = parameter.dtype if parameter is not None and parameter.is_floating_point() else torch.float32
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(batch, *input_size, generator=generator, dtype=dtype)
    return x.to(parameter.device) if parameter is not None else x


def _check_inputs(x: Tensor, batch: int) -> Tensor:
    """``batch`` samples shaped like one of ``x``: seeded noise for floats, else x's rows again."""
    if x.is_floating_point():
        generator = torch.Generator().manual_seed(1234 + batch)
        return torch.randn(batch, *x.shape[1:], generator=generator, dtype=x.dtype).to(x.device)
    return x[torch.arange(batch, device=x.device) % x.shape[0]]


# --- export ---------------------------------------------------------------------------------


def export(model: nn.Module, path: str | os.PathLike, format: str = "onnx", example_input: Tensor | None = None,
           *, opset: int = DEFAULT_OPSET, dynamic_batch: bool = True, check: bool = True,
           tolerance: float = 1e-4) -> ExportReport:
    """Write ``model`` to ``path`` as ONNX or a ``torch.export`` program (.pt2).

    The model runs in eval mode at its current temperature (set it first with
    ``kwconvert.set_temperature``); its training flags are restored afterwards.  The
    example input is a random batch of the plan's recorded input size unless given; a
    batch of one is traced as two so that the batch dimension stays dynamic.  ONNX is
    translated by torch's exporter from the same ``torch.export`` program.  With ``check``
    the written file is loaded (onnxruntime for ONNX) and compared with the eager model at
    batch 1 and 4; beyond ``tolerance`` (max abs diff) nothing is written.
    """
    if format not in FORMATS:
        raise ValueError(f"format must be one of {', '.join(FORMATS)}, got {format!r}")
    if format == "onnx":
        if opset < MIN_OPSET:
            raise ValueError(f"opset must be {MIN_OPSET} or newer, got {opset}: torch's ONNX exporter writes "
                             f"opset {MIN_OPSET} at the lowest")
        require_onnx(check)
    if example_input is None:
        example_input = example_input_for(model)
    if not isinstance(example_input, Tensor) or example_input.dim() < 1:
        raise TypeError(f"example_input must be a batched tensor, got {type(example_input).__name__}")
    traced = example_input if not dynamic_batch or example_input.shape[0] > 1 \
        else torch.cat([example_input, example_input])
    batches = CHECK_BATCHES if dynamic_batch else (example_input.shape[0],)
    target = Path(path)
    with _eval_mode(model), torch.no_grad(), atomic_file(target, FORMATS[format]) as staging:
        with export_path(model) if format == "onnx" else contextlib.nullcontext():
            program = _torch_export(model, traced, dynamic_batch)
            if format == "onnx":
                _write_onnx(program, staging, opset)
            else:
                _save_program(program, staging)
        diffs = _verify(model, staging, format, example_input, batches, tolerance) if check else {}
    taus = {methods.temperature_of(layer) for layer in methods.temperature_layers(model).values()}
    return ExportReport(path=target, format=format, example_shape=tuple(traced.shape), dynamic_batch=dynamic_batch,
                        opset=opset if format == "onnx" else None,
                        temperature=taus.pop() if len(taus) == 1 else None, max_abs_diff=diffs)


def _torch_export(model: nn.Module, x: Tensor, dynamic_batch: bool) -> torch.export.ExportedProgram:
    dynamic_shapes = ({0: torch.export.Dim("batch", min=1)},) if dynamic_batch else None
    try:  # a failed trace logs its whole FX graph to stderr (a thousand lines): the error says enough
        with contextlib.redirect_stderr(io.StringIO()):
            return torch.export.export(model, (x,), dynamic_shapes=dynamic_shapes)
    except Exception as error:
        raise ExportError(f"torch.export failed on an input of size {dims(x.shape)}: {_reason(error)}") from error


def _save_program(program: torch.export.ExportedProgram, destination: Path) -> None:
    """``torch.export.save``, without its warning for a weight that is dense but not contiguous.

    A converted model's plain Conv2d layers hold channels-last weights (rewrite.py); torch's
    archive cannot call such a weight "complete", warns "No complete tensor found in the group",
    and writes its storage with its strides all the same.  The check reloads the file and compares.
    """
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="No complete tensor found in the group", category=UserWarning)
        torch.export.save(program, destination)


def _write_onnx(program: torch.export.ExportedProgram, destination: Path, opset: int) -> None:
    """The dynamo exporter, from the program ``torch.export`` made (opset 18 and newer)."""
    weights = sum(t.numel() * t.element_size() for t in itertools.chain(program.parameters(), program.buffers()))
    if weights >= _ONNX_LIMIT_BYTES:
        raise ExportError(f"the model holds {weights / 2**30:.2f} GiB of weights, over the 2 GiB an ONNX "
                          "file can hold; export format='torch_export' instead")
    with open(os.devnull, "w") as quiet, contextlib.redirect_stdout(quiet):  # the exporter's progress lines
        try:
            onnx_program = torch.onnx.export(program, dynamo=True, opset_version=opset, verbose=False)
            _name_batch_axis(onnx_program.model.graph)
            onnx_program.save(destination, external_data=False)
        except Exception as error:
            raise ExportError(f"ONNX export (opset {opset}) failed: {_reason(error)}") from error


def _name_batch_axis(graph) -> None:
    """Call the first input's dynamic batch dimension "batch" wherever it appears: the exporter
    names it after a sympy symbol ("s77"), which is what onnxruntime and Netron would show."""
    import onnx_ir as ir

    first = graph.inputs[0].shape[0] if graph.inputs and graph.inputs[0].shape else None
    if not isinstance(first, ir.SymbolicDim) or first.value is None:
        return  # a static batch

    def renamed(dim):
        return ir.SymbolicDim("batch") if isinstance(dim, ir.SymbolicDim) and dim.value == first.value else dim

    for value in itertools.chain(graph.inputs, graph.outputs, (out for node in graph for out in node.outputs)):
        if value.shape is not None:
            value.shape = ir.Shape([renamed(dim) for dim in value.shape])


def _verify(model: nn.Module, written: Path, format: str, example: Tensor, batches: Sequence[int],
            tolerance: float) -> dict[int, float]:
    """Max abs diff between the written file and eager per batch size; raise beyond tolerance."""
    run = _onnxruntime_runner(written) if format == "onnx" else _pt2_runner(written)
    diffs = {}
    for batch in batches:
        x = _check_inputs(example, batch)
        expected = _leaves(model(x))
        got = run(x)
        if len(got) != len(expected):
            raise ExportError(f"the exported {format} model returns {len(got)} outputs, eager {len(expected)}")
        diffs[batch] = max((_max_abs_diff(a, b) for a, b in zip(got, expected)), default=0.0)
        if not diffs[batch] <= tolerance:
            raise ExportError(f"the exported {format} model differs from eager by {diffs[batch]:.3g} "
                              f"(max abs) at batch {batch}, over the tolerance {tolerance:g}; nothing written")
    return diffs


def _onnxruntime_runner(written: Path):
    import onnxruntime
    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = torch.get_num_threads()
    session = onnxruntime.InferenceSession(str(written), options, providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    return lambda x: [torch.from_numpy(y) for y in session.run(None, {name: x.detach().cpu().numpy()})]


def _pt2_runner(written: Path):
    module = torch.export.load(written).module()
    return lambda x: _leaves(module(x))


def _leaves(output: Any) -> list[Tensor]:
    return [leaf for leaf in torch.utils._pytree.tree_leaves(output) if isinstance(leaf, Tensor)]


def _max_abs_diff(got: Tensor, expected: Tensor) -> float:
    if tuple(got.shape) != tuple(expected.shape):
        raise ExportError(f"the exported model returns shape {dims(got.shape)}, eager {dims(expected.shape)}")
    return (got.float().cpu() - expected.float().cpu()).abs().max().item() if got.numel() else 0.0


# --- helpers --------------------------------------------------------------------------------


def require_onnx(check: bool = True) -> None:
    """Raise ``MissingExportPackages`` unless the ONNX packages (and onnxruntime, for ``check``)
    import: the CLI asks before spending seconds loading a model it could not export."""
    needed = ("onnx", "onnxscript") + (("onnxruntime",) if check else ())
    missing = []
    for name in needed:
        try:
            __import__(name)
        except ImportError:
            missing.append(name)
    if missing:
        raise MissingExportPackages(f"ONNX export needs {', '.join(missing)}, not installed: "
                                    "install kwconvert[export]")


@contextlib.contextmanager
def _eval_mode(model: nn.Module) -> Iterator[None]:
    modes = {module: module.training for module in model.modules()}
    model.eval()
    try:
        yield
    finally:
        for module, training in modes.items():
            module.training = training


def _reason(error: BaseException) -> str:
    """The first line of the innermost cause: exporters wrap the real reason in pages of advice."""
    while error.__cause__ is not None:
        error = error.__cause__
    text = str(error).strip()
    return f"{type(error).__name__}: {text.splitlines()[0]}" if text else type(error).__name__
