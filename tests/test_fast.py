"""The fast CPU paths compute what the straightforward path computes: outputs in float32,
gradients in float64, over the layer grid, whole models, torch.compile; and they keep no
batch of kernels alive for backward."""
from __future__ import annotations

import contextlib
import copy
import itertools
import platform
import subprocess
import sys
import threading
import types

import pytest
import torch
import torchvision
from torch import nn

import kwconvert
from kwconvert import allocator, execution, reference_path, use_path
from kwconvert.methods.kernelwarehouse import assembly, cells, native, path_choice, paths
from kwconvert.methods.kernelwarehouse.layers import KWConv1d, KWConv2d, KWConv3d, KWLinear, Warehouse, set_temperature

from .helpers import FLOAT32, input_dependent

FUSED = ("conv", "matmul", "bmm", "premix")
COMPILED = ("native", "inline")  # float64 and unsupported layers fall back to "grouped" (tests/test_native.py covers it)
PATHS = ("im2col", "grouped", "folded") + FUSED + COMPILED + (None,)  # None: the timed choice


def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return ((actual - expected).abs().max() / expected.abs().max().clamp_min(1e-30)).item()


def kw_conv(cin: int, cout: int, kernel: int, *, budget: float = 1, dims: int = 2, dtype=torch.float64,
            tau: float = 0.3, seed: int = 0, **conv) -> KWConv2d:
    """A KW conv alone in a warehouse with spare cells, mid-way through the temperature schedule."""
    torch.manual_seed(seed)
    kw_type = {1: KWConv1d, 2: KWConv2d, 3: KWConv3d}[dims]
    groups = conv.get("groups", 1)
    weight_shape = (cout, cin // groups) + (kernel,) * dims
    cell = cells.cell_shape([weight_shape], budget)
    mixtures = cells.cells_in(weight_shape, cell)
    warehouse = Warehouse(cells.warehouse_size(mixtures, budget) + 3, cell, dtype=dtype)
    layer = kw_type(cin, cout, kernel, warehouse=warehouse, offset=0, budget=budget, hidden=16, dtype=dtype,
                    **conv)
    if layer.bias is not None:
        nn.init.normal_(layer.bias)
    layer.tau = tau
    layer.warehouse_module = warehouse  # keeps the cells in .parameters()
    return layer


def outputs_and_grads(layer: nn.Module, x: torch.Tensor, path: str | None, *, reference: bool = False):
    """Output and the gradients of every parameter and of x under a fixed random projection."""
    x = x.detach().requires_grad_()
    leaves = [x] + [p for p in layer.parameters() if p.requires_grad]
    with reference_path() if reference else use_path(path):
        out = layer(x)
        weights = torch.randn(out.shape, generator=torch.Generator().manual_seed(1), dtype=out.dtype)
        grads = torch.autograd.grad((out * weights).sum(), leaves, allow_unused=True)
    return out.detach(), grads


def assert_same_as_reference(layer: nn.Module, x: torch.Tensor, path: str | None, tolerance: float) -> None:
    expected_out, expected_grads = outputs_and_grads(layer, x, None, reference=True)
    out, grads = outputs_and_grads(layer, x, path)
    assert out.shape == expected_out.shape
    assert relative_error(out, expected_out) <= tolerance
    for grad, expected in zip(grads, expected_grads):
        assert (grad is None) == (expected is None)
        if grad is not None:
            assert relative_error(grad, expected) <= tolerance


def assert_float32_output_matches_reference(module: nn.Module, x: torch.Tensor, path: str | None) -> None:
    """No-grad output on ``path`` within FLOAT32 (relative) of the straightforward path's."""
    with torch.no_grad():
        with reference_path():
            expected = module(x)
        with use_path(path):
            out = module(x)
    assert relative_error(out, expected) <= FLOAT32


def conv_grid() -> list:
    cases = []
    grid = itertools.product((1, 3), (1, 2), (0, 1, "same"), ("zeros", "reflect"), (1, 2), (1, 2, "depthwise"),
                             (True, False))
    for kernel, stride, padding, mode, dilation, groups, bias in grid:
        if padding == "same" and stride != 1:
            continue
        cases.append(pytest.param(kernel, stride, padding, mode, dilation, groups, bias,
                           id=f"k{kernel}-s{stride}-p{padding}-{mode}-d{dilation}-g{groups}-{'bias' if bias else 'nobias'}"))
    return cases


# --- layer grid ----------------------------------------------------------------------------


@pytest.mark.parametrize("kernel,stride,padding,mode,dilation,groups,bias", conv_grid())
def test_every_path_equals_the_reference_on_the_conv_grid(kernel, stride, padding, mode, dilation, groups, bias):
    groups = 8 if groups == "depthwise" else groups
    layer = kw_conv(8, 8, kernel, stride=stride, padding=padding, padding_mode=mode, dilation=dilation,
                    groups=groups, bias=bias)
    x = torch.randn(3, 8, 9, 8, dtype=torch.float64)
    for training in (True, False):
        layer.train(training)
        for path in PATHS:
            assert_same_as_reference(layer, x, path, tolerance=1e-10)


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("budget", [0.5, 1, 2])
def test_float32_outputs_match_within_the_float32_tolerance(budget, training, path):
    layer = kw_conv(16, 32, 3, budget=budget, padding=1, stride=2, dtype=torch.float32, bias=True).train(training)
    assert_float32_output_matches_reference(layer, torch.randn(4, 16, 11, 10), path)


@pytest.mark.parametrize("path", PATHS)
def test_batch_of_one_channels_last_and_rectangular_kernels(path):
    layer = kw_conv(8, 16, 3, padding=(1, 0), stride=(1, 2), budget=0.5)
    for x in (torch.randn(1, 8, 7, 9, dtype=torch.float64),
              torch.randn(2, 8, 7, 9, dtype=torch.float64).contiguous(memory_format=torch.channels_last)):
        for training in (True, False):
            assert_same_as_reference(layer.train(training), x, path, tolerance=1e-10)


@pytest.mark.filterwarnings("ignore:Using padding='same' with even kernel")
@pytest.mark.parametrize("mode", ["zeros", "replicate", "circular"])
@pytest.mark.parametrize("path", PATHS)
def test_even_kernel_same_padding_puts_the_extra_pixel_right(path, mode):
    layer = kw_conv(4, 8, 2, padding="same", padding_mode=mode, dilation=3)
    assert_same_as_reference(layer, torch.randn(2, 4, 9, 8, dtype=torch.float64), path, tolerance=1e-10)


@pytest.mark.parametrize("path", PATHS)
def test_bfloat16_fast_path_stays_close_to_float32(path):
    """Every path, the timed choice included, runs bfloat16 on any x86-64 CPU (oneDNN's
    bfloat16 inner product needs AVX-512: the fast paths must not depend on it), in inference
    and in a training step, within a few bfloat16 epsilons of float32."""
    layer = kw_conv(16, 16, 3, padding=1, dtype=torch.float32)
    low = copy.deepcopy(layer).to(torch.bfloat16)
    x = torch.randn(2, 16, 8, 8)
    tolerance = 8 * torch.finfo(torch.bfloat16).eps  # 0.0625: a few roundings of the inputs and kernels
    for training in (False, True):
        layer.train(training), low.train(training)
        expected, expected_grads = outputs_and_grads(layer, x, None, reference=True)
        out, grads = outputs_and_grads(low, x.to(torch.bfloat16), path)
        assert out.dtype == torch.bfloat16
        assert relative_error(out.float(), expected) <= tolerance
        for grad, expected_grad in zip(grads, expected_grads):
            assert grad.dtype == torch.bfloat16
            assert relative_error(grad.float(), expected_grad) <= 2 * tolerance


@pytest.mark.parametrize("dims", [1, 3])
def test_conv1d_and_conv3d_equal_the_reference(dims):
    layer = kw_conv(4, 8, 3, dims=dims, padding=1, groups=2, budget=0.5)
    x = torch.randn(2, 4, *((9,) if dims == 1 else (5, 4, 6)), dtype=torch.float64)
    assert_same_as_reference(layer, x, None, tolerance=1e-10)


@pytest.mark.parametrize("shape", [(3, 8), (3, 5, 8), (2, 3, 4, 8), (8,)])
@pytest.mark.parametrize("budget", [0.5, 1])
def test_linear_equals_the_reference(shape, budget):
    torch.manual_seed(2)
    cell = cells.cell_shape([(6, 8)], budget)
    warehouse = Warehouse(cells.warehouse_size(cells.cells_in((6, 8), cell), budget) + 2, cell, dtype=torch.float64)
    layer = KWLinear(8, 6, warehouse=warehouse, offset=0, budget=budget, hidden=16, dtype=torch.float64)
    layer.tau = 0.4
    layer.warehouse_module = warehouse
    for training in (True, False):
        assert_same_as_reference(layer.train(training), torch.randn(*shape, dtype=torch.float64), None, 1e-10)


# --- whole models --------------------------------------------------------------------------


@pytest.fixture(scope="module")
def kw_resnet18() -> nn.Module:
    torch.manual_seed(0)
    model = input_dependent(kwconvert.convert(torchvision.models.resnet18(weights=None, num_classes=10), 1.0))
    set_temperature(model, 0.5)
    return model


@pytest.mark.parametrize("path", PATHS)
def test_resnet18_outputs_equal_the_reference_in_float32(kw_resnet18, path):
    """Eval mode: in training mode a batch-statistics BatchNorm amplifies float32 rounding
    (the reference itself is 2e-3 away from float64 there), so training is compared in float64."""
    assert_float32_output_matches_reference(kw_resnet18.eval(), torch.randn(2, 3, 64, 64), path)


def test_resnet18_training_outputs_and_gradients_equal_the_reference_in_float64(kw_resnet18):
    model = copy.deepcopy(kw_resnet18).double().train()
    x = torch.randn(4, 3, 32, 32, dtype=torch.float64)  # batch 4: BatchNorm on the 1x1 maps stays well posed
    assert_same_as_reference(model, x, None, tolerance=1e-10)


def test_a_model_and_its_copy_take_the_same_paths_and_agree_bit_for_bit(kw_resnet18):
    model = kw_resnet18.eval()
    clone = copy.deepcopy(model)
    x = torch.randn(3, 3, 48, 48)
    with torch.no_grad():
        assert torch.equal(model(x), clone(x))
        assert torch.equal(model(x), model(x))


def test_training_step_on_the_fast_path_matches_the_reference_step(kw_resnet18):
    """SGD on the fast path moves the weights as on the reference path (float64)."""
    fast_model = copy.deepcopy(kw_resnet18).double().train()
    reference_model = copy.deepcopy(fast_model)
    x = torch.randn(4, 3, 32, 32, dtype=torch.float64)
    labels = torch.tensor([1, 7, 0, 3])
    for model, context in ((fast_model, use_path(None)), (reference_model, reference_path())):
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
        with context:
            nn.functional.cross_entropy(model(x), labels).backward()
        optimizer.step()
    for (name, a), (_, b) in zip(fast_model.named_parameters(), reference_model.named_parameters()):
        assert relative_error(a, b) <= 1e-10, name


# --- memory, path choice, allocator ---------------------------------------------------------


def saved_bytes(layer: nn.Module, x: torch.Tensor, path: str | None, reference: bool = False) -> int:
    """Bytes autograd keeps for backward, counting each storage once."""
    storages = {}

    def pack(tensor):
        storages[tensor.untyped_storage().data_ptr()] = tensor.untyped_storage().nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        with reference_path() if reference else use_path(path):
            layer(x.requires_grad_())
    return sum(storages.values())


@pytest.mark.parametrize("path", FUSED)
def test_fused_paths_keep_no_batch_of_kernels_for_backward(path, monkeypatch):
    """Above ``KEEP_KERNELS_BYTES`` (here: any size) no fused path keeps a batch of kernels."""
    monkeypatch.setattr(paths, "KEEP_KERNELS_BYTES", 0)
    layer = kw_conv(64, 64, 3, padding=1, dtype=torch.float32).train()
    x = torch.randn(8, 64, 6, 6)
    kernels = 8 * 64 * 64 * 9 * 4
    assert saved_bytes(layer, x.clone(), None, reference=True) > kernels
    assert saved_bytes(layer, x.clone(), path) < kernels / 2


def test_premix_keeps_its_mixed_inputs_up_to_the_limit_and_computes_the_same(monkeypatch):
    """Up to ``KEEP_KERNELS_BYTES`` "premix" keeps the im2col and the mixed inputs for backward
    (more bytes saved); without them it gathers and mixes again.  Both give the reference's
    gradients in float64 (a strided layer of two input and two output blocks)."""
    layer = kw_conv(16, 32, 3, stride=2, padding=1, budget=0.5).train()
    x = torch.randn(3, 16, 7, 7, dtype=torch.float64)
    kept = saved_bytes(layer, x.clone(), "premix")
    assert_same_as_reference(layer, x, "premix", tolerance=1e-10)
    monkeypatch.setattr(paths, "KEEP_KERNELS_BYTES", 0)
    assert saved_bytes(layer, x.clone(), "premix") < kept
    assert_same_as_reference(layer, x, "premix", tolerance=1e-10)


def test_bmm_keeps_a_small_batch_of_kernels_and_computes_the_same(monkeypatch):
    """Up to ``KEEP_KERNELS_BYTES`` the batched path keeps its kernels for backward instead
    of assembling them again; the gradients are the same (float64)."""
    layer = kw_conv(16, 32, 3, padding=1, budget=0.5)  # four output blocks: the kernels are a permuted copy
    x = torch.randn(4, 16, 5, 5, dtype=torch.float64)
    kernels = 4 * 32 * 16 * 9 * 8
    monkeypatch.setattr(paths, "KEEP_KERNELS_BYTES", 0)
    without = saved_bytes(layer, x.clone(), "bmm")
    assert_same_as_reference(layer, x, "bmm", tolerance=1e-10)
    monkeypatch.setattr(paths, "KEEP_KERNELS_BYTES", kernels)
    assert saved_bytes(layer, x.clone(), "bmm") - without == kernels
    assert_same_as_reference(layer, x, "bmm", tolerance=1e-10)


@pytest.mark.parametrize("batch,slice_samples", [(4, 1), (5, 2), (3, 8)])
def test_bmm_in_slices_of_the_batch_computes_the_same(batch, slice_samples, monkeypatch):
    """The batched path runs forward and backward in slices of ``BATCHED_SLICE_BYTES`` of
    kernels (the last slice shorter; one slice when the batch fits), with output blocks
    (``_block_major``), a bias and kernels assembled again in backward; float64 gradients."""
    layer = kw_conv(16, 32, 3, padding=1, budget=0.5, bias=True)  # four output blocks
    assert layer.tiling.blocks_out > 1
    monkeypatch.setattr(paths, "KEEP_KERNELS_BYTES", 0)
    monkeypatch.setattr(paths, "BATCHED_SLICE_BYTES", slice_samples * 32 * 16 * 9 * 8)
    assert len(paths._batch_slices(batch, 32 * 16 * 9 * 8)) == -(-batch // slice_samples)
    assert_same_as_reference(layer, torch.randn(batch, 16, 6, 5, dtype=torch.float64), "bmm", tolerance=1e-10)


def test_premix_is_timed_only_where_it_writes_less_than_the_kernels(monkeypatch):
    """``"premix"`` mixes the inputs per cell: fewer floats than a batch of kernels on a 4 x 4
    map, far more on a 32 x 32 one, where merely timing it once raised resnet50's first
    training step to 3.9x the plain model's peak memory; there it is not a candidate."""
    layer = kw_conv(64, 64, 3, padding=1, dtype=torch.float32).train()
    candidates = []
    timed = path_choice._fastest
    monkeypatch.setattr(path_choice, "_fastest", lambda *args, **kwargs: candidates.append(args[3]) or timed(*args, **kwargs))
    for size in (4, 32):
        path_choice.clear_caches()
        layer(torch.randn(2, 64, size, size))
    small, big = candidates
    assert "premix" in small and "premix" not in big and "bmm" in big
    with use_path("premix"):  # asked for, it still runs there
        assert_float32_output_matches_reference(layer.eval(), torch.randn(2, 64, 32, 32), "premix")
    path_choice.clear_caches()


def test_small_layers_are_timed_forward_and_backward_in_training_without_touching_grad():
    """On small images (batch 64, 4 x 4 maps) every trainable path is a candidate, the choice
    is timed with backward, and the timing leaves no gradient behind."""
    layer = kw_conv(32, 32, 3, padding=1, dtype=torch.float32).train()
    x = torch.randn(64, 32, 4, 4)
    path_choice.clear_caches()
    out = layer(x)
    assert all(p.grad is None for p in layer.parameters())
    (path,) = path_choice.chosen_paths(layer)[""].values()
    assert path in ("grouped", "conv", "matmul", "bmm", "premix", "inline")  # never the inference-only "native"
    out.sum().backward()
    assert layer.warehouse.cells.grad is not None
    path_choice.clear_caches()


def test_excluded_paths_are_left_out_of_the_choice_and_time_apart():
    """Inside ``excluding`` a layer chooses among the other paths; its twin timed outside does not
    take that choice (the exclusions are part of what a timed path is kept under)."""
    layer = kw_conv(16, 16, 3, padding=1, dtype=torch.float32).eval()
    twin = copy.deepcopy(layer)
    x = torch.randn(2, 16, 6, 6)
    path_choice.clear_caches()
    candidates = []
    timed = path_choice._fastest
    with torch.no_grad(), pytest.MonkeyPatch.context() as patch:
        patch.setattr(path_choice, "_fastest", lambda *args, **kwargs: candidates.append(args[3]) or timed(*args, **kwargs))
        with path_choice.excluding("conv", "matmul"):
            layer(x)
        twin(x)
    assert "conv" not in candidates[0] and "matmul" not in candidates[0] and "bmm" in candidates[0]
    assert "conv" in candidates[1] and len(candidates) == 2
    with pytest.raises(ValueError, match="unknown paths \\['fastest'\\]"):
        with path_choice.excluding("fastest"):
            pass
    path_choice.clear_caches()


def test_two_paths_timed_close_go_to_a_runoff_of_same_moment_ratios(monkeypatch):
    """A path's best time among five rounds can be one lucky run: where two paths' best lie within
    ``RUNOFF_MARGIN``, the path faster in most back-to-back rounds wins (a clock scripted per path:
    "a" ran once in 0.85 and otherwise in 1.0, "b" always in 0.9; far apart, no runoff runs)."""
    layer, x = kw_conv(8, 8, 3, padding=1, dtype=torch.float32).eval(), torch.randn(1, 8, 5, 5)
    clock = [0.0]
    runs = {"a": iter([1.0, 0.85] + [1.0] * 20), "b": iter([0.9] * 22), "c": iter([0.5] * 22)}
    calls = []

    def run(layer, x, alpha, path):
        calls.append(path)
        clock[0] += next(runs[path])
        return x

    monkeypatch.setattr(path_choice, "_run", run)
    monkeypatch.setattr(path_choice, "time", types.SimpleNamespace(perf_counter=lambda: clock[0]))
    alpha = torch.zeros(1, 1, 1)
    assert path_choice._fastest(layer, x, alpha, ("a", "b")) == "b"
    assert calls.count("a") == calls.count("b") == 1 + 5 + 6  # warm-up, the rounds, the runoff
    calls.clear()
    assert path_choice._fastest(layer, x, alpha, ("b", "c")) == "c" and len(calls) == 12


def test_each_layer_keeps_its_choice_per_input_and_identical_layers_time_once(monkeypatch):
    layer = kw_conv(8, 8, 3, padding=1, dtype=torch.float32).eval()
    twin = copy.deepcopy(layer)
    x = torch.randn(2, 8, 7, 7)
    path_choice.clear_caches()  # earlier tests may have timed this configuration already
    timings = []
    timed = path_choice._fastest
    monkeypatch.setattr(path_choice, "_fastest", lambda *args, **kwargs: timings.append(args[3]) or timed(*args, **kwargs))
    with torch.no_grad():
        layer(x)
        twin(x)  # takes the path its identical twin timed
        layer(x[:1])  # a new input shape: timed again
    assert len(timings) == 2
    assert len(layer.path_choices) == 2 and len(twin.path_choices) == 1
    assert twin.path_choices.items() <= layer.path_choices.items()
    assert set(layer.path_choices.values()) <= set(execution.PATHS) - {"reference"}
    assert path_choice.chosen_paths(nn.Sequential(layer, twin)) == {"0": layer.path_choices, "1": twin.path_choices}
    path_choice.forget_paths(layer)
    assert layer.path_choices == {} and len(twin.path_choices) == 1


def test_packed_warehouse_follows_every_change_of_the_cells():
    layer = kw_conv(16, 16, 3, padding=1, dtype=torch.float32).eval()
    cells = layer.warehouse.cells
    x = torch.randn(1, 16, 6, 6)

    def check() -> None:
        with torch.no_grad():
            with reference_path():
                expected = layer(x)
            with execution.use_path("native"):  # the path that reads the packed copy, where built
                assert relative_error(layer(x), expected) <= FLOAT32

    check()
    with torch.no_grad():
        cells.mul_(-2)  # in place: the sampled values tell
    check()
    cells.data.add_(1.0)  # through .data: the same
    check()
    cells.data = cells.data.clone() * 3  # new storage
    check()
    # one value no sample sees, changed by an optimizer step, then by loading a state dict
    unseen = 1
    assert cells.numel() // assembly._PROBES > unseen
    cells.grad = torch.zeros_like(cells)
    cells.grad.view(-1)[unseen] = 1.0
    torch.optim.SGD([cells], lr=10.0).step()
    check()
    state = {name: value.clone() for name, value in layer.warehouse.state_dict().items()}
    state["cells"].view(-1)[unseen] = 7.0
    layer.warehouse.load_state_dict(state)
    check()
    with assembly.packing(False):
        check()


@pytest.mark.parametrize("mixtures", (2, 40))
def test_the_unpacked_assembly_in_panel_order_reorders_the_smaller_side(mixtures):
    """Without a packed copy (a graph being compiled), the mixtures in the compiled kernel's panel
    order come from the warehouse read in place, then reordered (fewer mixtures than cells: batch
    1), or from the warehouse reordered."""
    torch.manual_seed(mixtures)
    warehouse, alpha = torch.randn(6, 32, 16, 1, 1), torch.randn(mixtures, 6)
    expected = alpha.double() @ native.panel_order(warehouse.double(), 16)
    assert relative_error(assembly._mix_rows(alpha, warehouse, pack=False, panels=16), expected) <= FLOAT32


@pytest.mark.parametrize("large", (False, True))
def test_the_training_assembly_and_its_gradients_equal_float64(large, monkeypatch):
    """``mix`` with a gradient to compute, and its backward (``mix_grads``): in the compiled kernel
    above ``KERNEL_MACS`` (the library's products below, where the kernel's call costs more), the
    mixtures, alpha's gradient and the cells' equal float64's."""
    torch.manual_seed(3)
    monkeypatch.setattr(assembly, "KERNEL_MACS", 1 if large else 1 << 40)
    ran = []
    original = native.mix
    monkeypatch.setattr(native, "mix", lambda *args: ran.append(1) or original(*args))
    alpha = torch.randn(30, 7, requires_grad=True)
    warehouse = torch.randn(7, 32, 16, 1, 1, requires_grad=True)
    grad = torch.randn(30, 32 * 16)
    mixed = assembly.mix(alpha, warehouse)
    grad_alpha, grad_cells = torch.autograd.grad(mixed, (alpha, warehouse), grad)
    alpha64, warehouse64 = alpha.detach().double(), warehouse.detach().double()
    assert relative_error(mixed, alpha64 @ warehouse64.view(7, -1)) <= FLOAT32
    assert relative_error(grad_alpha, grad.double() @ warehouse64.view(7, -1).t()) <= FLOAT32
    assert relative_error(grad_cells, (alpha64.t() @ grad.double()).view_as(warehouse)) <= FLOAT32
    assert len(ran) == (2 if large and native.available() else 0)  # the assembly and the cells' gradient


def test_use_path_rejects_unknown_names_and_restores_the_previous_setting():
    with pytest.raises(ValueError, match="matmull"):
        with use_path("matmull"):
            pass
    with use_path("conv"):
        with reference_path():
            assert execution.is_reference()
        assert not execution.is_reference()


def test_two_threads_serving_one_model_get_the_reference_outputs(kw_resnet18):
    """Both threads meet a new shape at once (timing, packing, the choice cache) and one of
    them forces the reference path meanwhile: neither sees the other's setting."""
    model = kw_resnet18.eval()
    inputs = [torch.randn(2, 3, 40, 40, generator=torch.Generator().manual_seed(i)) for i in range(2)]
    with torch.no_grad(), reference_path():
        expected = [model(x) for x in inputs]
    path_choice.clear_caches()
    path_choice.forget_paths(model)
    results, seen = {}, {}
    barrier = threading.Barrier(3)

    def serve(i: int) -> None:
        barrier.wait()
        with torch.no_grad():
            results[i] = [model(inputs[i]) for _ in range(2)]
        seen[i] = execution.is_reference()

    def compare() -> None:
        barrier.wait()
        with reference_path(), torch.no_grad():
            results["forced"] = model(inputs[0])

    threads = [threading.Thread(target=serve, args=(i,)) for i in range(2)] + [threading.Thread(target=compare)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert seen == {0: False, 1: False}  # the third thread's reference_path stayed in it
    for i in range(2):
        for out in results[i]:
            assert relative_error(out, expected[i]) <= FLOAT32
    assert relative_error(results["forced"], expected[0]) <= FLOAT32


def test_tune_chooses_every_path_ahead_so_serving_times_nothing(kw_resnet18, monkeypatch):
    model = kw_resnet18.eval()
    x = torch.randn(2, 3, 48, 48)
    path_choice.clear_caches()
    path_choice.forget_paths(model)
    paths = kwconvert.tune(model, x)
    convs = [name for name, module in model.named_modules() if isinstance(module, KWConv2d)]
    assert sorted(paths) == sorted(module.name for name, module in model.named_modules()
                                   if isinstance(module, KWConv2d)) and len(convs) == len(paths)
    assert set(paths.values()) <= set(execution.PATHS) - {"reference", "im2col"}

    def no_timing(*args, **kwargs):
        raise AssertionError("a tuned model timed a path while serving")

    monkeypatch.setattr(path_choice, "_fastest", no_timing)
    with torch.no_grad():
        model(torch.randn(2, 3, 48, 48))
    with pytest.raises(AssertionError, match="timed a path"), torch.no_grad():
        model(torch.randn(3, 3, 48, 48))  # a shape tune never saw is timed


def test_unavailable_forced_path_falls_back_to_grouped():
    layer = kw_conv(8, 8, 3, padding=1, groups=2)  # matmul needs groups == 1
    assert_same_as_reference(layer, torch.randn(2, 8, 6, 6, dtype=torch.float64), "matmul", 1e-10)


def test_allocator_settings_report_what_the_process_runs_with(monkeypatch):
    monkeypatch.setenv("MALLOC_ARENA_MAX", "2")
    settings = allocator.allocator_settings()
    assert settings["environment"] == {"MALLOC_ARENA_MAX": "2"}
    applied = allocator.keep_freed_memory()
    if settings["libc"].startswith("glibc"):
        assert applied["mallopt"] == {"M_MMAP_MAX": 0, "M_TRIM_THRESHOLD": 2**31 - 1}


RSS_AFTER_FREEING = """
import torch
from kwconvert import allocator

def rss_mb():
    return next(int(line.split()[1]) for line in open("/proc/self/status") if line.startswith("VmRSS")) / 1024

def kept_after_freeing():
    start = rss_mb()
    block = torch.ones(64 << 18)  # 64 MB, every page touched
    del block
    return rss_mb() - start

allocator.keep_freed_memory()
with allocator.returning_freed_memory():  # first: a block freed before would serve it from the heap
    inside = kept_after_freeing()
print(inside, kept_after_freeing())
"""


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="keep_freed_memory sets glibc's mallopt")
def test_inside_returning_freed_memory_a_freed_block_leaves_the_process_and_outside_it_stays():
    """``keep_freed_memory`` keeps a freed 64 MB block in the heap; inside ``returning_freed_memory``
    (where KW layers time their paths) glibc maps it apart and gives it back on free."""
    done = subprocess.run([sys.executable, "-c", RSS_AFTER_FREEING], capture_output=True, text=True, check=True)
    inside, outside = map(float, done.stdout.split())
    assert inside < 8 and outside > 56, (inside, outside)


def test_paths_are_timed_with_freed_memory_returned(monkeypatch):
    """Timing a layer's paths allocates and frees each path's temporaries a few times over: they
    must not stay in a heap that keeps freed memory (``allocator.returning_freed_memory``)."""
    inside = []

    @contextlib.contextmanager
    def recording():
        inside.append(True)
        yield
        inside.append(False)

    monkeypatch.setattr(allocator, "returning_freed_memory", recording)
    timed_inside = []
    original = path_choice._time_paths
    monkeypatch.setattr(path_choice, "_time_paths",
                        lambda *args: timed_inside.append(inside[-1:] == [True]) or original(*args))
    path_choice.clear_caches()
    layer = kw_conv(8, 16, 3, padding=1, dtype=torch.float32)
    with torch.no_grad():
        layer(torch.randn(2, 8, 10, 10))
    assert timed_inside == [True] and inside == [True, False]


# --- torch.compile -------------------------------------------------------------------------


def small_kw_model() -> nn.Module:
    torch.manual_seed(3)
    model = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 16, 3, padding=1),
                          nn.BatchNorm2d(16), nn.ReLU(), nn.Conv2d(16, 32, 3, stride=2, padding=1), nn.ReLU(),
                          nn.Conv2d(32, 32, 3, padding=1, groups=32), nn.ReLU(), nn.Conv2d(32, 32, 1),
                          nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(32, 10))
    model = input_dependent(kwconvert.convert(model, 1.0, example_inputs=torch.randn(2, 3, 16, 16)))
    set_temperature(model, 0.5)
    return model


def compiled_matches_eager(backend: str, tolerance: float, tuned: bool = False) -> None:
    """tuned: the layers chose their paths eagerly first, which the graph then follows, in
    inference and in training."""
    model = small_kw_model()
    x = torch.randn(2, 3, 16, 16)
    if tuned:
        torch.compiler.reset()  # else the batch size may stay dynamic from an earlier graph
        kwconvert.tune(model.eval(), x)
        kwconvert.tune(model.train(), x, backward=True)
    compiled = torch.compile(model, backend=backend, fullgraph=True)  # fullgraph: a graph break raises
    with torch.no_grad():
        assert relative_error(compiled.eval()(x), model.eval()(x)) <= tolerance
    cells = [p for name, p in model.named_parameters() if name.endswith("cells")]
    results = []
    for module in (compiled.train(), model.train()):
        out = module(x)
        results.append((out.detach(), torch.autograd.grad(out.square().sum(), cells)))
    (out_c, grads_c), (out_e, grads_e) = results
    assert relative_error(out_c, out_e) <= tolerance
    for grad_c, grad_e in zip(grads_c, grads_e):
        assert relative_error(grad_c, grad_e) <= 10 * tolerance


@pytest.mark.parametrize("tuned", (False, True))
def test_layers_compile_without_graph_breaks_and_match_eager(tuned):
    compiled_matches_eager("aot_eager", FLOAT32, tuned)


@pytest.mark.slow
def test_layers_compile_with_inductor_and_match_eager():
    compiled_matches_eager("inductor", 1e-4)


def test_kwconvert_path_in_the_environment_forces_a_path_and_a_bad_one_is_refused():
    import os
    import subprocess
    import sys
    probe = "from kwconvert import execution; print(execution.forced())"
    forced = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True,
                            env={**os.environ, "KWCONVERT_PATH": "grouped"})
    assert forced.stdout.strip() == "grouped", forced.stderr
    bad = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True,
                         env={**os.environ, "KWCONVERT_PATH": "fastest"})
    assert bad.returncode != 0 and "KWCONVERT_PATH must be one of" in bad.stderr
