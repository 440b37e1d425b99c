"""The compiled kernel (kwconvert/methods/kernelwarehouse/native.py and _native.c) computes what the
straightforward path computes, and the pure-PyTorch fallback takes over when it is absent."""
from __future__ import annotations

import copy
import itertools
import os
import platform
import shutil
import subprocess
import sys

import pytest
import torch
import torchvision
import torch.nn.functional as F
from torch import nn

import kwconvert
from kwconvert import reference_path, use_path
from kwconvert.methods.kernelwarehouse import assembly, native, path_choice, paths
from kwconvert.methods.kernelwarehouse.layers import KWConv2d, KWLinear, Warehouse, set_temperature

from .helpers import FLOAT32, input_dependent

needs_native = pytest.mark.skipif(not native.available(), reason="kwconvert's compiled kernel is not built")


def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return ((actual.double() - expected.double()).abs().max() / expected.double().abs().max()).item()


def kw_layer(cin: int, cout: int, kernel: int, cell: tuple[int, int], *, budget: float = 1.0, seed: int = 0,
             **conv) -> KWConv2d:
    """A float32 KW Conv2d with a chosen cell, in a warehouse with two spare cells, at tau 0.3."""
    torch.manual_seed(seed)
    mixtures = (cout // cell[0]) * (cin // cell[1]) * kernel * kernel
    warehouse = Warehouse(max(int(budget * mixtures), 1) + 2, (*cell, 1, 1))
    layer = KWConv2d(cin, cout, kernel, warehouse=warehouse, offset=0, budget=budget, hidden=8, **conv)
    if layer.bias is not None:
        nn.init.normal_(layer.bias)
    layer.tau = 0.3
    layer.warehouse_module = warehouse
    return layer.eval()


def assert_native_matches_float64_reference(layer: KWConv2d, x: torch.Tensor) -> None:
    """Both compiled paths of a dense layer ("native": assembled kernels, "inline": assembly
    inside the product), the one of a depthwise layer, against the float64 reference."""
    assert native.supports(layer.tiling, layer.groups, x)
    with torch.no_grad():
        reference = copy.deepcopy(layer).double()
        with reference_path():
            expected = reference(x.double())
        for path in ("native", "inline") if layer.groups == 1 else ("native",):
            with use_path(path):
                out = layer(x)
            assert out.dtype == torch.float32 and out.shape == expected.shape
            assert relative_error(out, expected) <= FLOAT32, path


def geometry_grid(kernels: tuple, last: tuple, label) -> list:
    """Kernel x stride x padding x padding mode x dilation x ``last`` ("same" needs stride 1)."""
    cases = []
    for kernel, stride, padding, mode, dilation, extra in itertools.product(
            kernels, (1, 2), (0, 1, "same"), ("zeros", "reflect"), (1, 2), last):
        if padding == "same" and stride != 1:
            continue
        cases.append(pytest.param(kernel, stride, padding, mode, dilation, extra,
                                  id=f"k{kernel}-s{stride}-p{padding}-{mode}-d{dilation}-{label(extra)}"))
    return cases


@needs_native
@pytest.mark.parametrize("kernel,stride,padding,mode,dilation,bias",
                         geometry_grid((1, 3), (True, False), lambda bias: "bias" if bias else "nobias"))
def test_native_equals_the_reference_on_the_conv_grid(kernel, stride, padding, mode, dilation, bias):
    # 2 x 2 blocks of 16 x 16 cells: every offset of the panel table is exercised
    layer = kw_layer(32, 32, kernel, (16, 16), stride=stride, padding=padding, padding_mode=mode,
                     dilation=dilation, bias=bias)
    assert_native_matches_float64_reference(layer, torch.randn(3, 32, 9, 8))


@needs_native
@pytest.mark.parametrize("cin,cout,cell", [(16, 48, (16, 16)), (32, 64, (32, 16)), (16, 128, (64, 16)),
                                           (48, 96, (96, 48)), (24, 48, (48, 24))],
                         ids=["panels16", "panels32", "panels64", "panels32-of-96", "panels16-of-48"])
@pytest.mark.parametrize("budget", [0.5, 1.0, 2.0])
def test_native_every_panel_width_and_budget(cin, cout, cell, budget):
    layer = kw_layer(cin, cout, 3, cell, budget=budget, padding=1)
    assert native.panel_width(layer.tiling) == next(w for w in (64, 32, 16) if cell[0] % w == 0)
    assert_native_matches_float64_reference(layer, torch.randn(2, cin, 7, 5))


@needs_native
@pytest.mark.parametrize("batch,height,width", [(1, 1, 1), (1, 5, 5), (3, 7, 7), (5, 2, 3), (2, 14, 13)],
                         ids=["1px", "b1-25rows", "b3-49rows", "b5-6rows", "b2-182rows"])
def test_native_any_number_of_rows_and_samples(batch, height, width):
    """Row tiles of up to 6 rows, and (sample, panel) items split over the threads unevenly."""
    layer = kw_layer(32, 64, 3, (32, 32), padding=1)
    assert_native_matches_float64_reference(layer, torch.randn(batch, 32, height, width))


@needs_native
def test_a_batch_too_big_for_one_call_runs_in_slices_with_the_same_result(monkeypatch):
    """Slices of at most NATIVE_SLICE_BYTES of temporaries keep glibc from handing big
    buffers back on every call; a batch of 5 in slices of 2, 2 and 1 gives the reference."""
    layer = kw_layer(16, 32, 3, (16, 16), padding=1, bias=True)
    x = torch.randn(5, 16, 6, 6)
    per_sample = (36 * 16 * 9 + 32 * 16 * 9) * 4
    monkeypatch.setattr(paths, "NATIVE_SLICE_BYTES", 2 * per_sample)
    assert paths._native_slice(paths._spec_for(layer, "native"), x, 36) == 2
    assert_native_matches_float64_reference(layer, x)


@needs_native
def test_native_takes_a_kernel_panel_bigger_than_the_cache():
    """512 input channels x 9 positions x 64 columns is a 1.2 MB panel, more than a core's L2:
    each row tile still sums over all of K in registers."""
    layer = kw_layer(512, 64, 3, (64, 512), padding=1)
    assert_native_matches_float64_reference(layer, torch.randn(2, 512, 5, 4))


@needs_native
@pytest.mark.parametrize("batch", [1, 6, 7, 13])
def test_inline_mixes_chunks_for_groups_of_samples(batch):
    """"inline" mixes up to 6 samples' kernels at a time in chunks of 128 rows of a segment: 160
    input channels per cell make a whole chunk and a partial one, 13 samples a partial group of
    samples, and with 2 panels the samples are split into blocks over the threads."""
    layer = kw_layer(160, 128, 3, (64, 160), padding=1, bias=True)
    assert native.panel_width(layer.tiling) == 64 and layer.tiling.blocks_out == 2
    assert_native_matches_float64_reference(layer, torch.randn(batch, 160, 4, 3))


@needs_native
@pytest.mark.parametrize("kernel,stride,padding,mode,dilation,channels",
                         geometry_grid((3, 5), (32, 24), lambda channels: f"c{channels}"))
def test_native_depthwise_equals_the_reference(kernel, stride, padding, mode, dilation, channels):
    """24 channels: the last vector of 16 is partial (masked loads and stores)."""
    layer = kw_layer(channels, channels, kernel, (channels // 2, 1), groups=channels, stride=stride,
                     padding=padding, padding_mode=mode, dilation=dilation, bias=True)
    assert native.is_depthwise(layer.tiling, layer.groups)
    assert_native_matches_float64_reference(layer, torch.randn(3, channels, 13, 11))


@needs_native
@pytest.mark.parametrize("width", [1, 2, 3, 9, 17, 40])
def test_native_depthwise_rows_of_every_width(width):
    """Rows with no interior pixel, a few, and several blocks of 8 with a remainder."""
    layer = kw_layer(48, 48, 3, (48, 1), groups=48, padding=1)
    assert_native_matches_float64_reference(layer, torch.randn(2, 48, 4, width))


def test_native_refuses_grouped_layers_that_are_not_depthwise():
    layer = kw_layer(32, 32, 3, (16, 8), groups=4, padding=1)
    assert not native.supports(layer.tiling, layer.groups, torch.randn(1, 32, 5, 5))
    multiplier = kw_layer(16, 32, 3, (16, 1), groups=16, padding=1)  # two outputs per input channel
    assert not native.is_depthwise(multiplier.tiling, multiplier.groups)


@needs_native
@pytest.mark.parametrize("shape", [(3, 48), (3, 5, 48), (2, 3, 4, 48), (48,)])
def test_native_linear_equals_the_reference(shape):
    """KWLinear's rows go straight into the compiled product (2 x 3 blocks of 16 x 16 cells)."""
    torch.manual_seed(0)
    warehouse = Warehouse(8, (16, 16))
    layer = KWLinear(48, 32, warehouse=warehouse, offset=0, budget=1.0, hidden=8).eval()
    layer.warehouse_module = warehouse
    layer.tau = 0.3
    nn.init.normal_(layer.bias)
    x = torch.randn(*shape)
    with torch.no_grad():
        with reference_path():
            expected = layer(x)
        out = layer(x)
        with use_path("matmul"):
            on_matmul = layer(x)
    assert out.shape == expected.shape
    assert relative_error(out, expected) <= FLOAT32
    assert relative_error(on_matmul, expected) <= FLOAT32


@needs_native
def test_native_in_training_falls_back_to_the_autograd_path():
    layer = kw_layer(32, 32, 3, (16, 16), padding=1).train()
    x = torch.randn(2, 32, 6, 6, requires_grad=True)
    results = []
    for path in ("native", "matmul"):
        with use_path(path):
            out = layer(x)
        results.append((out, torch.autograd.grad(out.square().sum(), [x, layer.warehouse.cells])))
    (out, grads), (expected, expected_grads) = results
    assert torch.equal(out, expected)
    assert all(torch.equal(a, b) for a, b in zip(grads, expected_grads))


def grads_on(layer: KWConv2d, x: torch.Tensor, path: str | None, through: nn.Module | None = None
             ) -> list[torch.Tensor]:
    """The output and the gradients of x and of every parameter, on ``path`` (None: the reference),
    or ``through`` a wrapper of the layer (a compiled one), which takes the paths the layer chose."""
    x = x.clone().requires_grad_()
    if through is not None:
        out = through(x)
    else:
        with use_path(path) if path else reference_path():
            out = layer(x)
    params = [p for p in layer.parameters() if p.requires_grad] + [layer.warehouse.cells]
    return [out, *torch.autograd.grad(out.square().sum(), [x, *params])]


@needs_native
@pytest.mark.parametrize("cin,cout,kernel,cell,stride,batch", [
    (32, 32, 3, (16, 16), 1, 3),     # 2 x 2 blocks: every output block's mixture per segment
    (32, 64, 3, (64, 32), 2, 35),    # stride 2, a second group of 32 samples for the weight gradient
    (160, 128, 3, (64, 160), 1, 2),  # 160 input channels: whole and partial chunks, panels of 32
    (48, 96, 1, (96, 48), 1, 7),     # a 1x1 layer, panels of 32 outputs and 16 inputs
], ids=["blocks", "stride2-b35", "chunks", "1x1"])
def test_inline_in_training_gives_the_reference_gradients(cin, cout, kernel, cell, stride, batch):
    """"inline" trains in the compiled kernel (forward, the rows' gradient, the gradients of alpha
    and of the warehouse): output and every gradient equal the float64 reference path's."""
    layer = kw_layer(cin, cout, kernel, cell, stride=stride, padding=kernel // 2, bias=True)
    assert_inline_trains_like_the_float64_reference(layer, torch.randn(batch, cin, 5, 6))


@needs_native
def test_inline_in_training_without_the_forwards_im2col_gathers_it_again_with_the_same_gradients(monkeypatch):
    """Up to the bytes a path may keep, the weight gradient reads the forward's im2col transposed in
    place; past them (none kept here) it gathers a transposed copy: the same reference gradients."""
    monkeypatch.setattr(paths, "KEEP_KERNELS_BYTES", 0)
    layer = kw_layer(32, 64, 3, (64, 32), stride=2, padding=1, bias=True)
    assert_inline_trains_like_the_float64_reference(layer, torch.randn(7, 32, 5, 6))


@needs_native
@pytest.mark.parametrize("threads", [2, 3])
def test_inline_weight_gradient_is_the_same_on_any_number_of_threads(threads):
    """The threads of ``inline_weight_grad`` share one warehouse gradient, each writing its own
    part of every block's rows (40 rows: 20 and 20, or 13, 13 and 14), while the nine mixtures of
    a 3x3 layer add into the same rows: the gradients equal the float64 reference's (the other
    tests run on conftest's one thread)."""
    layer = kw_layer(40, 64, 3, (64, 40), padding=1, bias=True)
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        assert_inline_trains_like_the_float64_reference(layer, torch.randn(5, 40, 4, 5))
    finally:
        torch.set_num_threads(previous)


@needs_native
@pytest.mark.parametrize("one_copy", [False, True], ids=["two-layouts", "one-copy"])
def test_inline_training_packs_the_warehouse_once_per_step_and_follows_the_optimizer(one_copy, monkeypatch):
    """Between two optimizer steps, the forward and backward of "inline" read one packed copy of
    the warehouse per layout (rows for the forward and the weight gradient, columns for the input
    gradient; rows only for a warehouse too big for two copies); an optimizer step drops them (stale
    copies would otherwise live on into the next backward, beside the fresh ones) and makes the
    next forward pack again.  Two SGD steps end on the float64 reference path's weights."""
    packings = counted_packings(monkeypatch)
    monkeypatch.setattr(paths, "ONE_COPY_BYTES", 0 if one_copy else paths.ONE_COPY_BYTES)
    layouts = ["rows"] if one_copy else ["columns", "rows"]
    layer = kw_layer(32, 64, 3, (64, 32), padding=1, bias=True).train()
    reference = copy.deepcopy(layer).double()
    x = torch.randn(3, 32, 5, 6)
    for model, inputs, path in ((layer, x, "inline"), (reference, x.double(), None)):
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
        inputs.requires_grad_()
        for _ in range(2):
            optimizer.zero_grad()
            with use_path(path) if path else reference_path():
                model(inputs).square().mean().backward()
            if path:
                assert sorted(key[1] for key in packed_copies(layer)) == layouts
            optimizer.step()
            assert not packed_copies(layer)
    assert sorted(packings) == sorted(layouts * 2)
    assert relative_error(layer.warehouse.cells, reference.warehouse.cells) <= 4 * FLOAT32
    assert relative_error(layer.attention.fc1.weight, reference.attention.fc1.weight) <= 4 * FLOAT32


@needs_native
def test_a_stage_trained_inline_turns_its_warehouse_gradient_into_the_cells_layout_once(monkeypatch):
    """Two layers on one warehouse, two batches: accumulated by two backward passes, and summed
    into one backward pass of both forwards.  The layers' gradients add up in one tensor of the
    packed rows' layout per pass (the first layer's; the others add into it), which each pass
    reorders once (not once per layer), and every gradient equals the float64 reference path's
    (as closely as that path's own float32 gradients, where they cancel: ``assert_same_grads``)."""
    model, reference, batches = two_layers_on_one_warehouse()
    reorders, reorder = [], native.cells_from_rows
    monkeypatch.setattr(native, "cells_from_rows", lambda rows, cell: reorders.append(cell) or reorder(rows, cell))
    new_sums, new_sum = [], native._inline_weight_grad
    monkeypatch.setattr(native, "_inline_weight_grad", lambda *args: new_sums.append(1) or new_sum(*args))

    def grads(net: nn.Module, separately: bool, path: str | None) -> list[torch.Tensor]:
        net.zero_grad(set_to_none=True)
        dtype = next(net.parameters()).dtype
        with use_path(path) if path else reference_path():
            if separately:  # a backward pass per batch
                for x in batches:
                    net(x.to(dtype)).square().mean().backward()
            else:  # both forwards, then one backward pass
                sum(net(x.to(dtype)).square().mean() for x in batches).backward()
        return [p.grad.clone() for p in net.parameters()]

    for separately, passes in ((True, 2), (False, 1)):
        reorders.clear()
        new_sums.clear()
        got = grads(model, separately, "inline")
        assert len(reorders) == len(new_sums) == passes
        assert_same_grads(got, grads(reference, separately, None), grads(model, separately, None))
    assert paths._inline_trains(model[0], batches[0]) and model[0].warehouse is model[2].warehouse


def two_layers_on_one_warehouse() -> tuple[nn.Module, nn.Module, list[torch.Tensor]]:
    """Two inline-trainable KW layers on one warehouse, a float64 copy, and two batches."""
    first = kw_layer(32, 32, 3, (32, 32), padding=1, bias=True)
    second = KWConv2d(32, 32, 3, warehouse=first.warehouse_module, offset=0, budget=1.0, hidden=8, padding=1)
    second.tau = 0.3
    model = nn.Sequential(first, nn.ReLU(), second).train()
    return model, copy.deepcopy(model).double(), [torch.randn(2, 32, 5, 6) for _ in range(2)]


@needs_native
def test_a_backward_pass_that_stops_short_of_the_warehouse_leaves_no_gradient_behind():
    """A pass asking only for the input's gradient (a saliency map, a gradient penalty) runs the
    layers' backward but not the warehouse's node: the gradient its layers start is dropped with
    the pass, and the next pass gives the warehouse the gradient a lone backward pass gives it."""
    model, _, batches = two_layers_on_one_warehouse()
    alone = copy.deepcopy(model)
    x = batches[0].clone().requires_grad_()
    with use_path("inline"):
        loss = model(x).square().mean()
        torch.autograd.grad(loss, x, retain_graph=True)
        loss.backward()
        alone(x).square().mean().backward()
    assert model[0].warehouse.cells.grad.abs().max() > 0
    for got, expected in zip(model.parameters(), alone.parameters()):
        assert torch.equal(got.grad, expected.grad)


@needs_native
@pytest.mark.parametrize("path", ["bmm", "premix"])
def test_batched_and_premixed_training_put_the_warehouse_in_panel_order_once_per_step(path, monkeypatch):
    """Two layers on one warehouse, two SGD steps on "bmm" or "premix", which read the whole
    warehouse in panel order in every forward and backward: it is put in that order once per
    step (the packed copy, not four copies), rebuilt after each step, so that both steps end
    on the float64 reference path's warehouse."""
    model, reference, batches = two_layers_on_one_warehouse()
    packings = counted_packings(monkeypatch)  # a copy made per call goes through the same layout
    for net, net_path in ((model, path), (reference, None)):
        optimizer = torch.optim.SGD(net.parameters(), lr=0.1)
        dtype = next(net.parameters()).dtype
        for x in batches:
            optimizer.zero_grad()
            with use_path(net_path) if net_path else reference_path():
                net(x.to(dtype)).square().mean().backward()
            optimizer.step()
        if net is model:
            assert packings.count("panels") == len(batches)
    assert relative_error(model[0].warehouse.cells, reference[0].warehouse.cells) <= 4 * FLOAT32


@needs_native
def test_inline_trains_after_an_evaluation_in_inference_mode():
    """A copy packed under ``torch.inference_mode`` (an evaluation between two training steps)
    cannot be saved by a training graph: training packs its own, and its gradients equal the
    float64 reference path's."""
    layer = kw_layer(32, 32, 3, (32, 32), padding=1, bias=True)
    x = torch.randn(2, 32, 5, 6)
    with torch.inference_mode(), use_path("inline"):
        layer(x)
    assert any(entry[2].is_inference() for entry in packed_copies(layer).values())
    assert_inline_trains_like_the_float64_reference(layer, x)


def counted_packings(monkeypatch) -> list[str]:
    """The layout of every packed warehouse copy made from now on, in order."""
    packings = []

    def counted(layout, pack):
        return lambda cells, width: packings.append(layout) or pack(cells, width)

    for layout, pack in list(assembly._LAYOUTS.items()):
        monkeypatch.setitem(assembly._LAYOUTS, layout, counted(layout, pack))
    return packings


def packed_copies(layer: KWConv2d) -> dict:
    """The packed copies of the layer's warehouse alive now: {(width, layout, float16): entry}."""
    return assembly._packed.get(id(layer.warehouse.cells), {})


def assert_inline_trains_like_the_float64_reference(layer: KWConv2d, x: torch.Tensor) -> None:
    layer.train()
    assert paths._inline_trains(layer, x)
    got = grads_on(layer, x, "inline")
    expected = grads_on(copy.deepcopy(layer).double(), x.double(), None)
    assert len(got) == len(expected) == 2 + 1 + len([p for p in layer.parameters() if p.requires_grad])
    assert_same_grads(got, expected, grads_on(layer, x, None))


@needs_native
def test_inline_in_training_falls_back_where_the_kernel_cannot_take_the_backward():
    """12 input channels per cell (no panel of 8): the input gradient cannot be mixed in panels, so
    "inline" trains on "matmul" and gives its results."""
    layer = kw_layer(12, 16, 3, (16, 12), padding=1).train()
    x = torch.randn(2, 12, 5, 5)
    assert not paths._inline_trains(layer, x)
    for a, b in zip(grads_on(layer, x, "inline"), grads_on(layer, x, "matmul")):
        assert torch.equal(a, b)


@needs_native
def test_native_packed_warehouse_follows_changes_of_the_cells():
    layer = kw_layer(32, 32, 3, (16, 16), padding=1)
    x = torch.randn(2, 32, 6, 6)
    assert_native_matches_float64_reference(layer, x)
    with torch.no_grad():
        layer.warehouse.cells.mul_(-3)
    assert_native_matches_float64_reference(layer, x)


@pytest.fixture(scope="module")
def kw_resnet18() -> nn.Module:
    torch.manual_seed(0)
    model = input_dependent(kwconvert.convert(torchvision.models.resnet18(weights=None, num_classes=10), 1.0)).eval()
    set_temperature(model, 0.5)
    return model


@needs_native
def test_resnet18_on_the_native_path_equals_the_reference(kw_resnet18):
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        with reference_path():
            expected = kw_resnet18(x)
        with use_path("native"):
            out = kw_resnet18(x)
    assert relative_error(out, expected) <= FLOAT32


def test_without_the_extension_the_fallback_runs_and_agrees(kw_resnet18, monkeypatch):
    """The pure-PyTorch paths give what the compiled kernel gives, and 'native' is never offered."""
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        timed = kw_resnet18(x)  # the timed choice: "native" where it is the fastest
        monkeypatch.setattr(native, "_library", lambda: None)
        path_choice.clear_caches()
        path_choice.forget_paths(kw_resnet18)
        assert not native.available()
        fallback = kw_resnet18(x)
    assert "native" not in {path for choices in path_choice.chosen_paths(kw_resnet18).values() for path in choices.values()}
    assert relative_error(fallback, timed) <= FLOAT32
    path_choice.clear_caches()
    path_choice.forget_paths(kw_resnet18)


def test_the_environment_switch_turns_the_extension_off():
    code = "from kwconvert.methods.kernelwarehouse import native; print(native.available())"
    env = {**os.environ, "KWCONVERT_NATIVE": "0"}
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "False"


@pytest.mark.skipif(os.environ.get("KWCONVERT_NATIVE") == "0", reason="turned off by KWCONVERT_NATIVE=0")
def test_every_copy_is_built_where_a_compiler_is_and_the_best_runnable_one_runs():
    """pip builds one copy per instruction set with the machine's compiler: where there is one,
    a missing copy is a bug; the copy that runs is the best this CPU executes."""
    if not (shutil.which("cc") or shutil.which("gcc")):
        pytest.skip("no C compiler on this machine")
    expected = native.ISAS if platform.machine().lower() in ("x86_64", "amd64") else ("baseline",)
    assert native.built_isas() == expected, "a kernel copy did not build: see `pip install -v -e .`"
    assert native.available() and native.isa() == native.cpu_isas()[0]


def test_no_copy_needs_more_than_its_instruction_set():
    """The baseline copy holds no AVX instruction and the AVX2 copy no AVX-512 one, so a build
    runs on any x86-64 CPU (a build for the build machine's own CPU put its ISA everywhere)."""
    objdump = shutil.which("objdump")
    if objdump is None or platform.machine().lower() not in ("x86_64", "amd64"):
        pytest.skip("needs objdump on x86-64")
    forbidden = {"baseline": ("%ymm", "%zmm"), "avx2": ("%zmm",)}
    for isa in set(forbidden) & set(native.built_isas()):
        code = subprocess.run([objdump, "-d", native._module_file(isa)], capture_output=True, text=True,
                              check=True).stdout
        assert not any(register in code for register in forbidden[isa]), isa


def run_on_isa(isa: str, monkeypatch) -> None:
    """Force the compiled copy of ``isa`` for this test (KWCONVERT_ISA), or skip it where that copy
    is not built or this CPU cannot execute it."""
    if isa not in native.built_isas() or isa not in native.cpu_isas():
        pytest.skip(f"the {isa} copy is not built or this CPU cannot execute it")
    monkeypatch.setenv("KWCONVERT_ISA", isa)
    monkeypatch.delenv("KWCONVERT_NATIVE", raising=False)


@pytest.mark.parametrize("isa", native.ISAS)
def test_every_copy_this_cpu_runs_equals_the_reference(isa, monkeypatch):
    """Forced with KWCONVERT_ISA, each copy gives the float64 reference on dense layers of every
    panel width, a partial row tile, and depthwise layers with a partial vector of channels."""
    run_on_isa(isa, monkeypatch)
    assert native.isa() == isa
    for cin, cout, cell in ((16, 8, (8, 16)), (16, 48, (16, 16)), (32, 64, (32, 16)), (16, 128, (64, 16))):
        assert_native_matches_float64_reference(kw_layer(cin, cout, 3, cell, padding=1, bias=True),
                                                 torch.randn(2, cin, 7, 5))
    for channels in (24, 20):
        depthwise = kw_layer(channels, channels, 3, (channels, 1), groups=channels, padding=1, bias=True)
        assert_native_matches_float64_reference(depthwise, torch.randn(2, channels, 11, 10))
    assert_inline_trains_like_the_float64_reference(kw_layer(48, 64, 3, (64, 48), stride=2, padding=1, bias=True),
                                                   torch.randn(7, 48, 5, 6))
    monkeypatch.setattr(paths, "ONE_COPY_BYTES", 0)  # the input gradient's transposes
    assert_inline_trains_like_the_float64_reference(kw_layer(48, 192, 3, (192, 48), padding=1), torch.randn(7, 48, 5, 6))


@needs_native
@pytest.mark.parametrize("cout,cin,cell", [(192, 48, (192, 48)), (48, 32, (24, 16)), (64, 64, (64, 32))],
                         ids=["3-panels-of-64", "3-panels-of-8", "2-input-blocks"])
def test_inline_input_gradient_from_the_forward_copy_equals_the_reference(cout, cin, cell, monkeypatch):
    """A warehouse too big for a second packed copy: the input gradient mixes the forward's rows
    and transposes them, a few output panels at a time (3 panels: a chunk of two, then one), and
    gives the float64 reference's gradients."""
    monkeypatch.setattr(paths, "ONE_COPY_BYTES", 0)
    assert_inline_trains_like_the_float64_reference(kw_layer(cin, cout, 3, cell, padding=1, bias=True),
                                                   torch.randn(5, cin, 6, 5))


@needs_native
@pytest.mark.parametrize("one_copy", [False, True], ids=["own-copy", "forward-copy"])
def test_an_input_gradient_split_by_samples_equals_the_reference(one_copy, monkeypatch):
    """A 1x1 layer has a single (segment, input panel) pair: its input gradient is split into
    blocks of samples (20 samples: groups of 6, 6, 6 and 2), each item writing its own samples'
    rows, and still gives the float64 reference's gradients, from either packed copy."""
    if one_copy:
        monkeypatch.setattr(paths, "ONE_COPY_BYTES", 0)
    assert_inline_trains_like_the_float64_reference(kw_layer(32, 64, 1, (32, 32), stride=2, bias=True),
                                                   torch.randn(20, 32, 6, 5))


@needs_native
def test_a_weight_gradient_over_two_groups_of_samples_equals_the_reference():
    """70 samples: the weight gradient sums a group of 64 and one of 6 into the same rows of the
    warehouse's gradient, and gives the float64 reference's gradients."""
    assert_inline_trains_like_the_float64_reference(kw_layer(16, 32, 3, (32, 16), padding=1),
                                                   torch.randn(70, 16, 4, 4))


@pytest.mark.parametrize("isa", native.ISAS)
def test_the_weight_gradient_of_every_copy_reads_an_im2col_transposed_in_place(isa, monkeypatch):
    """The im2col ``(B, rows, K)`` viewed transposed is read where it lies (elements K apart along
    each of A^T's rows): the same sums, to the bit, as from a transposed copy; past
    ``IN_PLACE_ROWS`` rows the operator takes a copy."""
    run_on_isa(isa, monkeypatch)
    tiling, cols, alpha, rows, _ = inline_operands(batch=8)
    grad = torch.randn(cols.shape[0], cols.shape[1], tiling.weight_shape[0])
    in_place = native.inline_weight_grad(tiling, cols.transpose(1, 2), grad, alpha, rows)
    copied = native.inline_weight_grad(tiling, cols.transpose(1, 2).contiguous(), grad, alpha, rows)
    assert all(torch.equal(a, b) for a, b in zip(in_place, copied))
    monkeypatch.setattr(native, "IN_PLACE_ROWS", cols.shape[1] - 1)
    assert all(torch.equal(a, b) for a, b in
               zip(native.inline_weight_grad(tiling, cols.transpose(1, 2), grad, alpha, rows), copied))


#: premix's operands: batch, output pixels L, segments S (kernel positions x input blocks), c_e,
#: output blocks, cells n; row tiles of every height (n = 1, 7, 13), several panels per pixel
PREMIX_SHAPES = [(3, 16, 9, 128, 1, 9), (2, 5, 18, 64, 2, 13), (4, 3, 2, 16, 3, 7), (1, 1, 9, 48, 1, 1)]


def premix_float64(cols, weights, n, c_e):
    """``premix``'s rows ``(B * OB * L, n * c_e)`` in float64 einsums."""
    batch, length, depth = cols.shape
    grid = weights.double().view(batch, -1, n, weights.shape[2])  # (B, OB, n, S)
    mixed = torch.einsum("bojs,blsc->boljc", grid, cols.double().view(batch, length, -1, c_e))
    return mixed.reshape(-1, n * c_e)


@pytest.mark.parametrize("isa", native.ISAS)
def test_the_premix_operators_of_every_copy_equal_float64_products(isa, monkeypatch):
    """``premix`` (each pixel's im2col row mixed per cell) and its two gradients, in the kernel and
    in the PyTorch fallback, against float64 einsums: output blocks, input blocks, partial tiles."""
    run_on_isa(isa, monkeypatch)
    torch.manual_seed(3)
    for batch, length, segments, c_e, blocks_out, n in PREMIX_SHAPES:
        assert native.premixes(c_e)
        cols = torch.randn(batch, length, segments * c_e, dtype=torch.float64)
        weights = torch.randn(batch, blocks_out * n, segments, dtype=torch.float64)
        grad = torch.randn(batch * blocks_out * length, n * c_e, dtype=torch.float64)
        expected = (premix_float64(cols, weights, n, c_e),
                    *torch.autograd.functional.vjp(lambda c, w: premix_float64(c, w, n, c_e), (cols, weights), grad)[1])
        cols, weights, grad = cols.float(), weights.float(), grad.float()
        for compiled in (True, False):
            with monkeypatch.context() as patched:
                if not compiled:
                    patched.setattr(native, "_library", lambda: None)
                got = (native.premix(cols, weights, n, c_e), native.premix_input_grad(grad, weights, length, c_e),
                       native.premix_weight_grad(grad, cols, n, c_e))
            for index, (g, e) in enumerate(zip(got, expected)):
                assert g.shape == e.shape and relative_error(g, e) <= FLOAT32, (c_e, compiled, index)


@needs_native
def test_the_premix_operators_pass_opcheck():
    """premix and its gradients: schema, fake implementation, dynamic batch."""
    batch, length, segments, c_e, blocks_out, n = PREMIX_SHAPES[1]
    cols, weights = torch.randn(batch, length, segments * c_e), torch.randn(batch, blocks_out * n, segments)
    grad = torch.randn(batch * blocks_out * length, n * c_e)
    torch.library.opcheck(torch.ops.kwconvert.premix.default, (cols, weights, n, c_e))
    torch.library.opcheck(torch.ops.kwconvert.premix_input_grad.default, (grad, weights, length, c_e))
    torch.library.opcheck(torch.ops.kwconvert.premix_weight_grad.default, (grad, cols, n, c_e))


@needs_native
@pytest.mark.parametrize("isa", native.ISAS)
@pytest.mark.parametrize("keep", [True, False], ids=["kept", "gathered-again"])
def test_premix_of_every_copy_trains_like_the_float64_reference(isa, keep, monkeypatch):
    """"premix" in float32 mixes the inputs and takes both their gradients in the compiled kernel:
    a 3x3 layer, a strided one of two output and two input blocks, a 1x1 one of three input blocks:
    output and every gradient equal the float64 reference's, whether backward finds the im2col
    and the mixed inputs kept or gathers and mixes them again."""
    run_on_isa(isa, monkeypatch)
    if not keep:
        monkeypatch.setattr(paths, "KEEP_KERNELS_BYTES", 0)
    for layer, x in ((kw_layer(32, 32, 3, (32, 32), padding=1, bias=True), torch.randn(5, 32, 4, 4)),
                     (kw_layer(32, 32, 3, (16, 16), stride=2, padding=1), torch.randn(3, 32, 7, 7)),
                     (kw_layer(48, 16, 1, (16, 16), bias=True), torch.randn(4, 48, 3, 5))):
        layer.train()
        assert native.premixes(layer.tiling.cell[1]) and "premix" in paths._available(layer, x)
        assert_same_grads(grads_on(layer, x, "premix"), grads_on(copy.deepcopy(layer).double(), x.double(), None),
                          grads_on(layer, x, None))


def test_a_copy_the_cpu_cannot_execute_is_refused_with_a_warning(monkeypatch):
    """Loading it would end the process with an illegal instruction: a warning, and the best it can."""
    monkeypatch.setattr(native, "cpu_isas", lambda: ("baseline",))
    monkeypatch.setenv("KWCONVERT_ISA", "avx512")
    monkeypatch.delenv("KWCONVERT_NATIVE", raising=False)
    native._choose.cache_clear()
    try:
        with pytest.warns(RuntimeWarning, match="this CPU cannot execute that kernel"):
            assert native.isa() == ("baseline" if "baseline" in native.built_isas() else None)
        monkeypatch.setenv("KWCONVERT_ISA", "sse9")
        with pytest.raises(ValueError, match="KWCONVERT_ISA must be one of avx512, avx2, baseline"):
            native.available()
    finally:
        monkeypatch.undo()
        native._choose.cache_clear()


def test_a_copy_that_cannot_be_loaded_gives_way_to_the_next_with_a_warning(monkeypatch):
    """A missing shared library (an OpenMP runtime on the serving machine) is not a crash at the
    first forward: the next copy runs, or the pure-PyTorch paths, and the model still computes."""
    best = native.cpu_isas()[0]
    loaded = native._load

    def load(isa: str):
        if isa == best:
            raise OSError("libgomp.so.1: cannot open shared object file")
        return loaded(isa)

    monkeypatch.setattr(native, "_load", load)
    monkeypatch.delenv("KWCONVERT_ISA", raising=False)
    monkeypatch.delenv("KWCONVERT_NATIVE", raising=False)
    native._choose.cache_clear()
    try:
        with pytest.warns(RuntimeWarning, match=f"{best} kernel cannot be loaded .*libgomp"):
            assert native.isa() != best
        layer, x = kw_layer(16, 16, 3, (16, 16), padding=1), torch.randn(2, 16, 5, 5)
        with torch.no_grad():
            with use_path("native"):
                out = layer(x)
            with reference_path():
                assert relative_error(out, layer(x)) <= FLOAT32
    finally:
        monkeypatch.undo()
        native._choose.cache_clear()


# --- the operators ---------------------------------------------------------------------------


def conv_operands(batch: int = 2, grad: bool = False):
    """cols, blocks and bias of a 3x3 layer of 2 x 2 blocks of 16 x 16 cells, in panel order."""
    torch.manual_seed(5)
    tiling = native.Tiling((32, 32, 3, 3), (16, 16, 1, 1))
    cols = torch.randn(batch, 7, 32 * 9, requires_grad=grad)
    blocks = torch.randn(batch, tiling.cells, 256, requires_grad=grad)
    bias = torch.randn(32, requires_grad=grad)
    return tiling, cols, blocks, bias


def inline_operands(batch: int = 2, grad: bool = False):
    """cols, attentions over a warehouse of 5 cells, that warehouse as ``inline_rows``, and bias."""
    tiling, cols, _, bias = conv_operands(batch, grad)
    alpha = torch.randn(batch, tiling.cells, 5, requires_grad=grad)
    rows = native.inline_rows(torch.randn(5, 16, 16, 1, 1), 16).requires_grad_(grad)
    return tiling, cols, alpha, rows, bias


#: kernel, stride, dilation, zero padding (top, bottom, left, right), image (H, W): square and
#: uneven windows, strides that skip pixels, padding on one side only, windows wider than the image
WINDOWS = [((3, 3), (1, 1), (1, 1), (1, 1, 1, 1), (7, 6)), ((3, 3), (2, 2), (1, 1), (1, 1, 1, 1), (9, 8)),
           ((1, 1), (2, 2), (1, 1), (0, 0, 0, 0), (7, 7)), ((3, 2), (1, 2), (2, 1), (2, 0, 1, 3), (6, 9)),
           ((7, 7), (2, 2), (1, 1), (3, 3, 3, 3), (5, 4))]


def unfolded(x: torch.Tensor, kernel, stride, dilation, padding) -> torch.Tensor:
    """``F.unfold``'s im2col of the zero-padded image, in the NHWC K order: ``(B, L, kh * kw * C)``."""
    top, bottom, left, right = padding
    cols = F.unfold(F.pad(x, (left, right, top, bottom)), kernel, dilation=dilation, stride=stride)
    batch, channels = x.shape[:2]
    return cols.view(batch, channels, kernel[0] * kernel[1], -1).permute(0, 3, 2, 1).reshape(
        batch, cols.shape[2], -1)


def folded(cols: torch.Tensor, shape, kernel, stride, dilation, padding) -> torch.Tensor:
    """``F.fold``'s sum of the rows ``(B, L, kh * kw * C)`` into the padded image, padding cut off."""
    batch, channels, height, width = shape
    top, bottom, left, right = padding
    grid = cols.view(batch, cols.shape[1], kernel[0] * kernel[1], channels).permute(0, 3, 2, 1)
    image = F.fold(grid.reshape(batch, -1, cols.shape[1]), (height + top + bottom, width + left + right), kernel,
                   dilation=dilation, stride=stride)
    return image[:, :, top:top + height, left:left + width]


@pytest.mark.parametrize("compiled", [pytest.param(True, marks=needs_native), False], ids=["kernel", "pytorch"])
@pytest.mark.parametrize("window", WINDOWS, ids=lambda window: "k{}x{}-s{}x{}-d{}x{}-p{}{}{}{}-{}x{}".format(
    *itertools.chain(*window)))
def test_im2col_and_col2im_equal_unfold_and_fold(window, compiled, monkeypatch):
    """The compiled im2col (both layouts) and its gradient, and the PyTorch ops that replace them
    where the kernel is not built, equal F.unfold and F.fold; on three threads, which split the
    samples' rows between them (5 samples, 3 to 9 rows each)."""
    kernel, stride, dilation, padding, size = window
    if not compiled:
        monkeypatch.setattr(native, "_library", lambda: None)
    x = torch.randn(5, 6, *size).contiguous(memory_format=torch.channels_last)
    previous = torch.get_num_threads()
    torch.set_num_threads(3)
    try:
        cols = native.im2col(x, kernel, stride, dilation, padding)
        cols_t = native.im2col(x, kernel, stride, dilation, padding, transposed=True)
        grad = torch.randn_like(cols)
        image = native.col2im(grad, x.shape, kernel, stride, dilation, padding)
    finally:
        torch.set_num_threads(previous)
    expected = unfolded(x, kernel, stride, dilation, padding)
    assert torch.equal(cols, expected) and torch.equal(cols_t, expected.transpose(1, 2))
    assert image.is_contiguous(memory_format=torch.channels_last)
    assert relative_error(image, folded(grad, x.shape, kernel, stride, dilation, padding)) <= FLOAT32


@pytest.mark.parametrize("isa", native.ISAS)
@pytest.mark.parametrize("stride", (1, 2))
def test_the_transposed_im2col_of_every_copy_equals_unfold(isa, stride, monkeypatch):
    """The transposed im2col, which gathers 8 pixels x 8 channels at a time across output rows (a
    7 x 7 map's rows are shorter than 8), on every copy this CPU runs: 20 channels (two blocks
    and a tail), up to 130 pixels (blocks of 64 and a partial one), windows off every edge, 2 threads."""
    run_on_isa(isa, monkeypatch)
    kernel, dilation, padding = (3, 3), (1, 1), (1, 1, 2, 0)
    for size in ((7, 7), (10, 13 * stride)):
        x = torch.randn(3, 20, *size).contiguous(memory_format=torch.channels_last)
        previous = torch.get_num_threads()
        torch.set_num_threads(2)
        try:
            cols_t = native.im2col(x, kernel, (stride, stride), dilation, padding, transposed=True)
        finally:
            torch.set_num_threads(previous)
        assert torch.equal(cols_t, unfolded(x, kernel, (stride, stride), dilation, padding).transpose(1, 2))


def test_im2col_and_col2im_are_each_others_gradient():
    """The operators' autograd formulas: float64 gradcheck (the PyTorch ops run; the kernel is
    float32), through both layouts."""
    x = torch.randn(2, 3, 5, 4, dtype=torch.float64, requires_grad=True)
    window = ((3, 2), (2, 1), (1, 2), (1, 2, 0, 1))
    assert torch.autograd.gradcheck(lambda x: native.im2col(x, *window), (x,))
    assert torch.autograd.gradcheck(lambda x: native.im2col(x, *window, transposed=True), (x,))
    cols = native.im2col(x.detach(), *window).requires_grad_()
    assert torch.autograd.gradcheck(lambda cols: native.col2im(cols, x.shape, *window), (cols,))


def depthwise_operands(batch: int = 2, grad: bool = False):
    torch.manual_seed(6)
    x = torch.randn(batch, 20, 9, 8).contiguous(memory_format=torch.channels_last).requires_grad_(grad)
    return x, torch.randn(batch, 9, 20, requires_grad=grad), torch.randn(20, requires_grad=grad)


def test_the_operators_pass_opcheck():
    """Schema, fake (shape-only) implementation, autograd registration and AOT dispatch with a
    dynamic batch, as torch.library.opcheck checks them; with and without a bias."""
    tiling, cols, blocks, bias = conv_operands(grad=True)
    for b in (bias, None):
        torch.library.opcheck(torch.ops.kwconvert.conv.default,
                              (cols, blocks, b, list(tiling.weight_shape), list(tiling.cell)))
    x, taps, dw_bias = depthwise_operands(grad=True)
    for stride, out_size in ((1, [9, 8]), (2, [5, 4])):
        torch.library.opcheck(torch.ops.kwconvert.depthwise.default,
                              (x, taps, dw_bias, [stride, stride], [1, 1], [1, 1], [3, 3], out_size))
    alpha = torch.randn(5, 6, requires_grad=True)
    panels = torch.randn(3, 6, 16, requires_grad=True)
    torch.library.opcheck(torch.ops.kwconvert.mix.default, (alpha, panels))
    torch.library.opcheck(torch.ops.kwconvert.mix.default, (alpha.detach(), panels.detach().half()))
    x = torch.randn(2, 6, 7, 5, requires_grad=True).contiguous(memory_format=torch.channels_last)
    kernel, stride, dilation, padding, _ = WINDOWS[3]
    window = (list(kernel), list(stride), list(dilation), list(padding))
    for transposed in (False, True):
        torch.library.opcheck(torch.ops.kwconvert.im2col.default, (x, *window, transposed))
    cols = native.im2col(x.detach(), *window).requires_grad_()
    torch.library.opcheck(torch.ops.kwconvert.col2im.default, (cols, list(x.shape), *window))
    tiling, cols, mixtures, rows, bias = inline_operands(grad=True)
    for b in (bias, None):
        torch.library.opcheck(torch.ops.kwconvert.inline_conv.default,
                              (cols, mixtures, rows, b, list(tiling.weight_shape), list(tiling.cell)))


def test_the_operators_on_packed_copies_pass_opcheck():
    """``mix_cached`` and ``inline_conv_cached`` (a compiled graph's inference, reading the packed
    copy of the warehouse they are given): schema, fake implementation, dynamic batch."""
    tiling, cols, alpha, _, bias = inline_operands()
    cells = torch.randn(5, 16, 16, 1, 1)
    for b in (bias, None):
        torch.library.opcheck(torch.ops.kwconvert.inline_conv_cached.default,
                              (cols, alpha, cells, b, list(tiling.weight_shape), list(tiling.cell)))
    for panels in (0, 16):
        torch.library.opcheck(torch.ops.kwconvert.mix_cached.default, (alpha.reshape(-1, 5), cells, panels))


@needs_native
def test_the_backward_operators_of_inline_pass_opcheck():
    """``inline_input_grad`` and ``inline_weight_grad`` (what inline_conv's autograd formula runs
    where the kernel can, in a compiled graph too), and ``inline_weight_grad_into`` (the layers of
    a stage adding up their warehouse gradients in eager training): schema, fake implementation,
    dynamic batch; the last adds exactly what the first returns."""
    tiling, cols, alpha, rows, _ = inline_operands(batch=3)
    shapes = (list(tiling.weight_shape), list(tiling.cell))
    grad = torch.randn(cols.shape[0], cols.shape[1], tiling.weight_shape[0])
    columns = native.inline_columns(native.cells_from_rows(rows, tiling.cell), native.input_width(tiling))
    for warehouse in (rows, columns):
        torch.library.opcheck(torch.ops.kwconvert.inline_input_grad.default, (grad, alpha, warehouse, *shapes))
    cols_t = cols.transpose(1, 2)
    torch.library.opcheck(torch.ops.kwconvert.inline_weight_grad.default, (cols_t, grad, alpha, rows, *shapes))
    torch.library.opcheck(torch.ops.kwconvert.inline_weight_grad_into.default,
                          (cols_t, grad, alpha, rows, torch.randn(rows.shape), *shapes))
    grad_alpha, grad_rows = native.inline_weight_grad(tiling, cols_t, grad, alpha, rows)
    start = torch.randn(rows.shape)
    added_alpha, total = native.inline_weight_grad(tiling, cols_t, grad, alpha, rows, into=start.clone())
    assert torch.equal(added_alpha, grad_alpha)
    assert relative_error(total, start + grad_rows) <= FLOAT32
    with pytest.raises(ValueError, match="must be contiguous and of the rows' shape"):
        native.inline_weight_grad(tiling, cols_t, grad, alpha, rows, into=torch.zeros(rows.shape).transpose(0, 1))


@pytest.mark.parametrize("path", ("grouped", "conv", "matmul", "bmm", "premix", "inline"))
def test_every_path_a_layer_may_train_on_compiles_into_one_graph(path):
    """A layer whose eager choice for training is ``path`` (2 x 2 blocks of cells) trains in one
    compiled graph (fullgraph: a graph break raises) and gives eager's output and gradients."""
    layer, x = kw_layer(32, 32, 3, (16, 16), padding=1, bias=True).train(), torch.randn(3, 32, 6, 5)
    expected = grads_on(layer, x, path)
    assert_same_grads(grads_on(layer, x, None, through=compiled_for_training(layer, x, path)), expected)


def compiled_for_training(layer: KWConv2d, x: torch.Tensor, path: str) -> nn.Module:
    """``layer`` tuned for training on ``x``, its choice set to ``path``, compiled whole
    (fullgraph: a graph break raises)."""
    kwconvert.tune(layer, x, backward=True)
    layer.path_choices.update((key, path) for key in layer.path_choices)
    torch.compiler.reset()  # a batch size an earlier test's graph varied would stay dynamic
    return torch.compile(layer, backend="aot_eager", fullgraph=True)


def assert_same_grads(got: list[torch.Tensor], expected: list[torch.Tensor],
                      float32: list[torch.Tensor] | None = None) -> None:
    """Every tensor within 4 * FLOAT32 of ``expected`` (0: the output, 1: x's gradient, then the
    parameters'), or within twice the error of ``float32``, the reference path's own float32
    result, where the formula cancels more than that on this CPU's kernels (the second layer's
    attention in ``two_layers_on_one_warehouse``: 9.7e-5 on an Intel Xeon with AMX)."""
    for index, (g, e) in enumerate(zip(got, expected)):
        bound = 4 * FLOAT32 if float32 is None else max(4 * FLOAT32, 2 * relative_error(float32[index], e))
        assert relative_error(g, e) <= bound, index


@needs_native
def test_compiled_training_on_inline_runs_the_kernels_backward_and_matches_eager():
    """A layer that chose "inline" for training keeps it in a compiled graph: forward and both
    backward kernels run as operators, and the gradients equal eager "inline"'s."""
    layer = kw_layer(32, 64, 3, (64, 32), stride=2, padding=1, bias=True).train()
    x = torch.randn(3, 32, 6, 7)
    expected = grads_on(layer, x, "inline")
    compiled = compiled_for_training(layer, x, "inline")
    with torch.profiler.profile() as profile:
        got = grads_on(layer, x, None, through=compiled)
    ran = {event.key for event in profile.key_averages()}
    assert {"kwconvert::inline_conv", "kwconvert::inline_input_grad", "kwconvert::inline_weight_grad"} <= ran
    assert_same_grads(got, expected)


def test_the_operators_compute_what_their_pytorch_formulas_do(monkeypatch):
    """The compiled kernel, the PyTorch fallback (kernel not built) and the autograd formula agree:
    the gradients of the kernel's forward equal the gradients of a plain PyTorch product."""
    tiling, cols, blocks, bias = conv_operands(grad=True)
    out = native.conv(tiling, cols, blocks, bias)
    with monkeypatch.context() as patched:
        patched.setattr(native, "_library", lambda: None)
        fallback = native.conv(tiling, cols, blocks, bias)
    # blocks in panel order of width f_e = 16: each cell transposed; back to (f_e, c_e) cells
    cells = blocks.view(2, tiling.cells, 16, 16).transpose(2, 3).reshape(2, tiling.cells, 256)
    kernels = kwconvert.methods.kernelwarehouse.layers.blocks_to_kernel(tiling, cells)  # (B, O, I, kh, kw)
    expected = torch.baddbmm(bias, cols, kernels.permute(0, 1, 3, 4, 2).reshape(2, 32, -1).transpose(1, 2))
    assert relative_error(out, expected) <= FLOAT32 and relative_error(fallback, expected) <= FLOAT32
    grad = torch.randn_like(out)
    got = torch.autograd.grad(out, (cols, blocks, bias), grad)
    wanted = torch.autograd.grad(expected, (cols, blocks, bias), grad)
    for g, w in zip(got, wanted):
        assert relative_error(g, w) <= FLOAT32
    tiling, cols, alpha, rows, bias = inline_operands(grad=True)
    out = native.inline_conv(tiling, cols, alpha, rows, bias)
    blocks = torch.einsum("bmn,rnw->bmrw", alpha, rows).reshape(2, tiling.cells, 256)  # in panel order
    expected = native.conv(tiling, cols, blocks, bias)
    with monkeypatch.context() as patched:
        patched.setattr(native, "_library", lambda: None)
        fallback = native.inline_conv(tiling, cols, alpha, rows, bias)
    assert relative_error(out, expected) <= FLOAT32 and relative_error(fallback, expected) <= FLOAT32
    grad = torch.randn_like(out)
    got = torch.autograd.grad(out, (cols, alpha, rows, bias), grad)
    wanted = torch.autograd.grad(expected, (cols, alpha, rows, bias), grad)
    for g, w in zip(got, wanted):
        assert relative_error(g, w) <= FLOAT32
    alpha, panels = torch.randn(50, 6), torch.randn(3, 6, 16)
    matrix = panels.transpose(0, 1).reshape(6, 48)
    assert relative_error(native.mix(alpha, panels), alpha @ matrix) <= FLOAT32
    assert torch.equal(native.mix_panels(matrix), panels)


def test_the_operators_check_their_operands():
    tiling, cols, blocks, bias = conv_operands()
    with pytest.raises(ValueError, match=r"do not fit a kernel \(32, 32, 3, 3\)"):
        native.conv(tiling, cols[:, :, :-1], blocks, bias)
    with pytest.raises(ValueError, match="3-d floating-point"):
        native.conv(tiling, cols[0], blocks, bias)
    with pytest.raises(ValueError, match="does not fit panels"):
        native.mix(torch.randn(5, 7), torch.randn(3, 6, 16))
    tiling, cols, alpha, rows, bias = inline_operands()
    with pytest.raises(ValueError, match=r"kwconvert::inline_conv: .* do not fit a kernel \(32, 32, 3, 3\)"):
        native.inline_conv(tiling, cols, alpha[:, :, :-1], rows, bias)
    cols, weights = torch.randn(2, 5, 9 * 16), torch.randn(2, 7, 9)
    with pytest.raises(ValueError, match=r"kwconvert::premix: cols \(2, 5, 144\), weights \(2, 7, 9\) do not fit "
                                         r"7 cells of 32 input channels"):
        native.premix(cols, weights, 7, 32)
    with pytest.raises(ValueError, match="kwconvert::premix_input_grad: .* do not fit 7 cells of 16"):
        native.premix_input_grad(torch.randn(69, 7 * 16), weights, 5, 16)
    with pytest.raises(ValueError, match="kwconvert::premix_weight_grad: .* do not fit 7 cells of 16"):
        native.premix_weight_grad(torch.randn(10, 6 * 16), cols, 7, 16)


def graph_recorder():
    """A torch.compile backend that keeps every graph it is given (and runs it as traced)."""
    graphs = []

    def backend(graph_module, example_inputs):
        graphs.append(graph_module)
        return graph_module.forward

    return graphs, backend


@needs_native
def test_compiled_with_a_dynamic_batch_the_model_runs_the_kernel_in_one_graph(kw_resnet18):
    """torch.compile(fullgraph=True, dynamic=True) keeps the compiled kernel (its operator) in the
    graph, compiles once for every batch size, and matches eager."""
    graphs, backend = graph_recorder()
    compiled = torch.compile(kw_resnet18, backend=backend, fullgraph=True, dynamic=True)
    with torch.no_grad():
        for batch in (2, 3):
            x = torch.randn(batch, 3, 64, 64)
            assert relative_error(compiled(x), kw_resnet18(x)) <= FLOAT32
    assert len(graphs) == 1
    targets = {node.target for node in graphs[0].graph.nodes if node.op == "call_function"}
    assert torch.ops.kwconvert.conv.default in targets


@needs_native
def test_a_path_forced_around_a_compiled_model_is_the_one_its_graph_runs(kw_resnet18):
    """``use_path`` reaches a graph being compiled (torch 2.13's Dynamo cannot read the context
    variable that holds it: ``execution.ThreadSetting``): inside the block the model is compiled
    again for the forced path, and after it the first graph serves again.  The layers' own choices
    are set ("native"): the graph follows them, and timed ones differ from run to run."""
    model, x = tuned_on(kw_resnet18, "native")
    graphs, backend = graph_recorder()
    compiled = torch.compile(model, backend=backend, fullgraph=True)
    with torch.no_grad():
        served = compiled(x)
        with use_path("grouped"):
            forced = compiled(x)
            assert relative_error(forced, model(x)) <= FLOAT32
        assert torch.equal(compiled(x), served)
    targets = [{node.target for node in graph.graph.nodes if node.op == "call_function"} for graph in graphs]
    assert len(graphs) == 2
    assert torch.ops.kwconvert.conv.default in targets[0] and torch.ops.kwconvert.conv.default not in targets[1]


def tuned_on(kw_resnet18: nn.Module, path: str) -> tuple[nn.Module, torch.Tensor]:
    """A copy of the model tuned eagerly on a batch of 2, every convolution's choice set to ``path``,
    and that batch; no graph compiled before it is kept."""
    torch.compiler.reset()  # a batch size an earlier test's graph varied would stay dynamic
    model = copy.deepcopy(kw_resnet18)
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        kwconvert.tune(model, x)
    for layer in model.modules():
        if isinstance(layer, KWConv2d):
            assert layer.path_choices
            layer.path_choices.update((key, path) for key in layer.path_choices)
    return model, x


@needs_native
def test_compiled_for_shapes_tuned_eagerly_each_layer_takes_its_own_choice(kw_resnet18):
    """A graph compiled for an input the layers have met eagerly (``tune``) runs each layer's
    choice, not the rule of thumb for a dynamic batch (resnet18 at batch 16 ran 1.36x slower
    compiled than eager with the rule, 0.95x with its choices), in one graph."""
    model, x = tuned_on(kw_resnet18, "inline")
    graphs, backend = graph_recorder()
    compiled = torch.compile(model, backend=backend, fullgraph=True)
    with torch.no_grad():
        assert relative_error(compiled(x), model(x)) <= FLOAT32
    targets = {node.target for node in graphs[0].graph.nodes if node.op == "call_function"}
    assert torch.ops.kwconvert.inline_conv_cached.default in targets and torch.ops.kwconvert.conv.default not in targets


@needs_native
@pytest.mark.parametrize("path", ("native", "inline"))
def test_a_compiled_graph_serves_from_the_packed_copies_and_packs_only_once(kw_resnet18, path, monkeypatch):
    """In inference a compiled graph reads each warehouse's packed copy, made at its first call and
    looked up at the next (where it packed the warehouse in every call, resnet50 at batch 1 ran
    1.57x eager's time), and gives eager's outputs; after an optimizer step it packs again."""
    model, x = tuned_on(kw_resnet18, path)
    packings = counted_packings(monkeypatch)
    assembly.clear_packed()
    graphs, backend = graph_recorder()
    compiled = torch.compile(model, backend=backend, fullgraph=True)
    with torch.no_grad():
        first = compiled(x)
        packed = len(packings)
        assert relative_error(compiled(x), model(x)) <= FLOAT32 and torch.equal(compiled(x), first)
    assert packed >= 4 and len(packings) == packed  # a copy per stage and layout, made once
    operator = {"native": torch.ops.kwconvert.mix_cached, "inline": torch.ops.kwconvert.inline_conv_cached}[path]
    assert operator.default in {node.target for node in graphs[0].graph.nodes if node.op == "call_function"}
    torch.optim.SGD(model.parameters(), lr=0.1).step()  # no gradients: moves nothing, but says the cells changed
    with torch.no_grad():
        compiled(x)
    assert len(packings) == 2 * packed


@pytest.mark.parametrize("isa", native.ISAS)
@pytest.mark.parametrize("width", (8, 16, 32, 64))
def test_the_assembly_of_every_copy_reads_a_warehouse_in_place(isa, width, monkeypatch):
    """``mix`` of panels that are a view of the warehouse (each panel's rows a cell apart: what a
    compiled graph mixes from, holding no packed copy) equals the float64 product, every row split."""
    run_on_isa(isa, monkeypatch)
    torch.manual_seed(width)
    n, columns = 11, 6 * width
    warehouse = torch.randn(n, columns)
    panels = warehouse.view(n, 6, width).transpose(0, 1)
    assert not panels.is_contiguous()
    for rows in (1, 6, 7, 13):
        alpha = torch.randn(rows, n)
        assert relative_error(native.mix(alpha, panels), alpha.double() @ warehouse.double()) <= FLOAT32, rows


@pytest.mark.parametrize("isa", native.ISAS)
@pytest.mark.parametrize("threads", (1, 2))
def test_the_assembly_of_a_large_warehouse_covers_every_block_of_panels(isa, threads, monkeypatch):
    """A warehouse of more panels than one block (the kernel's items: blocks of 128 kB of panels,
    every row tile over a block) and not a multiple of it: packed, read in place and in float16,
    with one and two threads, every row split gives the float64 product."""
    run_on_isa(isa, monkeypatch)
    torch.manual_seed(threads)
    n, count, width = 27, 101, 64  # blocks of 18 panels, the last of 11
    warehouse = torch.randn(n, count * width)
    packed = native.mix_panels(warehouse)
    in_place = warehouse.view(n, count, width).transpose(0, 1)
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        for rows in (1, 9, 20):
            alpha = torch.randn(rows, n, dtype=torch.float64)
            expected = alpha @ warehouse.double()
            for panels in (packed, in_place):
                assert relative_error(native.mix(alpha.float(), panels), expected) <= FLOAT32, rows
            half = native.mix(alpha.float(), packed.half())
            assert relative_error(half, alpha @ warehouse.half().double()) <= FLOAT32, rows
    finally:
        torch.set_num_threads(previous)


@pytest.mark.parametrize("isa", native.ISAS)
@pytest.mark.parametrize("width", (8, 16, 32, 64))
def test_the_float16_assembly_of_every_copy_equals_float64(isa, width, monkeypatch):
    """``mix`` from a float16 warehouse copy: each copy that converts float16 on load, at every panel
    width and row-tile split, gives the float64 product of alpha and the float16-rounded cells (and
    the copies that cannot convert fall back to PyTorch with the same result)."""
    run_on_isa(isa, monkeypatch)
    assert native.mixes_half() == (isa != "baseline")
    torch.manual_seed(width)
    n, columns = 13, 4 * width
    cells = torch.randn(n, columns)
    panels = cells.reshape(n, 4, width).transpose(0, 1).contiguous().half()
    for rows in (1, 5, 6, 7, 13, 150):  # 150: 25 row tiles over each block of panels
        alpha = torch.randn(rows, n)
        out = native.mix(alpha, panels)
        expected = torch.einsum("rn,pnw->rpw", alpha.double(), panels.double()).reshape(rows, -1)
        assert out.dtype == torch.float32 and relative_error(out, expected) <= FLOAT32, rows
