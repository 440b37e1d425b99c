"""Which path each KernelWarehouse Conv2d takes (:mod:`.paths`), chosen by timing.

The ways to convolve each sample are timed (forward only, or forward and backward for the
small layers of 28 x 28 / 32 x 32 images, ``KEEP_KERNELS_BYTES``) on the real shape, once
per layer configuration and input shape, and the fastest is kept: ``tune`` does it ahead of
time; each layer keeps its choices (``layer.path_choices``, saved with a model), and a layer
meeting a new input takes the path timed in this process for a layer of the same
configuration, so identical layers time once and give bit-identical results.  The choice is
guarded by a lock; ``kwconvert.execution.use_path`` forces a path in one thread only and
``KWCONVERT_PATH`` in the whole process (no timing).
"""
from __future__ import annotations

import contextlib
import math
import statistics
import threading
import time

import torch
from torch import Tensor

from ... import allocator, execution
from ...execution import ThreadSetting
from . import assembly
from .assembly import _needs_grad
from .paths import _available, _inline_trains, _keep_limit, _run, _spec_for

#: Each layer keeps its own choice per input (``layer.path_choices``: input key -> path); a
#: layer meeting a new input takes the path timed in this process for a layer of the same
#: configuration (the blocks of a stage, a model and its copy), so identical layers time
#: once, take the same path and give bit-identical results: configuration -> path.
_timed: dict[tuple, str] = {}
#: Guards the choices; timing runs under it, one layer at a time, so two threads meeting a
#: new shape time it once and never time while the other is timing.
_lock = threading.RLock()


def chosen_paths(model: torch.nn.Module) -> dict[str, dict[tuple, str]]:
    """The paths ``model``'s KW Conv2d layers have chosen: {layer name: {input key: path}}
    (layers that have run on no input yet are left out)."""
    with _lock:
        return {name: dict(layer.path_choices) for name, layer in _timed_layers(model) if layer.path_choices}


def timed_paths() -> dict[tuple, str]:
    """The paths timed in this process: {layer configuration and input key: path}."""
    with _lock:
        return dict(_timed)


def _timed_layers(model: torch.nn.Module) -> list[tuple[str, torch.nn.Module]]:
    return [(name, module) for name, module in model.named_modules() if hasattr(module, "path_choices")]


def clear_caches() -> None:
    """Drop the packed warehouse copies and the paths timed in this process (a layer keeps
    the choices it made: ``forget_paths`` drops those)."""
    with _lock:
        assembly.clear_packed()
        _timed.clear()


def forget_paths(model: torch.nn.Module) -> None:
    """Drop the path choices of ``model``'s layers: each times (or takes a timed) path again."""
    with _lock:
        for _, layer in _timed_layers(model):
            layer.path_choices.clear()


#: Paths left out of the timed choice in this thread (``excluding``).
_excluded: ThreadSetting[frozenset] = ThreadSetting("kwconvert_excluded_paths", frozenset())


@contextlib.contextmanager
def excluding(*names: str):
    """Leave the paths ``names`` out of the choice of every layer that chooses inside the block
    (this thread only; a layer that has chosen already keeps its choice: ``forget_paths`` first).

    What a path is worth, measured: a model timed inside ``excluding("inline")`` against its copy
    timed without, in one process (``benchmarks/speed.py --without-path inline``).
    """
    unknown = sorted(set(names) - set(execution.PATHS))
    if unknown:
        raise ValueError(f"unknown paths {unknown}: the paths are {', '.join(execution.PATHS)}")
    with _excluded.set_to(_excluded.get() | frozenset(names)):
        yield


def conv2d(layer, x: Tensor, alpha: Tensor) -> Tensor:
    """A KW Conv2d's output for a batched input ``x`` and its attention ``alpha`` (B, m, n)."""
    forced = execution.forced()
    if forced is not None:
        path = forced if forced in _available(layer, x) else "grouped"
    else:
        path = _path_for(layer, x, alpha)
    recorder = _recorder.get()
    if recorder is not None:
        recorder[layer.name or f"{type(layer).__name__}@{id(layer):x}"] = path
    return _run(layer, x, alpha, path)


#: Where ``tune`` collects each layer's path while it runs the model (None: not tuning).
_recorder: ThreadSetting[dict | None] = ThreadSetting("kwconvert_tuning", None)


def tune(model: torch.nn.Module, *example_inputs, backward: bool = False) -> dict[str, str]:
    """Time every KW Conv2d's paths for these inputs now, so that no request pays for it.

    A layer times its paths the first time it meets an input shape (a few forwards of the
    layer, up to seconds for a whole model); ``tune`` runs the model once on
    ``example_inputs`` (``backward``: forward and backward, as a training step does) so
    that every later call with the same shapes, dtype and thread count goes straight to
    the chosen path.  Returns ``{layer name: path}``.
    """
    paths: dict[str, str] = {}
    with _recorder.set_to(paths):
        if backward:
            out = model(*example_inputs)
            torch.autograd.backward(_tensors(out), [torch.ones_like(t) for t in _tensors(out)])
        else:
            with torch.no_grad():
                model(*example_inputs)
    return paths


def output_tensors(out) -> list[Tensor]:
    """The floating-point tensors of a model's output (a tensor, a tuple / list or a dict of them)."""
    values = out.values() if isinstance(out, dict) else out if isinstance(out, (list, tuple)) else [out]
    return [value for value in values if isinstance(value, Tensor) and value.is_floating_point()]


def _tensors(out) -> list[Tensor]:
    return [value for value in output_tensors(out) if value.requires_grad]


def _layer_key(layer) -> tuple:
    return (layer.weight_shape, layer.warehouse.cell, layer.warehouse.n, layer.kernel_size, layer.stride,
            layer.padding, layer.dilation, layer.groups, layer.padding_mode, layer.bias is not None,
            layer.warehouse.serves_half)


def _training(layer, x: Tensor, alpha: Tensor) -> bool:
    return _needs_grad(x, alpha, layer.warehouse.cells)


def _input_key(layer, x: Tensor, alpha: Tensor) -> tuple:
    """What of an input a path choice depends on (with the thread count it was timed on)."""
    dtype, channels_last, needs_grad, device = _input_traits(layer, x, alpha)
    return (tuple(x.shape), dtype, channels_last, needs_grad, torch.get_num_threads(), device)


def _input_traits(layer, x: Tensor, alpha: Tensor) -> tuple:
    """``_input_key`` but the shape and the thread count (which a graph being compiled cannot ask)."""
    channels_last = x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last)
    return (str(x.dtype), channels_last, _training(layer, x, alpha), x.device.type)


def saved_choices(model: torch.nn.Module) -> dict[str, list[list]]:
    """The path choices of ``model``'s layers, JSON-ready ({layer name: [[input key, path],
    ...]}), so that a saved model carries them (``kwconvert.save``) and a loaded one serves
    without timing."""
    return {name: [[_as_lists(key), path] for key, path in choices.items()]
            for name, choices in chosen_paths(model).items()}


def restore_choices(model: torch.nn.Module, saved: dict[str, list[list]]) -> None:
    """Give ``model``'s layers the choices written by ``saved_choices``.  An entry for another
    thread count, dtype or shape simply never matches; one naming an unknown path or layer
    is skipped."""
    layers = dict(_timed_layers(model))
    with _lock:
        for name, entries in saved.items():
            layer = layers.get(name)
            for key, path in entries if layer is not None else ():
                if path in execution.PATHS:
                    layer.path_choices.setdefault(_as_tuples(key), path)


def _as_lists(value):
    return [_as_lists(item) for item in value] if isinstance(value, tuple) else value


def _as_tuples(value):
    return tuple(_as_tuples(item) for item in value) if isinstance(value, list) else value


def _small_kernels(layer, x: Tensor) -> bool:
    return x.shape[0] * math.prod(layer.weight_shape) * x.element_size() <= _keep_limit(x)


def _path_for(layer, x: Tensor, alpha: Tensor) -> str:
    """The layer's path for this input: its own choice, else the one timed for its
    configuration in this process (``_timed``), else the fastest, timed now.  Under
    ``torch.compile`` no timing runs: a rule of thumb picks the path.  The paths available
    are worked out only where a choice is made (about 10 us of every layer's forward before:
    at batch 1 a layer's work outside its kernels is counted in such microseconds)."""
    if torch.compiler.is_compiling():
        return _compiled_path(layer, x, alpha, _choosable(layer, x))
    key = _input_key(layer, x, alpha)
    with _lock:
        path = layer.path_choices.get(key)
        if path is None:
            configuration = (*_layer_key(layer), *key, *sorted(_excluded.get()))
            path = _timed.get(configuration)
            if path is None:
                needs_grad = _training(layer, x, alpha)
                with allocator.returning_freed_memory():  # timing's temporaries stay out of the heap
                    path = _timed[configuration] = _time_paths(layer, x, alpha, _choosable(layer, x),
                                                               needs_grad)
            layer.path_choices[key] = path
    return path


def _choosable(layer, x: Tensor) -> tuple[str, ...]:
    """The paths that may run ``x`` (``paths._available``) but those ``excluding`` leaves out
    (all of them if it leaves out every one)."""
    available = _available(layer, x)
    excluded = _excluded.get()
    return tuple(path for path in available if path not in excluded) or available


def _compiled_path(layer, x: Tensor, alpha: Tensor, available: tuple[str, ...]) -> str:
    """The path under torch.compile, where nothing is timed.  For an input of fixed shape, the
    choice the layer made eagerly (``tune`` before compiling, or an eager forward; "inline"
    trains through its operator's autograd): with the rule below, resnet18 at batch 16 ran
    1.36x slower compiled than eager in inference and 1.43x in training.  Otherwise (a dynamic
    batch, or no choice yet) a path that holds no Python loop over the batch, so that the graph
    runs it for every batch size: the compiled kernel's operator in inference, one batched
    product in training."""
    path = _eager_choice(layer, x, alpha)
    if path in available:
        return path
    if "native" in available and not _needs_grad(x, alpha, layer.warehouse.cells, layer.bias):
        return "native"
    return "bmm" if "bmm" in available else "grouped"


def _eager_choice(layer, x: Tensor, alpha: Tensor) -> str | None:
    """The layer's own choice for an input of ``x``'s shape, where the graph being compiled has
    that shape for certain (``known_true``)."""
    from .traced_choices import choices_at_trace
    traits = _input_traits(layer, x, alpha)
    for (shape, dtype, channels_last, needs_grad, _threads, device), path in choices_at_trace(layer):
        if (dtype, channels_last, needs_grad, device) == traits and len(shape) == x.dim() and all(
                assembly.known_true(size == chosen) for size, chosen in zip(x.shape, shape)):
            return path
    return None


def _time_paths(layer, x: Tensor, alpha: Tensor, available: tuple[str, ...], needs_grad: bool) -> str:
    small = _small_kernels(layer, x)
    if "premix" in available and not _premix_writes_less(layer, x):
        available = tuple(path for path in available if path != "premix")
    if needs_grad:
        # "native" has no fast backward ("inline" has, where paths._inline_trains); "grouped" and
        # "folded" keep a batch of kernels alive until backward (autograd saves them for the
        # convolution), memory the fused paths do not need unless it is small
        trainable = tuple(path for path in available
                          if path != "native" and (path != "inline" or _inline_trains(layer, x)))
        if layer.groups == 1 and not small:
            available = tuple(path for path in trainable if path not in ("grouped", "folded")) or trainable
        else:
            available = trainable
    # timed as a step runs them: "inline" trains on the stage's packed warehouse copies
    # (assembly.cached_inline), which its first timing makes
    if needs_grad and not small and "inline" in available and len(available) > 1:
        # "inline" is fast forward, and its backward is the fastest only where kernels are big
        # (resnet18's layer4 at batch 16: 232-247 ms against 304-441 for "bmm", forward and
        # backward; layer2: 183-214 against 72-77 for "conv"): the forward-timed best of the
        # others against it, forward and backward (the winner's backward runs in the step anyway)
        others = tuple(path for path in available if path != "inline")
        return _fastest(layer, x, alpha, (_fastest(layer, x, alpha, others), "inline"), backward=True)
    return _fastest(layer, x, alpha, available, backward=needs_grad and small)


def _premix_writes_less(layer, x: Tensor) -> bool:
    """Whether ``"premix"``'s inputs mixed per cell (B x OB x n x L x c_e floats) are no bigger
    than the batch of kernels the other paths assemble (B x C_out x K).  It only wins where
    they are (late stages, small maps); elsewhere they are up to 300 times bigger (686 MB in
    resnet18's layer1 at batch 16), and merely timing it there raised resnet50's first training
    step at batch 8 to 3.9x the plain model's peak memory."""
    tiling = layer.tiling
    out_h, out_w = _spec_for(layer, "premix").output_size(*x.shape[2:])
    mixed = tiling.blocks_out * layer.warehouse.n * out_h * out_w * tiling.cell[1]
    return mixed <= math.prod(layer.weight_shape)


def _fastest(layer, x: Tensor, alpha: Tensor, available: tuple[str, ...], repeats: int = 5,
             backward: bool = False) -> str:
    """Time each path's forward (without autograd; ``backward``: forward and backward) and
    return the fastest.

    For big layers forward alone picks the same paths as forward plus backward on resnet18 /
    resnet50 training steps, and timing backward too left the heap fragmented enough to add
    a third to a training step's peak memory.  Small layers (a batch of kernels that may be
    kept, ``KEEP_KERNELS_BYTES``: the layers of 28 x 28 / 32 x 32 images) are timed forward and
    backward in training: there the paths' backwards differ more than their forwards (the
    per-sample paths loop over the batch twice, ``"grouped"`` and ``"bmm"`` keep their
    kernels).  Each path is timed with its output made channels-last, the layout the next
    KW layer reads: ``"grouped"`` gives an NCHW input an NCHW output, and the copy it costs
    downstream would otherwise go uncounted.  The best two, where they lie within ``RUNOFF_MARGIN``, go to a
    runoff (``_runoff``).
    """
    if len(available) == 1:
        return available[0]
    x, alpha = x.detach(), alpha.detach()
    cells = layer.warehouse.cells

    def timed(path: str) -> float:
        start = time.perf_counter()
        if not backward:
            _run(layer, x, alpha, path).contiguous(memory_format=torch.channels_last)
        else:
            x_, alpha_ = x.requires_grad_(), alpha.requires_grad_()
            with torch.enable_grad():
                out = _run(layer, x_, alpha_, path).contiguous(memory_format=torch.channels_last)
                torch.autograd.grad(out, (x_, alpha_, cells), torch.ones_like(out))  # no .grad is touched
        return time.perf_counter() - start

    best = {path: math.inf for path in available}
    with torch.no_grad():
        for path in available:
            timed(path)  # first call: oneDNN creates its primitives
        rounds = repeats if not backward else (repeats + 1) // 2  # backward: 3 times the work
        for _ in range(rounds):
            for path in available:
                best[path] = min(best[path], timed(path))
        first, second = sorted(best, key=best.get)[:2]
        if best[second] <= best[first] * (1 + RUNOFF_MARGIN):
            return _runoff(timed, first, second, rounds + 1)
    return min(best, key=best.get)


#: Paths whose best times lie this close go to a runoff (``_runoff``).
RUNOFF_MARGIN = 0.15


def _runoff(timed, first: str, second: str, rounds: int) -> str:
    """The faster of two close paths, by the median of their time ratios over ``rounds``
    rounds of the two run back to back (the order alternating).

    Each path's best of five rounds among all was a lottery where the two differ by less than
    a host's noise: resnet18's layer4 at batch 1 took "inline" or "bmm" in 3 of 10 choices
    against "native", which ran it in 3.7 ms against their 4.2-4.3 ms in the model.  A ratio
    within one round compares the two at the same moment of the host."""
    ratios = []
    for round_ in range(rounds):
        pair = (first, second) if round_ % 2 == 0 else (second, first)
        times = {path: timed(path) for path in pair}
        ratios.append(times[second] / times[first])
    return first if statistics.median(ratios) >= 1.0 else second
