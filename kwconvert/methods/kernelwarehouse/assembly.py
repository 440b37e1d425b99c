"""KernelWarehouse's assembly on CPU: ``w_i = sum_j alpha_ij e_j`` for every mixture of every
sample (paper Sec. 3.2), and the packed warehouse copies that make it fast in inference.

The assembly reads the whole warehouse in every layer.  Given the warehouse as a plain
matrix, a library GEMM packs it on every call, which costs as much as the product in the
few-row products of batch 1 (a whole KW resnet18 / resnet50 at batch 1 ran 1.6-1.8x slower),
and its inner size n is too short for the library in training too.  So the compiled kernel's
``native.mix`` takes the products it can: in training it reads the warehouse (and, for the
cells' gradient, the kernels' gradient) where it lies (``_mix_in_place``, ``mix_grads``), the
library's ``F.linear`` keeping the small ones (``KERNEL_MACS``) and the dtypes and devices the
kernel does not read.  In inference (no gradient needed) ``native.mix`` reads a
copy packed once (so does "inline", in training too), reused while the cells keep their
storage, no optimizer has stepped and no state dict was loaded since (``_generation``, moved
by public hooks) and a sample of their values is unchanged (the sample catches most edits by
hand; ``cells_changed()`` says so for any other).  A graph compiled for inference reads the same
copies: its operators ``mix_cached`` and ``inline_conv_cached`` take the cells and look the copy
up when the graph runs.  A warehouse may be served from a float16
copy (``serve_half``): half the bytes that every layer of its stage reads whole.
"""
from __future__ import annotations

import contextlib
import math
import threading
import weakref
from typing import Iterator

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.optim.optimizer import register_optimizer_step_post_hook

from ...execution import ThreadSetting
from . import native
from .cells import Tiling

#: Guards the packed copies (two threads meeting a new warehouse pack it once).
_lock = threading.RLock()
_PROBES = 256
#: id(cells) -> {(panel width, layout, float16): (key, probe, packed)}; entries die with the cells
_packed: dict[int, dict[tuple[int | None, str, bool], tuple]] = {}
#: id(cells) of the warehouses whose packed copy for ``native.mix`` is float16 (``serve_half``)
_half: set[int] = set()
#: Moves whenever cells may have changed in place: every packed copy made before is stale.
_generation = 0
#: (id(cells), panel width) -> weak references to (the packed rows, ``_RowsOfCells``' output on them),
#: and where the layers reading that output add their gradients up
_training_rows: dict[tuple[int, int], tuple[weakref.ref, weakref.ref, "RowsGradient"]] = {}
_packing: ThreadSetting[bool] = ThreadSetting("kwconvert_packing", True)


@contextlib.contextmanager
def packing(enabled: bool) -> Iterator[None]:
    """Allow or forbid packed warehouse copies inside the block (this thread only): those of the
    assembly in inference and those "inline" reads, in training too."""
    with _packing.set_to(enabled):
        yield


def clear_packed() -> None:
    """Drop every packed warehouse copy."""
    with _lock:
        _packed.clear()
        _training_rows.clear()


def cells_changed(*_) -> None:
    """Say that warehouse cells were changed in place, so that no packed copy made before
    serves again.  Called after every optimizer step (a hook on all torch optimizers) and
    after a warehouse loads a state dict; call it after editing cells by hand.

    The stale copies are dropped at once: kept until the next step's layers packed anew, the
    copies for "inline"'s input gradient (made in backward) lived through the next forward into
    the next backward, the peak of a training step, beside the fresh ones (resnet50 at batch 8:
    its stage-4 warehouses are 85 MB in each layout)."""
    global _generation
    with _lock:
        _generation += 1
        for entries in _packed.values():  # emptied, not removed: each keeps its finalizer
            entries.clear()
        _training_rows.clear()


register_optimizer_step_post_hook(cells_changed)


def serve_half(cells: Tensor, enabled: bool) -> None:
    """Serve the inference assembly of ``cells`` from a float16 copy (or again from float32).

    Where the compiled kernel converts float16 on load (``native.mixes_half``), the assembly reads
    half the bytes: at batch 1 every layer streams its stage's whole warehouse from memory
    (resnet50's stage 3: 36 MB in float32, per layer).  Training and the
    "inline" path read the float32 cells as before.  The choice follows the cells tensor (a deep
    copy of the model serves float32 again).
    """
    with _lock:
        if enabled and id(cells) not in _half:
            _half.add(id(cells))
            weakref.finalize(cells, _half.discard, id(cells))
        elif not enabled:
            _half.discard(id(cells))


def serves_half(cells: Tensor) -> bool:
    """Whether ``serve_half`` was asked for these cells."""
    return id(cells) in _half


def _kernel_reads(cells: Tensor) -> bool:
    """Whether the compiled kernel's assembly can read these cells (float32, on the CPU)."""
    return cells.device.type == "cpu" and cells.dtype == torch.float32 and native.available()


def _sample(cells: Tensor) -> Tensor:
    """About ``_PROBES`` of the cells' values, a view: compared with a copy taken at packing, one
    operator tells whether a copy still serves (taking a new sample every call took six)."""
    flat = cells.detach().reshape(-1)
    return flat[::max(1, flat.numel() // _PROBES)]


def _cell_columns(cells: Tensor, panels: int | None) -> Tensor:
    """The warehouse as an ``(n, cell numel)`` matrix; ``panels``: each cell's elements in
    the compiled kernel's panel order of that width (``native.panel_order``, a copy)."""
    return cells.reshape(cells.shape[0], -1) if panels is None else native.panel_order(cells, panels)


#: How each layout of a packed copy is made from the cells (and the panel width).
_LAYOUTS = {"mix": lambda cells, panels: native.mix_panels(_cell_columns(cells, panels)),
            "rows": native.inline_rows, "columns": native.inline_columns, "panels": native.panel_order}


def _packed_cells(cells: Tensor, panels: int | None = None, layout: str = "mix") -> Tensor | None:
    """The warehouse ``(n, *cell)`` packed for ``native.mix`` (``layout="rows"``: as
    ``native.inline_rows``, ``"columns"``: as ``native.inline_columns``, ``panels`` wide), or
    None where it cannot serve; float16 for ``native.mix`` where ``serve_half`` asked for it and
    the kernel converts it."""
    if torch.compiler.is_compiling() or not (
            _packing.get() and _kernel_reads(cells)
            and (layout != "mix" or native.mix_width(math.prod(cells.shape[1:])) is not None)):
        return None
    key = (cells.data_ptr(), _generation, tuple(cells.shape))
    half = layout == "mix" and id(cells) in _half and native.mixes_half()
    with _lock:
        entries = _packed.get(id(cells))
        entry = None if entries is None else entries.get((panels, layout, half))
        # the sample is a view of the storage the key names: it reads the cells' values now
        if entry is not None and entry[0] == key and torch.equal(entry[1], entry[3]) \
                and (torch.is_inference_mode_enabled() or not entry[2].is_inference()):
            return entry[2]  # (one packed in inference mode cannot be saved by a training graph)
        if entry is not None:  # stale: not kept alive beside the copy that replaces it
            del entries[(panels, layout, half)]
    sample = _sample(cells)
    probe = sample.clone()
    packed = _LAYOUTS[layout](cells.detach(), panels)
    if half:
        packed = packed.half()
    with _lock:
        entries = _packed.get(id(cells))
        if entries is None:
            weakref.finalize(cells, _packed.pop, id(cells), None)
            entries = _packed[id(cells)] = {}
        entries[(panels, layout, half)] = (key, probe, packed, sample)
    return packed


def panel_ordered(cells: Tensor, width: int) -> Tensor:
    """``native.panel_order(cells, width)``, from the packed copy where one may serve
    (``cached_inline``): the batched and premixed paths read the whole warehouse in that order in
    every layer's forward and backward, and copying it each time cost resnet50's training step at
    batch 8 its stage-3 warehouse (35 MB) 26 times, 259 ms of 2.2 s on an Intel Xeon."""
    return cached_inline(cells, width, "panels")


def cached_inline(cells: Tensor, width: int, layout: str = "rows") -> Tensor:
    """The warehouse as ``native.inline_conv`` reads it (``layout="columns"``: as
    ``native.inline_input_grad`` reads it where a second copy is small; ``"panels"``: as
    ``panel_ordered`` reads it): the packed copy where one may serve, else packed now.  Training uses the copies too: every layer of a stage reads the
    same warehouse, forward and backward, between two optimizer steps (packing resnet18's stage-4
    warehouse took 33 ms, 15 times a step)."""
    packed = _packed_cells(cells, width, layout)
    return _LAYOUTS[layout](cells, width) if packed is None else packed  # a graph's: differentiable


class _RowsOfCells(torch.autograd.Function):
    """The packed rows copy of the cells as a node of the training graph: the layers that read
    it add their warehouse gradients up in its layout (``RowsGradient``), and this node puts
    the sum in the cells' layout once (``native.cells_from_rows``, a permuting copy)."""

    @staticmethod
    def forward(ctx, cells: Tensor, packed: Tensor) -> Tensor:
        ctx.cell = tuple(cells.shape[1:])
        return packed.detach()  # the copy's storage, not a second copy

    @staticmethod
    def backward(ctx, grad: Tensor):
        return native.cells_from_rows(grad, ctx.cell), None


class RowsGradient:
    """Where the layers reading one ``_RowsOfCells`` node add their gradients of the rows up in a
    backward pass, in one tensor.

    The first layer the pass reaches returns a new gradient to autograd, which holds it for the
    node until the node runs, and this keeps a weak reference to it; the next layers add theirs
    into it (``native.inline_weight_grad(into=...)``) and return none.  Each layer returning a
    gradient of its own, autograd added each into the sum: a new tensor of the whole warehouse per
    layer (resnet50's stage 4 at b = 1: 47 MB, 14 ms of fresh pages in a default process), read
    again to be added.  A pass that does not run the node drops the first gradient at once, so
    no sum outlives its pass.
    """

    def __init__(self) -> None:
        self._sum: weakref.ref | None = None

    def sum_so_far(self) -> Tensor | None:
        """The gradient this pass's layers add into, or None: the layer asking is the first."""
        return None if self._sum is None else self._sum()

    def started(self, gradient: Tensor) -> None:
        """``gradient``, returned to autograd by the pass's first layer, is where the next add theirs."""
        self._sum = weakref.ref(gradient)


def training_rows(cells: Tensor, width: int) -> tuple[Tensor, RowsGradient | None]:
    """The warehouse as ``native.inline_conv`` reads it, differentiable with respect to the cells,
    for "inline"'s training graph, and where its layers add their gradients up (None: each
    returns its own).

    Every layer of a stage reads the same packed copy between two optimizer steps, and here they
    also share one node of the graph (``_RowsOfCells``, kept while a graph holds it): the
    gradients of the rows add up in the rows' layout (``RowsGradient``) and are turned into the
    cells' once per backward pass, not once per layer.  Per layer that permuting copy was a fresh
    tensor of the whole warehouse (resnet50's stage 4 at b = 1: 47 MB, 15 ms in new pages, 8
    layers) alive beside the rows' gradient it came from.  Without a packed copy (packing off, a
    graph being compiled) the rows are packed now, through autograd."""
    packed = _packed_cells(cells, width, "rows")
    if packed is None or not _needs_grad(cells):
        return (_LAYOUTS["rows"](cells, width) if packed is None else packed), None
    with _lock:
        shared = _training_rows.get((id(cells), width))
        rows = shared[1]() if shared is not None and shared[0]() is packed else None
        if rows is None:
            rows = _RowsOfCells.apply(cells, packed)
            # weakly: the graph's node must not keep the cells, nor a stale copy, alive
            shared = _training_rows[(id(cells), width)] = (weakref.ref(packed), weakref.ref(rows), RowsGradient())
        return rows, shared[2]


def _in_graph_reading_copies(cells: Tensor, *tensors: Tensor | None) -> bool:
    """Whether a graph being compiled should call the operators below, which look the packed copy
    up when the graph runs: inference that the compiled kernel reads.  Without them a graph
    packs the warehouse on every call (resnet50 at batch 1: 1.57x eager's time).  Not in
    ``torch.export``: an exported program holds no process's copies."""
    return torch.compiler.is_compiling() and not torch.compiler.is_exporting() and _kernel_reads(cells) \
        and not _needs_grad(cells, *tensors)


@torch.library.custom_op("kwconvert::mix_cached", mutates_args=())
def _mix_cached(alpha: Tensor, cells: Tensor, panels: int) -> Tensor:
    """``_mix_rows`` with a packed copy (``panels`` 0: the cells' own order), for a compiled graph."""
    return _mix_rows(alpha, cells, pack=True, panels=panels or None)


@_mix_cached.register_fake
def _(alpha, cells, panels):
    return alpha.new_empty(alpha.shape[0], math.prod(cells.shape[1:]))


@torch.library.custom_op("kwconvert::inline_conv_cached", mutates_args=())
def _inline_conv_cached(cols: Tensor, alpha: Tensor, cells: Tensor, bias: Tensor | None, weight_shape: list[int],
                        cell: list[int]) -> Tensor:
    """``inline_product`` (run when the graph runs, so on the packed copy), for a compiled graph."""
    return inline_product(Tiling(tuple(weight_shape), tuple(cell)), cols, alpha, cells, bias)


@_inline_conv_cached.register_fake
def _(cols, alpha, cells, bias, weight_shape, cell):
    return cols.new_empty(cols.shape[0], cols.shape[1], weight_shape[0])


def inline_product(tiling: Tiling, cols: Tensor, alpha: Tensor, cells: Tensor, bias: Tensor | None) -> Tensor:
    """``native.inline_conv`` reading the warehouse's packed copy (``cached_inline``), in a
    compiled graph too where it runs inference."""
    if _in_graph_reading_copies(cells, cols, alpha, bias):
        return _inline_conv_cached(cols, alpha, cells, bias, list(tiling.weight_shape), list(tiling.cell))
    return native.inline_conv(tiling, cols, alpha, cached_inline(cells, native.panel_width(tiling)), bias)


def _mix_rows(alpha: Tensor, cells: Tensor, pack: bool, panels: int | None = None) -> Tensor:
    """``alpha (M, n) @ cells (n, cell)`` outside autograd; ``pack``: a packed copy may serve;
    ``panels``: each row comes out in the compiled kernel's panel order."""
    packable = pack and alpha.dtype == cells.dtype
    if packable and _in_graph_reading_copies(cells, alpha):
        return _mix_cached(alpha, cells, panels or 0)
    packed = _packed_cells(cells, panels) if packable else None
    if packed is not None:
        return native.mix(alpha.contiguous(), packed)
    if panels is not None and known_true(alpha.shape[0] < cells.shape[0]):
        # fewer mixtures than cells (batch 1 in a graph being compiled, which holds no packed
        # copy): the mixtures put in panel order, not the warehouse
        mixed = _mix_in_place(alpha, cells)
        return native.panel_order(mixed.view(-1, *cells.shape[1:]), panels).view(alpha.shape[0], -1)
    if panels is None and _worth_the_kernel(alpha, cells):
        return _mix_in_place(alpha, cells)
    return F.linear(alpha, _cell_columns(cells, panels).t())


#: Multiply-adds below which an assembly (or its gradient) runs in the library's GEMM, whose
#: call costs about 10 us where the compiled kernel's costs 25-40 (mobilenet_v2's assemblies
#: at batch 16, cells of 32-960 numbers: 5.6 ms a training step in the library, 6.9 in the
#: kernel); above it the kernel's is 1.2-3.3x faster (resnet18's stages 1-2 at batch 16).
KERNEL_MACS = 1 << 23


def _worth_the_kernel(alpha: Tensor, cells: Tensor) -> bool:
    return known_true(alpha.shape[0] * cells.numel() >= KERNEL_MACS)


def _mix_in_place(alpha: Tensor, cells: Tensor) -> Tensor:
    """``alpha (M, n) @ cells (n, cell)`` in the cells' own order, ``native.mix`` reading the
    warehouse where it lies (its rows a cell apart) where the kernel can: no copy, and none of a
    library GEMM's packing (a layer of resnet50's layer3 at batch 1, 9 mixtures of 138 cells of
    36 MB: 2.6 ms, F.linear 8.0, F.linear on the warehouse in panel order 23).  The same in
    training, where the inner size n is too short for the library (resnet18's stage 2 at batch
    16, 144 mixtures of 47 cells of 16,384: 0.64 ms, F.linear 2.1)."""
    flat = cells.reshape(cells.shape[0], -1)
    width = native.mix_width(flat.shape[1])
    if width is None or alpha.dtype != cells.dtype or not _kernel_reads(cells):
        return F.linear(alpha, flat.t())
    return native.mix(alpha, flat.view(flat.shape[0], -1, width).transpose(0, 1))


def known_true(condition) -> bool:
    """``condition``, or in a graph being compiled whether it holds for every size the graph may
    take (a dynamic batch is not compared, which would tie the graph to one batch size).  The
    import costs 0.3 s: only a compiling process pays it."""
    if torch.compiler.is_compiling():
        from torch.fx.experimental.symbolic_shapes import statically_known_true
        return statically_known_true(condition)
    return bool(condition)


def _keeps_autocast(function: type[torch.autograd.Function]) -> type[torch.autograd.Function]:
    """Under autocast, run the Function in the autocast dtype, forward and backward, with
    autocast off inside (what ``torch.amp.custom_fwd(cast_inputs=...)`` does for one device
    type, here for the device of the first tensor argument).  Autocast would otherwise cast
    only some of the products inside, and a backward would meet bfloat16 gradients and
    float32 kernels in one op (``convolution_backward``, ``bmm``) and fail; autograd casts
    each returned gradient back to its input's dtype."""
    forward, backward = function.forward, function.backward

    def forward_keeping(ctx, *args):
        device = next(arg.device.type for arg in args if isinstance(arg, Tensor))
        ctx.device = device if torch.amp.is_autocast_available(device) else None
        if ctx.device is None or not torch.is_autocast_enabled(device):
            return forward(ctx, *args)
        dtype = torch.get_autocast_dtype(device)
        args = [arg.to(dtype) if isinstance(arg, Tensor) and arg.is_floating_point() else arg for arg in args]
        with torch.autocast(device, enabled=False):
            return forward(ctx, *args)

    def backward_keeping(ctx, *grads):
        if ctx.device is None:
            return backward(ctx, *grads)
        with torch.autocast(ctx.device, enabled=False):
            return backward(ctx, *grads)

    function.forward, function.backward = staticmethod(forward_keeping), staticmethod(backward_keeping)
    return function


@_keeps_autocast
class _Mix(torch.autograd.Function):
    """blocks ``(M, cell)`` = alpha ``(M, n)`` @ cells ``(n, *cell)``."""

    @staticmethod
    def forward(ctx, alpha: Tensor, cells: Tensor) -> Tensor:
        ctx.save_for_backward(alpha, cells)
        return _mix_rows(alpha, cells, pack=False)

    @staticmethod
    def backward(ctx, grad: Tensor):
        alpha, cells = ctx.saved_tensors
        return mix_grads(alpha, cells, grad, ctx.needs_input_grad[:2])


def mix_grads(alpha: Tensor, cells: Tensor, grad: Tensor, needs: tuple[bool, bool]
              ) -> tuple[Tensor | None, Tensor | None]:
    """The gradients of the assembly ``alpha (M, n) @ cells (n, *cell)`` from ``grad (M, cell
    numel)``, those ``needs`` asks for: alpha's ``grad @ cells^T`` and the cells' ``alpha^T @ grad``.

    Both have an inner size a library GEMM runs slowly (resnet18's stage 2 at batch 16: n = 47
    against 16,384 columns, F.linear 2.2 and 1.9 ms).  The cells' is an assembly itself, of the
    gradient's M rows (``_mix_in_place``: 0.58 ms); alpha's runs as the product of the warehouse
    by the gradient transposed, which the library takes faster (1.5 ms; 7.2 against 10.1 in
    stage 3).  Small ones (``KERNEL_MACS``) keep the library's two products.
    """
    grad, flat = grad.contiguous(), cells.reshape(cells.shape[0], -1)
    large = _worth_the_kernel(alpha, cells)
    grad_alpha = grad_cells = None
    if needs[0]:
        grad_alpha = torch.mm(flat, grad.t()).t().contiguous() if large else F.linear(grad, flat)
    if needs[1]:
        grad_cells = _mix_in_place(alpha.t(), grad) if large else F.linear(alpha.t().contiguous(), grad.t())
        grad_cells = grad_cells.view_as(cells)
    return grad_alpha, grad_cells


def _needs_grad(*tensors: Tensor | None) -> bool:
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


def mix(alpha: Tensor, cells: Tensor) -> Tensor:
    """Differentiable assembly: the mixtures ``w_i = sum_j alpha_ij e_j`` as rows (Sec. 3.2).

    ``alpha`` is ``(M, n)`` (samples times mixtures), ``cells`` the warehouse ``(n, *cell)``;
    returns ``(M, cell numel)``.
    """
    if not _needs_grad(alpha, cells):
        return _mix_rows(alpha, cells, pack=True)
    return _Mix.apply(alpha, cells)


# --- kernel layout -------------------------------------------------------------------------


def _ohwi_grid(tiling: Tiling, blocks: Tensor) -> Tensor:
    """Blocks ``(B, m, f_e * c_e)`` viewed in OHWI order: ``(B, O, f_e, *k, I, c_e)``, no copy.

    Needs cells that are 1 x 1 spatially (every published configuration).  Mixture order
    is spatial position, output block, input block (``Tiling``), so the blocks view as
    ``(B, *k, O, I, f_e, c_e)``; one sample's kernel in OHWI order (``(C_out, *k, C_in/g)``,
    what oneDNN's channels-last convolution and the NHWC im2col product read) is this view
    of it, contiguous when the kernel has one spatial position and one input block.
    """
    kernel = tiling.weight_shape[2:]
    d = len(kernel)
    grid = blocks.view(blocks.shape[0], *kernel, tiling.blocks_out, tiling.blocks_in, *tiling.cell[:2])
    return grid.permute(0, 1 + d, 3 + d, *range(1, 1 + d), 2 + d, 4 + d)


class _Kernels:
    """A batch of assembled kernels, kept in the order the assembly product leaves them and
    handed out one sample at a time in OHWI order.

    Re-ordering one sample into a reused buffer keeps it in cache for the convolution that
    reads it next; re-ordering the whole batch first would write and read it all once more
    (the slowest step of late stages with two threads, where it is bound by memory).
    """

    def __init__(self, tiling: Tiling, blocks: Tensor) -> None:
        self.grid = _ohwi_grid(tiling, blocks)
        self.shape = (tiling.weight_shape[0], *tiling.weight_shape[2:], tiling.weight_shape[1])
        self.buffer: Tensor | None = None

    def __getitem__(self, i: int) -> Tensor:
        """Sample i's kernel ``(C_out, *k, C_in/g)``, contiguous (valid until the next call)."""
        sample = self.grid[i]
        if sample.is_contiguous():
            return sample.view(self.shape)
        if self.buffer is None:
            self.buffer = torch.empty(sample.shape, dtype=sample.dtype, device=sample.device)
        self.buffer.copy_(sample)
        return self.buffer.view(self.shape)


def _assembled(tiling: Tiling, alpha: Tensor, cells: Tensor, pack: bool = False, panels: int | None = None) -> Tensor:
    """Blocks ``(B, m, f_e * c_e)`` of every sample's kernel (Sec. 3.2), outside autograd."""
    batch, mixtures, n = alpha.shape
    return _mix_rows(alpha.reshape(batch * mixtures, n), cells, pack, panels).view(batch, mixtures, -1)


# --- the two per-sample convolutions --------------------------------------------------------
