"""The compiled per-sample convolution (``_native.c`` beside this file) and its ctypes binding.

Why: a library GEMM given a new weight per sample re-packs it on every call, and the
assembly leaves the kernels in an order (kernel position before output channel) that
needs a copy into OHWI first.  Together they cost a fifth of resnet18's KW layer4.  The
compiled product instead reads each sample's kernel straight from the assembly's output:
the warehouse is packed with every cell's elements in *panel order* (``panel_order``),
so that the assembly writes, for each run of ``NP`` output channels and each cell, a
row-major ``(c_e, NP)`` block, and the product walks those blocks through a table of
offsets.  ``inline_conv`` goes further and mixes the kernels itself, chunk by chunk, into a
buffer that stays in cache; with ``inline_input_grad`` and ``inline_weight_grad`` it also trains
(path ``"inline"``, :mod:`.paths`).

``pip install`` builds the kernel once per instruction set (``setup.py``: AVX-512, AVX2 +
FMA, and a baseline copy for any CPU; every copy optional: when none builds, ``available()``
is False and ``path_choice`` never offers the ``"native"`` path).  At run time the best
copy the CPU executes is loaded, so a build made on one machine runs on any other of its
architecture; ``KWCONVERT_ISA=baseline|avx2|avx512`` forces one (a copy the CPU cannot
execute is refused with a warning) and ``KWCONVERT_NATIVE=0`` turns the kernel off.
Its results equal the pure-PyTorch paths to float rounding (tests/test_native.py).
"""
from __future__ import annotations

import ctypes
import functools
import importlib.util
import math
import os
import warnings

import torch
import torch.nn.functional as F
from torch import Tensor

from .cells import Tiling

__all__ = ["ISAS", "available", "built_isas", "conv", "cpu_isas", "depthwise", "inline_conv", "inline_rows",
           "is_depthwise", "isa", "panel_order", "panel_width", "supports"]

_PANEL_WIDTHS = (64, 32, 16, 8)
_MAX_SEGMENTS = 1024  # as in _native.c
_MAX_TAPS = 64  # kernel positions of a depthwise layer, as in _native.c


#: Instruction sets of the compiled copies, best first (setup.py builds one module each).
ISAS = ("avx512", "avx2", "baseline")
#: torch's CPU capability -> the copies such a CPU executes, best first
_RUNNABLE = {"AVX512": ISAS, "AVX2": ISAS[1:]}


def cpu_isas() -> tuple[str, ...]:
    """The copies this CPU can execute, best first, as torch's own dispatch sees the CPU
    (``torch.backends.cpu.get_cpu_capability()``, which also honours ``ATEN_CPU_CAPABILITY``)."""
    return _RUNNABLE.get(torch.backends.cpu.get_cpu_capability(), ("baseline",))


def built_isas() -> tuple[str, ...]:
    """The copies this installation holds (whatever the CPU), best first."""
    return tuple(isa for isa in ISAS if _module_file(isa) is not None)


def _module_file(isa: str) -> str | None:
    spec = importlib.util.find_spec(f"{__package__}._native_{isa}")
    if spec is None or spec.origin is None or not spec.origin.endswith((".so", ".pyd", ".dylib")):
        return None
    return spec.origin


@functools.cache
def _load(isa: str) -> ctypes.CDLL | None:
    """One copy through ctypes, or None when it was not built."""
    path = _module_file(isa)
    if path is None:
        return None
    library = ctypes.CDLL(path)
    pointer, size, i32 = ctypes.c_void_p, ctypes.c_long, ctypes.c_int
    library.kw_native_conv.argtypes = [pointer, size, size, pointer, size, pointer, i32, i32, i32, i32,
                                       pointer, size, size, pointer, i32, size, i32]
    library.kw_native_conv.restype = i32
    library.kw_native_inline.argtypes = [pointer, size, size, pointer, i32, pointer, size, pointer, pointer, i32, i32,
                                        i32, i32, pointer, size, size, pointer, i32, i32, i32]
    library.kw_native_inline.restype = i32
    library.kw_native_inline_input_grad.argtypes = [pointer, size, size, pointer, i32, pointer, size, pointer, i32,
                                                    i32, i32, i32, i32, pointer, size, size, i32, i32, i32]
    library.kw_native_inline_input_grad.restype = i32
    library.kw_native_inline_input_grad_rows.argtypes = [pointer, size, size, pointer, i32, pointer, size, pointer,
                                                         i32, i32, i32, i32, i32, i32, pointer, size, size, i32, i32,
                                                         i32]
    library.kw_native_inline_input_grad_rows.restype = i32
    library.kw_native_inline_weight_grad.argtypes = [pointer, size, size, size, pointer, size, pointer, i32, pointer,
                                                     size, pointer, pointer, i32, i32, i32, i32, i32, i32, pointer,
                                                     size, pointer, i32]
    library.kw_native_inline_weight_grad.restype = i32
    library.kw_native_mix.argtypes = [pointer, i32, i32, pointer, size, size, i32, i32, i32, pointer, i32]
    library.kw_native_mix.restype = i32
    premix = [pointer, pointer, pointer] + [i32] * 8
    library.kw_native_premix.argtypes = premix
    library.kw_native_premix.restype = i32
    library.kw_native_premix_input_grad.argtypes = premix
    library.kw_native_premix_input_grad.restype = i32
    library.kw_native_premix_weight_grad.argtypes = premix[:-1]
    library.kw_native_premix_weight_grad.restype = i32
    library.kw_native_depthwise.argtypes = [pointer, i32, i32, i32, pointer, size, pointer, pointer] + [i32] * 12
    library.kw_native_depthwise.restype = i32
    library.kw_native_im2col.argtypes = [pointer, i32, i32, i32, pointer] + [i32] * 13
    library.kw_native_im2col.restype = i32
    library.kw_native_col2im.argtypes = [pointer, i32, i32, i32, pointer] + [i32] * 12
    library.kw_native_col2im.restype = i32
    library.kw_native_isa.restype = ctypes.c_char_p
    if library.kw_native_isa().decode() != isa:
        raise ImportError(f"{path} holds the {library.kw_native_isa().decode()} kernel, not {isa}: reinstall kwconvert")
    return library


@functools.cache
def _choose(enabled: str, forced: str) -> tuple[str, ctypes.CDLL] | None:
    """The copy to run for these values of ``KWCONVERT_NATIVE`` and ``KWCONVERT_ISA``."""
    if enabled == "0":
        return None
    runnable = cpu_isas()
    wanted = runnable
    if forced:
        if forced not in ISAS:
            raise ValueError(f"KWCONVERT_ISA must be one of {', '.join(ISAS)} (or unset), got {forced!r}")
        if forced in runnable:
            wanted = (forced,)
        else:  # loading it would end the process with an illegal instruction
            warnings.warn(f"KWCONVERT_ISA={forced}: this CPU cannot execute that kernel (it runs "
                          f"{', '.join(runnable)}); using the best it can", RuntimeWarning, stacklevel=3)
    for isa in wanted:
        try:
            library = _load(isa)
        except (OSError, ImportError, AttributeError) as error:  # e.g. a missing OpenMP runtime, a stale build
            warnings.warn(f"kwconvert's {isa} kernel cannot be loaded ({error}); the next copy or the "
                          f"pure-PyTorch paths run instead", RuntimeWarning, stacklevel=3)
            continue
        if library is not None:
            return isa, library
    return None


#: The copy chosen at the last eager look (None: none runs), what a torch.compile trace reads:
#: a plain global is a constant to it, where reading the environment and loading a library
#: through ctypes would break the graph (torch.compiler.assume_constant_result would do the
#: same, but importing torch._dynamo for it cost every process 2.5 s at start).
_current: tuple[str, ctypes.CDLL] | None = None


def _chosen() -> tuple[str, ctypes.CDLL] | None:
    global _current
    if torch.compiler.is_compiling():
        return _current
    _current = _choose(os.environ.get("KWCONVERT_NATIVE", "1"), os.environ.get("KWCONVERT_ISA", ""))
    return _current


def _library() -> ctypes.CDLL | None:
    chosen = _chosen()
    return None if chosen is None else chosen[1]


def available() -> bool:
    """Whether a compiled copy is built and loaded (``KWCONVERT_NATIVE=0``: never)."""
    return _library() is not None


def isa() -> str | None:
    """The instruction set of the copy that runs: ``"avx512"``, ``"avx2"``, ``"baseline"``, or None."""
    chosen = _chosen()
    return None if chosen is None else chosen[0]


try:
    _chosen()  # so that a graph traced before any eager call already sees the copy that runs
except ValueError:
    pass  # a misspelt KWCONVERT_ISA: said at the first eager call, not as an import error


def panel_width(tiling: Tiling) -> int | None:
    """Output channels per panel: the widest of 64, 32, 16, 8 dividing the cell's f_e."""
    return next((width for width in _PANEL_WIDTHS if tiling.cell[0] % width == 0), None)


def is_depthwise(tiling: Tiling, groups: int) -> bool:
    """One input channel per group and one output channel per input channel."""
    return groups > 1 and tiling.weight_shape[1] == 1 and tiling.weight_shape[0] == groups


def supports(tiling: Tiling, groups: int, x: Tensor) -> bool:
    """Whether the compiled kernel can run this layer: float32 on CPU, 1x1 cells, and either
    no groups with f_e a multiple of 8 (``conv``) or a depthwise layer (``depthwise``)."""
    if not available() or x.device.type != "cpu" or x.dtype != torch.float32 \
            or any(size != 1 for size in tiling.cell[2:]):
        return False
    if groups == 1:
        return panel_width(tiling) is not None and tiling.spatial * tiling.blocks_in <= _MAX_SEGMENTS
    return is_depthwise(tiling, groups) and tiling.spatial <= _MAX_TAPS


def panel_order(cells: Tensor, width: int) -> Tensor:
    """The warehouse ``(n, f_e, c_e, 1, ...)`` as ``(n, cell)`` rows with each cell in panel
    order: element ``(f, c)`` at ``(f // width) * c_e * width + c * width + f % width``."""
    n, f_e, c_e = cells.shape[:3]
    return cells.reshape(n, f_e // width, width, c_e).transpose(2, 3).reshape(n, -1)


@functools.lru_cache(maxsize=512)
def _offsets(tiling: Tiling, width: int) -> Tensor:
    """``offsets[P, g]``: where panel P's rows of segment g start in one sample's blocks (the
    first element of each (segment, panel) block of ``_kernel_index``)."""
    index = _kernel_index(tiling, width, torch.device("cpu"))
    return index[::tiling.cell[1], ::width].t().contiguous()


def _pointer(tensor: Tensor | None) -> int | None:
    return None if tensor is None else tensor.data_ptr()


def _check(name: str, tensor: Tensor, dims: int) -> None:
    """What the operators assume of a tensor, said as an error rather than found as a crash."""
    if tensor.dim() != dims or not tensor.is_floating_point():
        raise ValueError(f"kwconvert's operators take {name} as a {dims}-d floating-point tensor, got "
                         f"{tensor.dim()}-d {tensor.dtype}")


def _kernel_for(*tensors: Tensor | None) -> ctypes.CDLL | None:
    """The compiled kernel when it can take these tensors (float32 on the CPU), else None: the
    operator then computes the same in PyTorch ops (a program exported where the kernel ran,
    run where it is not built, on another device or in another dtype)."""
    for t in tensors:
        if t is not None and (t.dtype != torch.float32 or t.device.type != "cpu"):
            return None
    return _library()


def _sample_numel(tensor: Tensor) -> int:
    """Elements per sample (dim 0), without the view ``tensor[0]`` would make (an operator call)."""
    return math.prod(tensor.shape[1:])


def _refused(code: int, what: str) -> None:
    if code:
        raise RuntimeError(f"kwconvert's compiled kernel refused {what}")


# --- the operators ------------------------------------------------------------------------
#
# Each compiled routine is a torch.library operator: torch.compile and torch.export see an op
# with a fake implementation (shapes only) instead of an opaque foreign call, and autograd a
# formula in plain PyTorch ops (the kernels themselves are forward only).  Arguments are
# tensors and integers, so nothing outside the op's schema decides what it computes.


@torch.library.custom_op("kwconvert::conv", mutates_args=())
def _conv(cols: Tensor, blocks: Tensor, bias: Tensor | None, weight_shape: list[int], cell: list[int]) -> Tensor:
    tiling = Tiling(tuple(weight_shape), tuple(cell))
    width = panel_width(tiling)
    _check("cols", cols, 3)
    _check("blocks", blocks, 3)
    batch, rows, depth = cols.shape
    out_channels = tiling.weight_shape[0]
    if width is None or blocks.shape != (batch, tiling.cells, math.prod(tiling.cell)) \
            or depth != math.prod(tiling.weight_shape[1:]) or (bias is not None and bias.shape != (out_channels,)):
        raise ValueError(f"kwconvert::conv: cols {tuple(cols.shape)}, blocks {tuple(blocks.shape)} and bias do "
                         f"not fit a kernel {tiling.weight_shape} of cells {tiling.cell}")
    library = _kernel_for(cols, blocks, bias)
    if library is None:
        kernels = blocks.reshape(batch, -1)[:, _kernel_index(tiling, width, blocks.device)]
        return torch.bmm(cols, kernels) if bias is None else torch.baddbmm(bias, cols, kernels)
    cols, blocks = cols.contiguous(), blocks.contiguous()
    bias = None if bias is None else bias.contiguous()
    offsets = _offsets(tiling, width)
    out = torch.empty(batch, rows, out_channels, dtype=cols.dtype, device=cols.device)
    panels, segments = offsets.shape
    _refused(library.kw_native_conv(
        cols.data_ptr(), rows * depth, depth, blocks.data_ptr(), _sample_numel(blocks), offsets.data_ptr(), panels,
        segments, tiling.cell[1], width, out.data_ptr(), rows * out_channels, out_channels, _pointer(bias),
        rows, batch, torch.get_num_threads()), f"panel width {width} / {segments} segments")
    return out


@_conv.register_fake
def _(cols, blocks, bias, weight_shape, cell):
    return cols.new_empty(cols.shape[0], cols.shape[1], weight_shape[0])


def _kernel_index(tiling: Tiling, width: int, device: torch.device) -> Tensor:
    """``index[k, o]``: where element (k, o) of a sample's ``kernel^T`` (K, C_out) lies in its
    flattened blocks (the table ``_offsets`` holds, per element; a permutation, since every
    block element is one kernel element).  Built from ``arange`` on ``device`` rather than
    cached, so that traced code (a fake or exported graph) builds it too."""
    f_e, c_e = tiling.cell[:2]
    blocks_out, blocks_in = tiling.blocks_out, tiling.blocks_in
    k = torch.arange(math.prod(tiling.weight_shape[1:]), device=device).unsqueeze(1)
    o = torch.arange(tiling.weight_shape[0], device=device).unsqueeze(0)
    position, block_in, channel = k // (blocks_in * c_e), (k // c_e) % blocks_in, k % c_e
    mixture = (position * blocks_out + o // f_e) * blocks_in + block_in
    return mixture * (f_e * c_e) + (o - o % width) % f_e * c_e + channel * width + o % width


def _conv_setup(ctx, inputs, output) -> None:
    cols, blocks, bias, weight_shape, cell = inputs
    ctx.tiling = Tiling(tuple(weight_shape), tuple(cell))
    ctx.save_for_backward(cols, blocks)


def _conv_grads(tiling: Tiling, cols: Tensor, blocks: Tensor, grad: Tensor, needs: tuple[bool, bool, bool]
                ) -> tuple[Tensor | None, Tensor | None, Tensor | None]:
    """``conv``'s gradients of cols, blocks and bias (those ``needs`` asks for): each sample's
    kernel^T gathered from its blocks, then the two products of a linear map."""
    index = _kernel_index(tiling, panel_width(tiling), blocks.device)
    flat = blocks.reshape(blocks.shape[0], -1)
    grad_cols = grad_blocks = grad_bias = None
    if needs[0]:
        grad_cols = torch.bmm(grad, flat[:, index].transpose(1, 2))
    if needs[1]:
        grad_kernel = torch.bmm(cols.transpose(1, 2), grad).reshape(blocks.shape[0], -1)
        grad_blocks = grad_kernel[:, torch.argsort(index.reshape(-1))].view_as(blocks)
    if needs[2]:
        grad_bias = grad.sum(dim=(0, 1))
    return grad_cols, grad_blocks, grad_bias


def _conv_backward(ctx, grad: Tensor):
    return *_conv_grads(ctx.tiling, *ctx.saved_tensors, grad, ctx.needs_input_grad[:3]), None, None


_conv.register_autograd(_conv_backward, setup_context=_conv_setup)


def conv(tiling: Tiling, cols: Tensor, blocks: Tensor, bias: Tensor | None) -> Tensor:
    """Every sample's product ``cols[b] @ kernel_b^T`` (+ bias): ``(B, rows, C_out)``.

    ``cols`` is the NHWC im2col ``(B, rows, K)`` (K in OHWI's order), ``blocks`` the
    assembly's output ``(B, m, cell)`` from a warehouse in ``panel_order``.  Work is split
    over ``torch.get_num_threads()`` OpenMP threads (torch's own pool); the GIL is released
    meanwhile.  The operator ``torch.ops.kwconvert.conv``.
    """
    return _conv(cols, blocks, bias, list(tiling.weight_shape), list(tiling.cell))


def inline_rows(cells: Tensor, width: int) -> Tensor:
    """The warehouse ``(n, f_e, c_e, 1, ...)`` packed for ``inline_conv``: ``(cell rows, n, width)``,
    every row of a cell in panel order (``panel_order``: one input channel of ``width`` output
    channels) followed by the same row of the n - 1 other cells, so that one row of a sample's
    kernel is ``alpha (1, n) @ rows[q]`` read from one contiguous block.  One permuted copy: through
    ``panel_order`` (two copies) resnet18's stage-4 warehouse (28 MB) took 33 ms, this 11."""
    n, f_e, c_e = cells.shape[:3]
    return cells.reshape(n, f_e // width, width, c_e).permute(1, 3, 0, 2).reshape(-1, n, width).contiguous()


@functools.lru_cache(maxsize=512)
def _inline_tables(tiling: Tiling, width: int) -> tuple[Tensor, Tensor]:
    """``_offsets`` split for ``inline_conv``: each (panel, segment) block's mixture and first row of
    ``inline_rows``."""
    offsets, cell = _offsets(tiling, width), math.prod(tiling.cell)
    return (offsets // cell).contiguous(), (offsets % cell // width).contiguous()


def _inline_blocks(alpha: Tensor, rows: Tensor) -> Tensor:
    """The assembly ``inline_conv`` never writes out: blocks ``(B, m, cell)`` in panel order."""
    return torch.einsum("bmn,rnw->bmrw", alpha, rows).reshape(*alpha.shape[:2], -1)


@torch.library.custom_op("kwconvert::inline_conv", mutates_args=())
def _inline_conv(cols: Tensor, alpha: Tensor, rows: Tensor, bias: Tensor | None, weight_shape: list[int],
                 cell: list[int]) -> Tensor:
    tiling = Tiling(tuple(weight_shape), tuple(cell))
    width = panel_width(tiling)
    _check("cols", cols, 3)
    _check("alpha", alpha, 3)
    _check("rows", rows, 3)
    batch, count, depth = cols.shape
    n = alpha.shape[2]
    if width is None or alpha.shape[:2] != (batch, tiling.cells) \
            or rows.shape != (math.prod(tiling.cell) // width, n, width) \
            or depth != math.prod(tiling.weight_shape[1:]) or (bias is not None and bias.shape != (weight_shape[0],)):
        raise ValueError(f"kwconvert::inline_conv: cols {tuple(cols.shape)}, alpha {tuple(alpha.shape)}, rows "
                         f"{tuple(rows.shape)} and bias do not fit a kernel {tiling.weight_shape} of cells {tiling.cell}")
    library = _kernel_for(cols, alpha, rows, bias)
    if library is None:
        return _conv(cols, _inline_blocks(alpha, rows), bias, weight_shape, cell)
    cols, alpha, rows = cols.contiguous(), alpha.contiguous(), rows.contiguous()
    bias = None if bias is None else bias.contiguous()
    mixtures, rows_at = _inline_tables(tiling, width)
    out_channels = weight_shape[0]
    out = torch.empty(batch, count, out_channels, dtype=cols.dtype, device=cols.device)
    panels, segments = mixtures.shape
    _refused(library.kw_native_inline(
        cols.data_ptr(), count * depth, depth, rows.data_ptr(), n, alpha.data_ptr(), _sample_numel(alpha),
        mixtures.data_ptr(), rows_at.data_ptr(), panels, segments, tiling.cell[1], width, out.data_ptr(),
        count * out_channels, out_channels, _pointer(bias), count, batch, torch.get_num_threads()),
        f"an inline assembly of panel width {width}")
    return out


@_inline_conv.register_fake
def _(cols, alpha, rows, bias, weight_shape, cell):
    return cols.new_empty(cols.shape[0], cols.shape[1], weight_shape[0])


def _inline_setup(ctx, inputs, output) -> None:
    cols, alpha, rows, bias, weight_shape, cell = inputs
    ctx.tiling = Tiling(tuple(weight_shape), tuple(cell))
    ctx.save_for_backward(cols, alpha, rows)


def _inline_backward(ctx, grad: Tensor):
    """In the compiled kernel where it can take it (what a compiled graph of the "inline" path
    trains with), else the assembly redone in PyTorch ops, then ``conv``'s formula and the
    assembly's."""
    cols, alpha, rows = ctx.saved_tensors
    needs = ctx.needs_input_grad
    if trains_inline(ctx.tiling, cols, alpha, rows, grad):
        return *_inline_grads_in_kernel(ctx.tiling, cols, alpha, rows, grad, needs), None, None
    grad_cols, grad_blocks, grad_bias = _conv_grads(ctx.tiling, cols, _inline_blocks(alpha, rows), grad,
                                                    (needs[0], needs[1] or needs[2], needs[3]))
    grad_alpha = grad_rows = None
    if grad_blocks is not None:
        grad_grid = grad_blocks.view(*alpha.shape[:2], rows.shape[0], rows.shape[2])
        grad_alpha = torch.einsum("bmrw,rnw->bmn", grad_grid, rows)
        grad_rows = torch.einsum("bmn,bmrw->rnw", alpha, grad_grid)
    return grad_cols, grad_alpha, grad_rows, grad_bias, None, None


def _inline_grads_in_kernel(tiling: Tiling, cols: Tensor, alpha: Tensor, rows: Tensor, grad: Tensor,
                            needs: tuple[bool, ...]) -> tuple[Tensor | None, ...]:
    """``inline_conv``'s gradients of cols, alpha, rows and bias (those ``needs`` asks for) from
    ``inline_input_grad`` and ``inline_weight_grad``."""
    grad_cols = grad_alpha = grad_rows = grad_bias = None
    if needs[0]:
        grad_cols = inline_input_grad(tiling, grad, alpha, rows)
    if needs[1] or needs[2]:
        grad_alpha, grad_rows = inline_weight_grad(tiling, cols.transpose(1, 2), grad, alpha, rows)
    if needs[3]:
        grad_bias = grad.sum(dim=(0, 1))
    return grad_cols, grad_alpha if needs[1] else None, grad_rows if needs[2] else None, grad_bias


_inline_conv.register_autograd(_inline_backward, setup_context=_inline_setup)


def inline_conv(tiling: Tiling, cols: Tensor, alpha: Tensor, rows: Tensor, bias: Tensor | None) -> Tensor:
    """``conv`` with the assembly fused in: ``(B, rows, C_out)`` from the NHWC im2col ``cols``,
    the attentions ``alpha (B, m, n)`` and the warehouse as ``inline_rows``.  No sample's kernel is
    written to memory: the kernel mixes chunks of it into a per-thread buffer and multiplies them
    at once (resnet18's layer4 at batch 16 would otherwise write and read 151 MB of kernels per
    layer).  The operator ``torch.ops.kwconvert.inline_conv``."""
    return _inline_conv(cols, alpha, rows, bias, list(tiling.weight_shape), list(tiling.cell))


# --- the backward of "inline" (training) -----------------------------------------------------
# Operators too, forward only: the autograd node of the "inline" path calls them in eager mode,
# ``inline_conv``'s autograd formula in a compiled graph.  They need the compiled kernel (the
# callers check ``trains_inline``): elsewhere the formula in PyTorch ops above runs instead.


def input_width(tiling: Tiling) -> int | None:
    """Input channels per panel of ``inline_input_grad``: the widest of 64, 32, 16, 8 dividing c_e."""
    return next((width for width in _PANEL_WIDTHS if tiling.cell[1] % width == 0), None)


def inline_columns(cells: Tensor, width: int) -> Tensor:
    """The warehouse as ``inline_input_grad`` reads it: ``(c_e / width, f_e, n, width)``, for each
    input-channel panel and output channel of a cell the n cells' ``width`` input channels."""
    n, f_e, c_e = cells.shape[:3]
    return cells.reshape(n, f_e, c_e // width, width).permute(2, 1, 0, 3).contiguous()


@functools.lru_cache(maxsize=512)
def _input_grad_mixtures(tiling: Tiling) -> Tensor:
    """``[g, ob]``: the mixture of output block ob in segment g (kernel position, input block)."""
    segment = torch.arange(tiling.spatial * tiling.blocks_in).unsqueeze(1)
    block_out = torch.arange(tiling.blocks_out).unsqueeze(0)
    position, block_in = segment // tiling.blocks_in, segment % tiling.blocks_in
    return ((position * tiling.blocks_out + block_out) * tiling.blocks_in + block_in).contiguous()


def inline_input_grad(tiling: Tiling, grad_rows: Tensor, alpha: Tensor, warehouse: Tensor) -> Tensor:
    """``(B, rows, K)``: the gradient of ``inline_conv``'s im2col rows, ``grad_rows (B, rows, C_out)
    @ W_b`` per sample, from the attentions and the warehouse as ``inline_columns`` (4-d) or as
    ``inline_rows`` (3-d: the forward's copy; the kernel transposes each mixed block, a little
    slower, no second copy).  The operator ``torch.ops.kwconvert.inline_input_grad``."""
    return _inline_input_grad(grad_rows, alpha, warehouse, list(tiling.weight_shape), list(tiling.cell))


@torch.library.custom_op("kwconvert::inline_input_grad", mutates_args=())
def _inline_input_grad(grad_rows: Tensor, alpha: Tensor, warehouse: Tensor, weight_shape: list[int],
                       cell: list[int]) -> Tensor:
    tiling = Tiling(tuple(weight_shape), tuple(cell))
    library = _backward_kernel("inline_input_grad", tiling, grad_rows, alpha, warehouse)
    batch, count, out_channels = grad_rows.shape
    depth = math.prod(tiling.weight_shape[1:])
    grad_rows, alpha, warehouse = grad_rows.contiguous(), alpha.contiguous(), warehouse.contiguous()
    out = grad_rows.new_empty(batch, count, depth)
    mixtures = _input_grad_mixtures(tiling)
    rows_layout = warehouse.dim() == 3
    widths = [panel_width(tiling), input_width(tiling)] if rows_layout else [input_width(tiling)]
    kernel = library.kw_native_inline_input_grad_rows if rows_layout else library.kw_native_inline_input_grad
    _refused(kernel(
        grad_rows.data_ptr(), count * out_channels, out_channels, warehouse.data_ptr(), alpha.shape[2],
        alpha.data_ptr(), _sample_numel(alpha), mixtures.data_ptr(), mixtures.shape[0], tiling.blocks_out,
        tiling.cell[0], tiling.cell[1], *widths, out.data_ptr(), count * depth, depth, count, batch,
        torch.get_num_threads()), f"an inline input gradient of panel widths {widths}")
    return out


@_inline_input_grad.register_fake
def _(grad_rows, alpha, warehouse, weight_shape, cell):
    return grad_rows.new_empty(grad_rows.shape[0], grad_rows.shape[1], math.prod(weight_shape[1:]))


#: Output pixels up to which the weight gradient reads the im2col ``(B, rows, K)`` transposed in
#: place (``inline_weight_grad``); a sample's row tiles then read a few floats per pixel, K apart,
#: which stay in L2 on small maps (resnet18's layer3 and layer4 at batch 16: the same time as from a
#: transposed copy) and not on large ones (its layer1, 3136 pixels: 33 ms against 20), which get a
#: transposed copy.
IN_PLACE_ROWS = 256


def inline_weight_grad(tiling: Tiling, cols_t: Tensor, grad_rows: Tensor, alpha: Tensor, rows: Tensor,
                       into: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """The gradients of ``inline_conv``'s attentions ``(B, m, n)`` and warehouse (as ``inline_rows``)
    from the im2col transposed ``(B, K, rows)`` (a transposed view of the im2col is read in place up
    to ``IN_PLACE_ROWS`` rows), with no sample's kernel gradient stored whole.
    ``into``: a warehouse gradient (as ``inline_rows``) the kernel adds this one to, returned in
    place of a new one.  The operators ``torch.ops.kwconvert.inline_weight_grad`` and
    ``inline_weight_grad_into``."""
    shape = [list(tiling.weight_shape), list(tiling.cell)]
    if into is None:
        return _inline_weight_grad(cols_t, grad_rows, alpha, rows, *shape)
    return _inline_weight_grad_into(cols_t, grad_rows, alpha, rows, into, *shape), into


@torch.library.custom_op("kwconvert::inline_weight_grad", mutates_args=())
def _inline_weight_grad(cols_t: Tensor, grad_rows: Tensor, alpha: Tensor, rows: Tensor, weight_shape: list[int],
                        cell: list[int]) -> tuple[Tensor, Tensor]:
    grad_warehouse = rows.new_zeros(rows.shape)
    return _weight_grad_adding(cols_t, grad_rows, alpha, rows, grad_warehouse, weight_shape, cell), grad_warehouse


@_inline_weight_grad.register_fake
def _(cols_t, grad_rows, alpha, rows, weight_shape, cell):
    return alpha.new_empty(alpha.shape), rows.new_empty(rows.shape)


@torch.library.custom_op("kwconvert::inline_weight_grad_into", mutates_args=("grad_warehouse",))
def _inline_weight_grad_into(cols_t: Tensor, grad_rows: Tensor, alpha: Tensor, rows: Tensor, grad_warehouse: Tensor,
                             weight_shape: list[int], cell: list[int]) -> Tensor:
    if grad_warehouse.shape != rows.shape or not grad_warehouse.is_contiguous():
        raise ValueError(f"kwconvert::inline_weight_grad_into: grad_warehouse {tuple(grad_warehouse.shape)} "
                         f"must be contiguous and of the rows' shape {tuple(rows.shape)}")
    return _weight_grad_adding(cols_t, grad_rows, alpha, rows, grad_warehouse, weight_shape, cell)


@_inline_weight_grad_into.register_fake
def _(cols_t, grad_rows, alpha, rows, grad_warehouse, weight_shape, cell):
    return alpha.new_empty(alpha.shape)


def _weight_grad_adding(cols_t: Tensor, grad_rows: Tensor, alpha: Tensor, rows: Tensor, grad_warehouse: Tensor,
                        weight_shape: list[int], cell: list[int]) -> Tensor:
    """alpha's gradient; the warehouse's is added into ``grad_warehouse`` (the kernel sums into it)."""
    tiling = Tiling(tuple(weight_shape), tuple(cell))
    library = _backward_kernel("inline_weight_grad", tiling, cols_t, grad_rows, alpha, rows, grad_warehouse)
    width = panel_width(tiling)
    batch, depth, count = cols_t.shape
    panels = tiling.weight_shape[0] // width
    if cols_t.stride(2) != 1 and (cols_t.stride(1) != 1 or count > IN_PLACE_ROWS):
        cols_t = cols_t.contiguous()
    rows = rows.contiguous()
    grad_panels = grad_rows.reshape(batch, count, panels, width).transpose(1, 2).contiguous()  # (B, P, rows, NP)
    alpha_t = alpha.permute(1, 2, 0).contiguous()  # (m, n, B)
    threads = torch.get_num_threads()
    grad_alpha = alpha.new_zeros(threads, *alpha.shape)
    mixtures, rows_at = _inline_tables(tiling, width)
    _refused(library.kw_native_inline_weight_grad(
        cols_t.data_ptr(), *cols_t.stride(), grad_panels.data_ptr(), _sample_numel(grad_panels), rows.data_ptr(),
        alpha.shape[2], alpha_t.data_ptr(), _sample_numel(alpha), mixtures.data_ptr(), rows_at.data_ptr(), panels,
        mixtures.shape[1], tiling.cell[1], width, count, batch, grad_alpha.data_ptr(), alpha.numel(),
        grad_warehouse.data_ptr(), threads), f"an inline weight gradient of panel width {width}")
    return grad_alpha.sum(0)


def trains_inline(tiling: Tiling, *tensors: Tensor) -> bool:
    """Whether the compiled kernel can take ``inline_conv``'s backward for these tensors."""
    return input_width(tiling) is not None and _kernel_for(*tensors) is not None


def _backward_kernel(name: str, tiling: Tiling, *tensors: Tensor) -> ctypes.CDLL:
    if not trains_inline(tiling, *tensors):
        raise RuntimeError(f"kwconvert::{name} needs the compiled kernel, float32 CPU tensors and cells of a "
                           f"multiple of 8 input channels (got cells {tiling.cell}); without them the gradient "
                           f"of inline_conv is computed in PyTorch ops")
    return _library()


def cells_from_rows(rows: Tensor, cell: tuple[int, ...]) -> Tensor:
    """``inline_rows``' inverse: the warehouse ``(n, *cell)`` from its rows (a gradient of them)."""
    n, width = rows.shape[1], rows.shape[2]
    f_e, c_e = cell[:2]
    return rows.reshape(f_e // width, c_e, n, width).permute(2, 0, 3, 1).reshape(n, *cell)


@torch.library.custom_op("kwconvert::depthwise", mutates_args=())
def _depthwise(x: Tensor, blocks: Tensor, bias: Tensor | None, stride: list[int], padding: list[int],
               dilation: list[int], kernel: list[int], out_size: list[int]) -> Tensor:
    _check("x", x, 4)
    _check("blocks", blocks, 3)
    batch, channels, height, width = x.shape
    if blocks.shape[0] != batch or _sample_numel(blocks) != math.prod(kernel) * channels \
            or math.prod(kernel) > _MAX_TAPS or (bias is not None and bias.shape != (channels,)):
        raise ValueError(f"kwconvert::depthwise: x {tuple(x.shape)}, blocks {tuple(blocks.shape)} and bias do "
                         f"not fit a {tuple(kernel)} depthwise kernel")
    library = _kernel_for(x, blocks, bias)
    if library is None:
        padded, weight = _folded_depthwise(x, blocks, _pads(x, padding, dilation, kernel, stride, out_size), kernel)
        out = F.conv2d(padded, weight, bias.repeat(batch) if bias is not None else None, stride, 0, dilation,
                       batch * channels)
        return out.view(batch, channels, *out_size).contiguous(memory_format=torch.channels_last)
    x = x.contiguous(memory_format=torch.channels_last)
    blocks = blocks.contiguous()
    bias = None if bias is None else bias.contiguous()
    out = torch.empty(batch, channels, *out_size, dtype=x.dtype, device=x.device, memory_format=torch.channels_last)
    _refused(library.kw_native_depthwise(
        x.data_ptr(), height, width, channels, blocks.data_ptr(), _sample_numel(blocks), _pointer(bias), out.data_ptr(),
        *out_size, *kernel, *stride, *padding, *dilation, batch, torch.get_num_threads()),
        f"a {tuple(kernel)} depthwise kernel")
    return out


@_depthwise.register_fake
def _(x, blocks, bias, stride, padding, dilation, kernel, out_size):
    return torch.empty(x.shape[0], x.shape[1], *out_size, dtype=x.dtype, device=x.device,
                       memory_format=torch.channels_last)


def _depthwise_setup(ctx, inputs, output) -> None:
    x, blocks, bias, stride, padding, dilation, kernel, out_size = inputs
    ctx.geometry = (stride, padding, dilation, kernel, out_size)
    ctx.save_for_backward(x, blocks)


def _pads(x: Tensor, padding: list[int], dilation: list[int], kernel: list[int], stride: list[int],
          out_size: list[int]) -> tuple[int, int, int, int]:
    """``F.pad``'s (left, right, top, bottom) that make a padding-free convolution give
    ``out_size``; right and bottom may be negative (columns the kernel never reads)."""
    (top, left), (dh, dw), (kh, kw), (sh, sw), (out_h, out_w) = padding, dilation, kernel, stride, out_size
    bottom = (out_h - 1) * sh + dh * (kh - 1) + 1 - x.shape[2] - top
    right = (out_w - 1) * sw + dw * (kw - 1) + 1 - x.shape[3] - left
    return left, right, top, bottom


def _folded_depthwise(x: Tensor, blocks: Tensor, pads: tuple[int, int, int, int], kernel: list[int]
                      ) -> tuple[Tensor, Tensor]:
    """The reference's layout: the padded input as one image of ``B * C`` channels and every
    sample's kernel as its ``B * C`` depthwise filters."""
    batch, channels = x.shape[:2]
    padded = F.pad(x, pads)
    padded = padded.reshape(1, batch * channels, *padded.shape[2:])
    weight = blocks.reshape(batch, -1, channels).transpose(1, 2).reshape(batch * channels, 1, *kernel)
    return padded, weight


def _depthwise_backward(ctx, grad: Tensor):
    """ATen's convolution backward on the batch folded into the groups."""
    x, blocks = ctx.saved_tensors
    stride, padding, dilation, kernel, out_size = ctx.geometry
    batch, channels = x.shape[:2]
    pads = _pads(x, padding, dilation, kernel, stride, out_size)
    padded, weight = _folded_depthwise(x, blocks, pads, kernel)
    needs = ctx.needs_input_grad
    grad_x, grad_weight, _ = torch.ops.aten.convolution_backward(
        grad.reshape(1, batch * channels, *out_size), padded, weight, None, stride, [0, 0], dilation, False,
        [0, 0], batch * channels, [needs[0], needs[1], False])
    if needs[0]:
        left, right, top, bottom = pads
        grad_x = F.pad(grad_x.view(batch, channels, *grad_x.shape[2:]), (-left, -right, -top, -bottom))
    if needs[1]:
        grad_weight = grad_weight.view(batch, channels, -1).transpose(1, 2).reshape(blocks.shape)
    grad_bias = grad.sum(dim=(0, 2, 3)) if needs[2] else None
    return grad_x, grad_weight, grad_bias, None, None, None, None, None


_depthwise.register_autograd(_depthwise_backward, setup_context=_depthwise_setup)


def depthwise(x: Tensor, blocks: Tensor, bias: Tensor | None, stride: tuple[int, int], padding: tuple[int, int],
              dilation: tuple[int, int], kernel: tuple[int, int], out_size: tuple[int, int]) -> Tensor:
    """A depthwise layer, each sample with its own kernel: ``(B, C, OH, OW)``, channels-last.

    ``x`` is the channels-last input ``(B, C, H, W)``, ``blocks`` the assembly's output
    ``(B, m, f_e)``, which for a depthwise layer is each sample's ``(kh * kw, C)`` kernel in
    that order; ``padding`` is the zero padding at the top and the left.  The operator
    ``torch.ops.kwconvert.depthwise``.
    """
    return _depthwise(x, blocks, bias, list(stride), list(padding), list(dilation), list(kernel), list(out_size))


# --- the im2col and its gradient ----------------------------------------------------------
#
# The per-sample products read the NHWC im2col of a channels-last image; ``padding`` is (top,
# bottom, left, right) zeros.  The compiled routines gather it without a padded copy of the
# image, and its gradient without a padded, zeroed one (``kw_native_im2col``: on a 28 x 28 net at
# batch 64 the transposed im2col of stage 3 took 3.2 ms in PyTorch's strided copy).


def output_size(size: tuple[int, int], kernel: list[int], stride: list[int], dilation: list[int],
                padding: list[int]) -> tuple[int, int]:
    """``(OH, OW)`` of a convolution of an image of ``size`` (H, W)."""
    top, bottom, left, right = padding
    return tuple((length + before + after - d * (k - 1) - 1) // s + 1 for length, before, after, k, s, d in
                 zip(size, (top, left), (bottom, right), kernel, stride, dilation))


def windows(x: Tensor, kernel: list[int], stride: list[int], dilation: list[int], padding: list[int]) -> Tensor:
    """The ``(B, OH, OW, C, kh, kw)`` windows of ``x (B, C, H, W)``, a view of it (of its padded copy)."""
    rows = x.permute(0, 2, 3, 1)
    top, bottom, left, right = padding
    if top or bottom or left or right:
        rows = F.pad(rows, (0, 0, left, right, top, bottom))
    out_h, out_w = output_size(x.shape[2:], kernel, stride, dilation, padding)
    (kh, kw), (sh, sw), (dh, dw) = kernel, stride, dilation
    # dilation takes every d-th row of a wider window
    view = rows.unfold(1, dh * (kh - 1) + 1, sh)[..., ::dh].unfold(2, dw * (kw - 1) + 1, sw)[..., ::dw]
    return view[:, :out_h, :out_w]


def _geometry(kernel: list[int], stride: list[int], dilation: list[int], padding: list[int]) -> list[int]:
    """The compiled routines' window arguments: kh, kw, sh, sw, top, left, dh, dw."""
    return [*kernel, *stride, padding[0], padding[2], *dilation]


@torch.library.custom_op("kwconvert::im2col", mutates_args=())
def _im2col(x: Tensor, kernel: list[int], stride: list[int], dilation: list[int], padding: list[int],
            transposed: bool) -> Tensor:
    _check("x", x, 4)
    batch, channels, height, width = x.shape
    out_h, out_w = output_size((height, width), kernel, stride, dilation, padding)
    library = _kernel_for(x)
    if library is None:
        view = windows(x, kernel, stride, dilation, padding)
        order = (0, 4, 5, 3, 1, 2) if transposed else (0, 1, 2, 4, 5, 3)
        cols = view.permute(*order).reshape(_im2col_shape(x, kernel, (out_h, out_w), transposed))
        same = cols.untyped_storage().data_ptr() == x.untyped_storage().data_ptr()
        return cols.clone() if same else cols  # an operator's output never aliases its input
    x = x.contiguous(memory_format=torch.channels_last)
    cols = x.new_empty(_im2col_shape(x, kernel, (out_h, out_w), transposed))
    _refused(library.kw_native_im2col(x.data_ptr(), height, width, channels, cols.data_ptr(), out_h, out_w,
                                      *_geometry(kernel, stride, dilation, padding), int(transposed), batch,
                                      torch.get_num_threads()), "an im2col")
    return cols


def _im2col_shape(x: Tensor, kernel: list[int], out_size: tuple[int, int], transposed: bool) -> tuple[int, int, int]:
    depth, pixels = x.shape[1] * math.prod(kernel), math.prod(out_size)
    return (x.shape[0], depth, pixels) if transposed else (x.shape[0], pixels, depth)


@_im2col.register_fake
def _(x, kernel, stride, dilation, padding, transposed):
    return x.new_empty(_im2col_shape(x, kernel, output_size(x.shape[2:], kernel, stride, dilation, padding),
                                     transposed))


def _im2col_setup(ctx, inputs, output) -> None:
    x, kernel, stride, dilation, padding, transposed = inputs
    ctx.window = (list(x.shape), kernel, stride, dilation, padding, transposed)


def _im2col_backward(ctx, grad: Tensor):
    shape, kernel, stride, dilation, padding, transposed = ctx.window
    grad = grad.transpose(1, 2) if transposed else grad
    return _col2im(grad.contiguous(), shape, kernel, stride, dilation, padding), None, None, None, None, None


_im2col.register_autograd(_im2col_backward, setup_context=_im2col_setup)


@torch.library.custom_op("kwconvert::col2im", mutates_args=())
def _col2im(cols: Tensor, shape: list[int], kernel: list[int], stride: list[int], dilation: list[int],
            padding: list[int]) -> Tensor:
    _check("cols", cols, 3)
    batch, channels, height, width = shape
    out_h, out_w = output_size((height, width), kernel, stride, dilation, padding)
    library = _kernel_for(cols)
    if library is None:
        grid = cols.view(batch, out_h, out_w, *kernel, channels).permute(0, 3, 4, 1, 2, 5)
        return sum_windows(grid, shape, stride, dilation, padding)
    cols = cols.contiguous()
    image = cols.new_empty(batch, height, width, channels)
    _refused(library.kw_native_col2im(cols.data_ptr(), height, width, channels, image.data_ptr(), out_h, out_w,
                                      *_geometry(kernel, stride, dilation, padding), batch,
                                      torch.get_num_threads()), "a col2im")
    return image.permute(0, 3, 1, 2)


def sum_windows(grid: Tensor, shape: list[int], stride: list[int], dilation: list[int], padding: list[int]
                ) -> Tensor:
    """The channels-last image ``shape (B, C, H, W)`` whose pixels sum what the windows hold:
    ``grid[:, i, j]`` is ``(B, OH, OW, *channels)`` for kernel position (i, j), the channels
    flattening to C.  Strided in-place adds into a zeroed padded image, one per kernel position."""
    batch, channels, height, width = shape
    (sh, sw), (dh, dw), (out_h, out_w) = stride, dilation, grid.shape[3:5]
    top, bottom, left, right = padding
    padded = grid.new_zeros(batch, height + top + bottom, width + left + right, *grid.shape[5:])
    for i in range(grid.shape[1]):
        for j in range(grid.shape[2]):
            rows = slice(i * dh, i * dh + sh * (out_h - 1) + 1, sh)
            columns = slice(j * dw, j * dw + sw * (out_w - 1) + 1, sw)
            padded[:, rows, columns].add_(grid[:, i, j])
    image = padded.view(batch, *padded.shape[1:3], channels)[:, top:top + height, left:left + width]
    return image.permute(0, 3, 1, 2).contiguous(memory_format=torch.channels_last)


@_col2im.register_fake
def _(cols, shape, kernel, stride, dilation, padding):
    batch, channels, height, width = shape
    return cols.new_empty(batch, height, width, channels).permute(0, 3, 1, 2)


def _col2im_setup(ctx, inputs, output) -> None:
    cols, shape, kernel, stride, dilation, padding = inputs
    ctx.window = (kernel, stride, dilation, padding)


def _col2im_backward(ctx, grad: Tensor):
    return _im2col(grad, *ctx.window, False), None, None, None, None, None


_col2im.register_autograd(_col2im_backward, setup_context=_col2im_setup)


def im2col(x: Tensor, kernel: tuple[int, int], stride: tuple[int, int], dilation: tuple[int, int],
           padding: tuple[int, int, int, int], transposed: bool = False) -> Tensor:
    """The NHWC im2col of ``x (B, C, H, W)``: ``(B, OH * OW, kh * kw * C)`` in OHWI's K order, or
    ``transposed`` ``(B, kh * kw * C, OH * OW)``; always a new tensor.  The operator
    ``torch.ops.kwconvert.im2col``."""
    return _im2col(x, list(kernel), list(stride), list(dilation), list(padding), transposed)


def col2im(cols: Tensor, shape: torch.Size, kernel: tuple[int, int], stride: tuple[int, int],
           dilation: tuple[int, int], padding: tuple[int, int, int, int]) -> Tensor:
    """``im2col``'s gradient: the channels-last image ``shape (B, C, H, W)`` whose pixels sum the
    rows of ``cols (B, OH * OW, kh * kw * C)`` that read them.  The operator
    ``torch.ops.kwconvert.col2im``."""
    return _col2im(cols, list(shape), list(kernel), list(stride), list(dilation), list(padding))


# --- the assembly ---------------------------------------------------------------------------
#
# The assembly ``alpha (M, n) @ warehouse (n, cell)`` has few rows at batch 1 and reads the
# whole warehouse: a library GEMM packs the warehouse on every call, which costs as much as
# the product.  Packed once in panels of ``width`` columns (``mix_panels``), the warehouse
# is read by ``kw_native_mix`` a block of panels at a time (every row tile over a block in L2).


def mix_width(columns: int) -> int | None:
    """Panel width for a warehouse of ``columns`` elements per cell (None: the kernel cannot):
    the widest the copy's register tile reads at once (64 columns with AVX-512, 16 else),
    so that a panel of the warehouse stays in the L1 cache across the tiles of rows."""
    widest = 64 if isa() == "avx512" else 16
    return next((width for width in _PANEL_WIDTHS if width <= widest and columns % width == 0), None)


def mixes_half() -> bool:
    """Whether the copy that runs converts a float16 warehouse as it reads it (AVX2's F16C and AVX-512;
    not the baseline copy)."""
    return isa() in ("avx2", "avx512")


def mix_panels(matrix: Tensor) -> Tensor:
    """The warehouse matrix ``(n, columns)`` packed for ``mix``: ``(columns / width, n, width)``."""
    n, columns = matrix.shape
    return matrix.reshape(n, columns // mix_width(columns), -1).transpose(0, 1).contiguous()


@torch.library.custom_op("kwconvert::mix", mutates_args=())
def _mix(alpha: Tensor, panels: Tensor) -> Tensor:
    _check("alpha", alpha, 2)
    _check("panels", panels, 3)
    count, n, width = panels.shape
    if alpha.shape[1] != n or width not in _PANEL_WIDTHS:
        raise ValueError(f"kwconvert::mix: alpha {tuple(alpha.shape)} does not fit panels {tuple(panels.shape)}")
    half = panels.dtype == torch.float16
    library = _kernel_for(alpha, None if half else panels)
    if library is None or (half and not mixes_half()) or panels.device != alpha.device:
        return torch.einsum("rn,pnw->rpw", alpha, panels.to(alpha)).reshape(alpha.shape[0], -1)
    alpha = alpha.contiguous()
    if half or panels.stride(2) != 1:  # float32 panels are read in place: rows row_stride apart
        panels = panels.contiguous()
    out = torch.empty(alpha.shape[0], count * width, dtype=alpha.dtype, device=alpha.device)
    _refused(library.kw_native_mix(alpha.data_ptr(), alpha.shape[0], n, panels.data_ptr(), panels.stride(0),
                                   panels.stride(1), count, width, half, out.data_ptr(), torch.get_num_threads()),
             f"a{' float16' if half else 'n'} assembly of panel width {width}")
    return out


@_mix.register_fake
def _(alpha, panels):
    return alpha.new_empty(alpha.shape[0], panels.shape[0] * panels.shape[2])


def _mix_setup(ctx, inputs, output) -> None:
    ctx.save_for_backward(*inputs)


def _mix_backward(ctx, grad: Tensor):
    alpha, panels = ctx.saved_tensors
    count, n, width = panels.shape
    grad_rows = grad.view(-1, count, width)
    grad_alpha = torch.einsum("rpw,pnw->rn", grad_rows, panels.to(grad)) if ctx.needs_input_grad[0] else None
    grad_panels = torch.einsum("rn,rpw->pnw", alpha, grad_rows).to(panels) if ctx.needs_input_grad[1] else None
    return grad_alpha, grad_panels


_mix.register_autograd(_mix_backward, setup_context=_mix_setup)


def mix(alpha: Tensor, panels: Tensor) -> Tensor:
    """``alpha (M, n) @ warehouse (n, columns)`` from the warehouse's ``mix_panels``: ``(M, columns)``
    in alpha's dtype; ``panels`` may be a float16 copy (``mixes_half``).  The operator
    ``torch.ops.kwconvert.mix``."""
    return _mix(alpha, panels)


# --- mixing the inputs instead of the kernels (paths.py's "premix") --------------------------
#
# On small maps a sample's kernel costs more than its convolution: "premix" mixes the im2col
# rows per cell with the attentions, ``mixed[b, ob, l] (n, c_e) = weights[b, ob] (n, S) @
# cols[b, l] (S, c_e)`` (S = kernel positions x input blocks), and multiplies them by the whole
# warehouse in one product.  These sums are S = 9-18 long, which the register tiles' runs take.


def premixes(c_e: int) -> bool:
    """Whether the compiled kernel mixes inputs of c_e channels per cell (a multiple of 16, which
    every copy's dot products and panels divide)."""
    return available() and c_e % 16 == 0


def _positions_of(cols: Tensor, c_e: int) -> Tensor:
    """cols ``(B, L, S * c_e)`` as ``(B, S, L * c_e)``: the PyTorch fallbacks' batched products' layout."""
    batch, length = cols.shape[:2]
    return cols.view(batch, length, -1, c_e).transpose(1, 2).reshape(batch, -1, length * c_e)


def _premix_operands(op: str, fits: bool, n: int, c_e: int, **operands: Tensor) -> None:
    """What ``premix`` and its gradients assume of their operands' shapes, said as an error."""
    if not fits:
        shapes = ", ".join(f"{name} {tuple(tensor.shape)}" for name, tensor in operands.items())
        raise ValueError(f"kwconvert::{op}: {shapes} do not fit {n} cells of {c_e} input channels")


def _mixed_by_cell(grad_mixed: Tensor, batch: int, length: int, n: int, c_e: int) -> Tensor:
    """grad_mixed ``(B * OB * L, n * c_e)`` as ``(B, OB * n, L * c_e)`` (the fallbacks' layout)."""
    grid = grad_mixed.view(batch, -1, length, n, c_e)  # (B, OB, L, n, c_e)
    return grid.transpose(2, 3).reshape(batch, -1, length * c_e)


@torch.library.custom_op("kwconvert::premix", mutates_args=())
def _premix(cols: Tensor, weights: Tensor, n: int, c_e: int) -> Tensor:
    _check("cols", cols, 3)
    _check("weights", weights, 3)
    batch, length, depth = cols.shape
    _premix_operands("premix", weights.shape[0] == batch and weights.shape[1] % n == 0
                     and depth == weights.shape[2] * c_e, n, c_e, cols=cols, weights=weights)
    library = _kernel_for(cols, weights)
    if library is None or not premixes(c_e):
        mixed = torch.bmm(weights, _positions_of(cols, c_e))  # (B, OB * n, L * c_e)
        grid = mixed.view(batch, -1, n, length, c_e).transpose(2, 3)
        return grid.reshape(-1, n * c_e)
    cols, weights = cols.contiguous(), weights.contiguous()
    blocks_out, segments = weights.shape[1] // n, weights.shape[2]
    out = cols.new_empty(batch * blocks_out * length, n * c_e)
    _refused(library.kw_native_premix(cols.data_ptr(), weights.data_ptr(), out.data_ptr(), batch, length, segments,
                                      c_e, blocks_out, n, mix_width(c_e), torch.get_num_threads()),
             f"mixing inputs of {c_e} channels")
    return out


@_premix.register_fake
def _(cols, weights, n, c_e):
    return cols.new_empty(cols.shape[0] * (weights.shape[1] // n) * cols.shape[1], n * c_e)


@torch.library.custom_op("kwconvert::premix_input_grad", mutates_args=())
def _premix_input_grad(grad_mixed: Tensor, weights: Tensor, length: int, c_e: int) -> Tensor:
    _check("grad_mixed", grad_mixed, 2)
    _check("weights", weights, 3)
    batch, rows, segments = weights.shape
    n = grad_mixed.shape[1] // c_e
    _premix_operands("premix_input_grad", n * c_e == grad_mixed.shape[1] and n > 0 and rows % n == 0
                     and grad_mixed.shape[0] == batch * rows // n * length, n, c_e, grad_mixed=grad_mixed,
                     weights=weights)
    library = _kernel_for(grad_mixed, weights)
    if library is None or not premixes(c_e):
        grad = torch.bmm(weights.transpose(1, 2), _mixed_by_cell(grad_mixed, batch, length, n, c_e))  # (B, S, L * c_e)
        return grad.view(batch, segments, length, c_e).transpose(1, 2).reshape(batch, length, segments * c_e)
    grad_mixed = grad_mixed.contiguous()
    weights_t = weights.view(batch, rows // n, n, segments).transpose(2, 3).contiguous()
    out = grad_mixed.new_empty(batch, length, segments * c_e)
    _refused(library.kw_native_premix_input_grad(grad_mixed.data_ptr(), weights_t.data_ptr(), out.data_ptr(), batch,
                                                 length, segments, c_e, rows // n, n, mix_width(c_e),
                                                 torch.get_num_threads()),
             f"the gradient of mixing inputs of {c_e} channels")
    return out


@_premix_input_grad.register_fake
def _(grad_mixed, weights, length, c_e):
    return grad_mixed.new_empty(weights.shape[0], length, weights.shape[2] * c_e)


@torch.library.custom_op("kwconvert::premix_weight_grad", mutates_args=())
def _premix_weight_grad(grad_mixed: Tensor, cols: Tensor, n: int, c_e: int) -> Tensor:
    _check("grad_mixed", grad_mixed, 2)
    _check("cols", cols, 3)
    batch, length, depth = cols.shape
    segments, blocks_out = depth // c_e, grad_mixed.shape[0] // max(batch * length, 1)
    _premix_operands("premix_weight_grad", depth % c_e == 0 and grad_mixed.shape[1] == n * c_e
                     and grad_mixed.shape[0] == batch * blocks_out * length, n, c_e, grad_mixed=grad_mixed,
                     cols=cols)
    library = _kernel_for(grad_mixed, cols)
    if library is None or not premixes(c_e):
        return torch.bmm(_mixed_by_cell(grad_mixed, batch, length, n, c_e), _positions_of(cols, c_e).transpose(1, 2))
    grad_mixed, cols = grad_mixed.contiguous(), cols.contiguous()
    out = cols.new_empty(batch, blocks_out * n, segments)
    _refused(library.kw_native_premix_weight_grad(grad_mixed.data_ptr(), cols.data_ptr(), out.data_ptr(), batch,
                                                  length, segments, c_e, blocks_out, n, torch.get_num_threads()),
             f"the attentions' gradient of mixing inputs of {c_e} channels")
    return out


@_premix_weight_grad.register_fake
def _(grad_mixed, cols, n, c_e):
    batch, length, depth = cols.shape
    return cols.new_empty(batch, grad_mixed.shape[0] // max(batch * length, 1) * n, depth // c_e)


def premix(cols: Tensor, weights: Tensor, n: int, c_e: int) -> Tensor:
    """The rows ``(B * OB * L, n * c_e)``, laid out ``(B, OB, L, n, c_e)``, of every pixel's inputs
    mixed per cell: ``weights[b, ob] (n, S) @ cols[b, l] (S, c_e)`` for the NHWC im2col ``cols
    (B, L, S * c_e)`` and ``weights (B, OB * n, S)``.  The operator ``torch.ops.kwconvert.premix``;
    its gradients are ``premix_input_grad`` and ``premix_weight_grad`` (the caller's autograd
    node runs them)."""
    return _premix(cols, weights, n, c_e)


def premix_input_grad(grad_mixed: Tensor, weights: Tensor, length: int, c_e: int) -> Tensor:
    """``(B, L, S * c_e)``: the gradient of ``premix``'s cols, ``sum_ob weights[b, ob]^T @
    grad_mixed[b, ob, l]``."""
    return _premix_input_grad(grad_mixed, weights, length, c_e)


def premix_weight_grad(grad_mixed: Tensor, cols: Tensor, n: int, c_e: int) -> Tensor:
    """``(B, OB * n, S)``: the gradient of ``premix``'s weights, ``sum_l grad_mixed[b, ob, l] @
    cols[b, l]^T``."""
    return _premix_weight_grad(grad_mixed, cols, n, c_e)
