"""The compiled per-sample convolution (``kwconvert/_native.c``) and its ctypes binding.

Why: a library GEMM given a new weight per sample re-packs it on every call, and the
assembly leaves the kernels in an order (kernel position before output channel) that
needs a copy into OHWI first.  Together they cost a fifth of resnet18's KW layer4.  The
compiled product instead reads each sample's kernel straight from the assembly's output:
the warehouse is packed with every cell's elements in *panel order* (``panel_order``),
so that the assembly writes, for each run of ``NP`` output channels and each cell, a
row-major ``(c_e, NP)`` block, and the product walks those blocks through a table of
offsets.  Inference only; training keeps the pure-PyTorch paths (``kwconvert.fast``).

The extension is built by ``pip install`` with the machine's compiler (``setup.py``;
optional: when it does not build, ``available()`` is False and ``kwconvert.fast`` never
offers the ``"native"`` path).  ``KWCONVERT_NATIVE=0`` in the environment turns it off.
Its results equal the pure-PyTorch paths to float rounding (tests/test_native.py).
"""
from __future__ import annotations

import ctypes
import functools
import importlib.util
import os
import warnings

import torch
from torch import Tensor

from .cells import Tiling

__all__ = ["available", "conv", "depthwise", "is_depthwise", "panel_order", "panel_width", "supports"]

_PANEL_WIDTHS = (64, 32, 16, 8)
_MAX_SEGMENTS = 1024  # as in _native.c
_MAX_TAPS = 64  # kernel positions of a depthwise layer, as in _native.c


@functools.cache
def _library() -> ctypes.CDLL | None:
    if os.environ.get("KWCONVERT_NATIVE", "1") == "0":
        return None
    spec = importlib.util.find_spec("kwconvert._native")
    if spec is None or spec.origin is None or not spec.origin.endswith((".so", ".pyd", ".dylib")):
        return None
    library = ctypes.CDLL(spec.origin)
    pointer, size, i32 = ctypes.c_void_p, ctypes.c_long, ctypes.c_int
    library.kw_native_conv.argtypes = [pointer, size, size, pointer, size, pointer, i32, i32, i32, i32, pointer,
                                       size, size, pointer, i32, size, i32]
    library.kw_native_conv.restype = i32
    library.kw_native_depthwise.argtypes = [pointer, i32, i32, i32, pointer, size, pointer, pointer] + [i32] * 12
    library.kw_native_depthwise.restype = i32
    library.kw_native_avx512.restype = i32
    if library.kw_native_avx512() and not cpu_has_avx512():
        # built with -march=native on an AVX-512 machine and moved to one without: calling
        # in would end the process with an illegal instruction
        warnings.warn("kwconvert's compiled kernel was built for a CPU with AVX-512 and this one has none: "
                      "reinstall kwconvert on this machine (pip install -e .); the pure-PyTorch paths run meanwhile",
                      RuntimeWarning, stacklevel=2)
        return None
    return library


def cpu_has_avx512() -> bool:
    """Whether this CPU has AVX-512F (Linux's /proc/cpuinfo; elsewhere assumed, as the build was)."""
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            return any(line.startswith("flags") and " avx512f" in line for line in cpuinfo)
    except OSError:
        return True


def available() -> bool:
    """Whether the compiled extension is built and loaded (``KWCONVERT_NATIVE=0``: never)."""
    return _library() is not None


def avx512() -> bool:
    """Whether the extension was compiled for AVX-512 (else it runs a plain C loop)."""
    library = _library()
    return bool(library is not None and library.kw_native_avx512())


def panel_width(tiling: Tiling) -> int | None:
    """Output channels per panel: the widest of 64, 32, 16, 8 dividing the cell's f_e."""
    return next((width for width in _PANEL_WIDTHS if tiling.cell[0] % width == 0), None)


def is_depthwise(tiling: Tiling, groups: int) -> bool:
    """One input channel per group and one output channel per input channel."""
    return groups > 1 and tiling.weight_shape[1] == 1 and tiling.weight_shape[0] == groups


def supports(tiling: Tiling, groups: int, x: Tensor) -> bool:
    """Whether the compiled kernel can run this layer: float32 on CPU, 1x1 cells, and either
    no groups with f_e a multiple of 8 (``conv``) or a depthwise layer (``depthwise``); never
    under torch.compile (an opaque foreign call would break the graph)."""
    if torch.compiler.is_compiling() or not available() or x.device.type != "cpu" or x.dtype != torch.float32 \
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
    """``offsets[P, g]``: where panel P's rows of segment g start in one sample's blocks."""
    f_e, c_e = tiling.cell[:2]
    cell = f_e * c_e
    out_channels = tiling.weight_shape[0]
    blocks_out, blocks_in, spatial = tiling.blocks_out, tiling.blocks_in, tiling.spatial
    offsets = torch.empty(out_channels // width, spatial * blocks_in, dtype=torch.int64)
    for panel in range(out_channels // width):
        block_out, within = divmod(panel * width, f_e)
        for position in range(spatial):
            for block_in in range(blocks_in):
                mixture = (position * blocks_out + block_out) * blocks_in + block_in
                offsets[panel, position * blocks_in + block_in] = mixture * cell + within * c_e
    return offsets


def _pointer(tensor: Tensor | None) -> int | None:
    return None if tensor is None else tensor.data_ptr()


def conv(tiling: Tiling, cols: Tensor, blocks: Tensor, bias: Tensor | None) -> Tensor:
    """Every sample's product ``cols[b] @ kernel_b^T`` (+ bias): ``(B, rows, C_out)``.

    ``cols`` is the NHWC im2col ``(B, rows, K)`` (K in OHWI's order), ``blocks`` the
    assembly's output ``(B, m, cell)`` from a warehouse in ``panel_order``.  Work is split
    over ``torch.get_num_threads()`` OpenMP threads (torch's own pool); the GIL is released
    meanwhile.
    """
    library = _library()
    width = panel_width(tiling)
    cols, blocks = cols.contiguous(), blocks.contiguous()
    bias = None if bias is None else bias.detach().contiguous()
    offsets = _offsets(tiling, width)
    batch, rows, depth = cols.shape
    out_channels = tiling.weight_shape[0]
    out = torch.empty(batch, rows, out_channels, dtype=cols.dtype, device=cols.device)
    panels, segments = offsets.shape
    code = library.kw_native_conv(
        cols.data_ptr(), rows * depth, depth, blocks.data_ptr(), blocks[0].numel(), offsets.data_ptr(), panels,
        segments, tiling.cell[1], width, out.data_ptr(), rows * out_channels, out_channels, _pointer(bias), rows,
        batch, torch.get_num_threads())
    if code:
        raise RuntimeError(f"kwconvert native kernel refused panel width {width} / {segments} segments")
    return out


def depthwise(x: Tensor, blocks: Tensor, bias: Tensor | None, stride: tuple[int, int], padding: tuple[int, int],
              dilation: tuple[int, int], kernel: tuple[int, int], out_size: tuple[int, int]) -> Tensor:
    """A depthwise layer, each sample with its own kernel: ``(B, C, OH, OW)``, channels-last.

    ``x`` is the channels-last input ``(B, C, H, W)``, ``blocks`` the assembly's output
    ``(B, m, f_e)``, which for a depthwise layer is each sample's ``(kh * kw, C)`` kernel in
    that order; ``padding`` is the zero padding at the top and the left.
    """
    batch, channels, height, width = x.shape
    x = x.contiguous(memory_format=torch.channels_last)
    blocks = blocks.contiguous()
    bias = None if bias is None else bias.detach().contiguous()
    out_h, out_w = out_size
    out = torch.empty(batch, channels, out_h, out_w, dtype=x.dtype, device=x.device,
                      memory_format=torch.channels_last)
    code = _library().kw_native_depthwise(
        x.data_ptr(), height, width, channels, blocks.data_ptr(), blocks[0].numel(), _pointer(bias), out.data_ptr(),
        out_h, out_w, *kernel, *stride, *padding, *dilation, batch, torch.get_num_threads())
    if code:
        raise RuntimeError(f"kwconvert native kernel refused a {kernel} depthwise kernel")
    return out
