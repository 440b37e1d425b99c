"""KernelWarehouse layers: exactness at tau = 1, tiling, attention, saver, validation, plumbing."""
from __future__ import annotations

import copy
import itertools
import math
import re

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from kwconvert.methods.kernelwarehouse import cells
from kwconvert.methods.kernelwarehouse.cells import Tiling
from kwconvert.methods.kernelwarehouse.layers import (CAF_EPS, KWConv1d, KWConv2d, KWConv3d, KWLinear, Warehouse,
                              blocks_to_kernel, contrasting_attention, is_kw_layer, kernel_to_blocks,
                              set_temperature, temperature_at)

STATIC_CONV = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}
KW_FOR = {nn.Conv1d: KWConv1d, nn.Conv2d: KWConv2d, nn.Conv3d: KWConv3d, nn.Linear: KWLinear}
SPATIAL = {1: (9,), 2: (7, 6), 3: (5, 6, 5)}
TOLERANCE = {torch.float32: 1e-5, torch.float64: 1e-10}


def params(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def in_channels_of(static: nn.Module) -> int:
    return static.in_features if isinstance(static, nn.Linear) else static.in_channels


def converted(static: nn.Module, budget: float, cell=None, name: str = "layer") -> KWConv2d:
    """A KW copy of ``static`` alone in a warehouse, its weight loaded on the assigned cells."""
    weight_shape = tuple(static.weight.shape)
    cell = cell or cells.cell_shape([weight_shape], budget)
    m = cells.cells_in(weight_shape, cell)
    warehouse = Warehouse(cells.warehouse_size(m, budget), cell, name="stage", dtype=static.weight.dtype)
    layer = KW_FOR[type(static)].from_module(static, warehouse=warehouse, offset=0, budget=budget,
                                             hidden=cells.hidden_size(in_channels_of(static)), name=name)
    if budget >= 1:
        layer.load_static_weight(static.weight)
    return layer


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a - b).abs().max().item()


def conv_cases():
    grid = itertools.product((1, 2, 3), (1, 2), (0, 1, "same"), ("zeros", "reflect"), (1, 2),
                             (1, 2, "depthwise"), (True, False))
    for dims, stride, padding, mode, dilation, groups, bias in grid:
        if padding == "same" and stride != 1:
            continue  # torch rejects it too
        yield dims, stride, padding, mode, dilation, groups, bias


# --- tau = 1 reproduces the static layer ---------------------------------------------------


@pytest.mark.parametrize("cell_kind", ["gcd", "split"])
@pytest.mark.parametrize("budget", [1, 2])
@pytest.mark.parametrize("dims,stride,padding,mode,dilation,groups,bias", list(conv_cases()))
def test_conv_at_tau_one_equals_static(dims, stride, padding, mode, dilation, groups, bias, budget,
                                       cell_kind):
    torch.manual_seed(0)
    groups = 4 if groups == "depthwise" else groups
    static = STATIC_CONV[dims](4, 8, 3, stride=stride, padding=padding, dilation=dilation, groups=groups,
                               bias=bias, padding_mode=mode)
    # "split" halves the gcd cell so that kernels are tiled along both channel dims too
    cell = cells.cell_shape([static.weight.shape], 0.5 if cell_kind == "split" else budget)
    layer = converted(static, budget, cell)
    x = torch.randn(2, 4, *SPATIAL[dims])
    assert max_diff(layer(x), static(x)) <= 1e-5


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("budget", [1, 2])
@pytest.mark.parametrize("dims", [1, 2, 3])
@pytest.mark.parametrize("groups", [1, 2, 4])
@pytest.mark.parametrize("padding", [0, "same"])
def test_conv_at_tau_one_equals_static_in_each_dtype(padding, groups, dims, budget, dtype):
    torch.manual_seed(1)
    static = STATIC_CONV[dims](4, 8, 3, padding=padding, groups=groups, dtype=dtype)
    layer = converted(static, budget, cells.cell_shape([static.weight.shape], 0.5))
    x = torch.randn(3, 4, *SPATIAL[dims], dtype=dtype)
    assert max_diff(layer(x), static(x)) <= TOLERANCE[dtype]


@pytest.mark.filterwarnings("ignore:Using padding='same' with even kernel")  # torch's own, as nn.Conv
@pytest.mark.parametrize("kernel,dilation", [(2, 1), (4, 1), (2, 3)])  # odd total padding: one more right
@pytest.mark.parametrize("mode", ["zeros", "reflect", "replicate", "circular"])
@pytest.mark.parametrize("dims", [1, 2, 3])
def test_every_padding_mode_with_even_kernel_same_padding_equals_static(dims, mode, kernel, dilation):
    torch.manual_seed(2)
    static = STATIC_CONV[dims](4, 4, kernel, padding="same", padding_mode=mode, dilation=dilation)
    layer = converted(static, 1)
    x = torch.randn(2, 4, *SPATIAL[dims])
    assert max_diff(layer(x), static(x)) <= 1e-5


@pytest.mark.parametrize("mode", ["replicate", "circular"])
def test_replicate_and_circular_with_stride_equal_static(mode):
    torch.manual_seed(3)
    static = nn.Conv2d(4, 8, 3, stride=2, padding=(1, 2), padding_mode=mode, groups=2)
    layer = converted(static, 2, cells.cell_shape([static.weight.shape], 0.5))
    x = torch.randn(3, 4, 9, 8)
    assert max_diff(layer(x), static(x)) <= 1e-5


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("budget", [1, 2])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("shape", [(3, 8), (3, 5, 8), (2, 3, 4, 8), (8,)])
def test_linear_at_tau_one_equals_static(shape, bias, budget, dtype):
    torch.manual_seed(4)
    static = nn.Linear(8, 6, bias=bias, dtype=dtype)
    layer = converted(static, budget, cells.cell_shape([static.weight.shape], 0.5))
    x = torch.randn(*shape, dtype=dtype)
    out = layer(x)
    assert out.shape == static(x).shape
    assert max_diff(out, static(x)) <= TOLERANCE[dtype]


def test_unbatched_conv_input_equals_static():
    torch.manual_seed(5)
    static = nn.Conv2d(4, 8, 3, padding=1, padding_mode="reflect")
    layer = converted(static, 1, cells.cell_shape([static.weight.shape], 0.5))
    layer.eval()
    x = torch.randn(4, 7, 6)
    assert layer(x).shape == (8, 7, 6)
    assert max_diff(layer(x), static(x)) <= 1e-5


@pytest.mark.parametrize("budget", [1, 2])
def test_shared_warehouse_of_two_shapes_reproduces_both_layers(budget):
    torch.manual_seed(6)
    conv3x3 = nn.Conv2d(64, 32, 3, padding=1)
    conv1x1 = nn.Conv2d(32, 64, 1, bias=False)
    shapes = [conv3x3.weight.shape, conv1x1.weight.shape]
    cell = cells.cell_shape(shapes, budget)
    assert cell == (32, 32, 1, 1)
    m1, m2 = (cells.cells_in(shape, cell) for shape in shapes)
    warehouse = Warehouse(cells.warehouse_size(m1 + m2, budget), cell, name="stage1")
    first = KWConv2d.from_module(conv3x3, warehouse=warehouse, offset=0, budget=budget, hidden=16)
    second = KWConv2d.from_module(conv1x1, warehouse=warehouse, offset=m1 * int(budget), budget=budget,
                                  hidden=16)
    first.load_static_weight(conv3x3.weight)
    second.load_static_weight(conv1x1.weight)
    x = torch.randn(2, 64, 6, 6)
    assert max_diff(first(x), conv3x3(x)) <= 1e-5
    h = conv3x3(x)
    assert max_diff(second(h), conv1x1(h)) <= 1e-5


@pytest.mark.parametrize("static", [nn.Conv2d(4, 6, 3, stride=2, padding=1), nn.Conv1d(4, 8, 5, groups=2),
                                    nn.Linear(8, 6)], ids=["conv2d", "conv1d", "linear"])
def test_whole_kernel_cells_reproduce_static_vanilla_dynamic_conv(static):
    torch.manual_seed(7)
    weight_shape = tuple(static.weight.shape)
    warehouse = Warehouse(4, weight_shape)  # CondConv / DY-Conv: 4 whole kernels, m = 1, b = n
    layer = KW_FOR[type(static)].from_module(static, warehouse=warehouse, offset=0, budget=4, hidden=16)
    assert layer.cells == 1
    layer.load_static_weight(static.weight)
    x = torch.randn(2, 4, 9) if isinstance(static, nn.Conv1d) else torch.randn(2, *(
        (8,) if isinstance(static, nn.Linear) else (4, 7, 7)))
    assert max_diff(layer(x), static(x)) <= 1e-5


def test_cells_spanning_part_of_the_kernel_reproduce_static():
    torch.manual_seed(8)
    static = nn.Conv2d(4, 6, (4, 6), padding=(1, 2))
    layer = converted(static, 1, cell=(3, 2, 2, 3))  # 2 x 2 spatial blocks of 2 x 3
    assert layer.cells == 2 * 2 * 2 * 2
    x = torch.randn(2, 4, 8, 9)
    assert max_diff(layer(x), static(x)) <= 1e-5


# --- tiling --------------------------------------------------------------------------------


@settings(max_examples=60, deadline=None)
@given(st.data())
def test_kernel_blocks_round_trip_in_mixture_order(data):
    dims = data.draw(st.integers(0, 3), label="spatial dims")
    blocks = [data.draw(st.integers(1, 3)) for _ in range(dims + 2)]
    cell = tuple(data.draw(st.integers(1, 3)) for _ in range(dims + 2))
    lead = tuple(data.draw(st.lists(st.integers(1, 3), max_size=2), label="lead"))
    tiling = Tiling(tuple(b * c for b, c in zip(blocks, cell)), cell)
    kernel = torch.randn(*lead, *tiling.weight_shape)

    tiled = kernel_to_blocks(tiling, kernel)
    assert tiled.shape == (*lead, tiling.cells, math.prod(cell))
    assert torch.equal(blocks_to_kernel(tiling, tiled), kernel)
    # mixture i = (s * blocks_out + o) * blocks_in + c, spatial grid row-major
    blocks_out, blocks_in, spatial_grid = blocks[0], blocks[1], blocks[2:]
    for i in range(tiling.cells):
        c, o, s = i % blocks_in, (i // blocks_in) % blocks_out, i // (blocks_in * blocks_out)
        position = []
        for size in reversed(spatial_grid):
            position.insert(0, s % size)
            s //= size
        index = [slice(o * cell[0], (o + 1) * cell[0]), slice(c * cell[1], (c + 1) * cell[1])]
        index += [slice(p * k, (p + 1) * k) for p, k in zip(position, cell[2:])]
        expected = kernel[(..., *index)].reshape(*lead, -1)
        assert torch.equal(tiled[..., i, :], expected)


def test_tiling_rejects_mismatched_shapes():
    tiling = Tiling((8, 4, 3, 3), (4, 4, 1, 1))
    with pytest.raises(ValueError, match="8x4x3x3"):
        kernel_to_blocks(tiling, torch.zeros(8, 4, 3, 2))
    with pytest.raises(ValueError, match="18 cells"):
        blocks_to_kernel(tiling, torch.zeros(17, 16))


# --- attention -----------------------------------------------------------------------------


def random_layer(tau: float = 0.0, budget: float = 1, seed: int = 9) -> tuple[KWConv2d, Warehouse]:
    torch.manual_seed(seed)
    warehouse = Warehouse(cells.warehouse_size(18, budget), (4, 4, 1, 1), name="stage")
    layer = KWConv2d(8, 4, 3, padding=1, warehouse=warehouse, offset=0, budget=budget, hidden=16)
    layer.tau = tau
    return layer, warehouse


def test_tau_zero_gives_input_dependent_kernels_and_trains_cells_and_attention():
    layer, warehouse = random_layer(tau=0.0)
    x = torch.randn(2, 8, 6, 6)
    kernels = layer.assemble_kernels(layer.attention(x))
    assert kernels.shape == (2, 4, 8, 3, 3)
    assert max_diff(kernels[0], kernels[1]) > 1e-3
    layer(x).square().sum().backward()
    for grad in (warehouse.cells.grad, layer.attention.fc1.weight.grad, layer.attention.fc2.weight.grad,
                 layer.attention.fc2.bias.grad):
        assert grad is not None and grad.abs().sum() > 0


def test_tau_one_freezes_the_attention_on_beta():
    layer, warehouse = random_layer(tau=1.0)
    x = torch.randn(2, 8, 6, 6)
    alpha = layer.attention(x)
    assert torch.equal(alpha, layer.attention.beta[:, :-1].expand(2, -1, -1))
    layer(x).square().sum().backward()
    assert warehouse.cells.grad.abs().sum() > 0
    assert layer.attention.fc1.weight.grad.abs().sum() == 0


def test_caf_normalises_over_the_cells_and_e_z_and_keeps_signs():
    layer, _ = random_layer(tau=0.25)
    x = torch.randn(3, 8, 5, 5)
    logits = layer.attention.logits(x)
    expected = 0.25 * layer.attention.beta + 0.75 * logits / (logits.abs().sum(-1, keepdim=True) + 1e-3)
    alpha = layer.attention(x)
    assert alpha.shape == (3, 18, 18)
    assert torch.allclose(alpha, expected[..., :-1], atol=1e-7)
    layer.tau = 0.0
    assert (layer.attention(x) < 0).any()


def test_caf_in_place_gives_the_formula_and_its_dtype_under_autocast():
    """CAF runs in place on its temporaries: the values of the formula written out, alpha still
    differentiable to the logits, and under autocast (bfloat16 logits) alpha in beta's float32
    as the formula gives it, not the logits' bfloat16."""
    layer, _ = random_layer(tau=0.3)
    attention = layer.attention
    x = torch.randn(2, 8, 5, 5)
    logits = attention.logits(x).detach().requires_grad_()
    written_out = 0.3 * attention.beta + 0.7 * (logits / (logits.abs().sum(-1, keepdim=True) + CAF_EPS))
    alpha = contrasting_attention(logits, attention.beta, 0.3)
    assert torch.allclose(alpha, written_out, rtol=0, atol=1e-7)
    (grad,) = torch.autograd.grad(alpha.square().sum(), logits)
    (expected,) = torch.autograd.grad(written_out.square().sum(), logits)
    assert torch.allclose(grad, expected, rtol=1e-5, atol=1e-7)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        assert attention.logits(x).dtype == torch.bfloat16 and attention(x).dtype == torch.float32


@pytest.mark.parametrize("norm", ["batchnorm", "layernorm"])
@pytest.mark.parametrize("kind", ["conv", "linear"])
def test_parameter_counts_match_the_formulas(kind, norm):
    in_channels, hidden, n = 32, 16, 80
    if kind == "conv":
        warehouse = Warehouse(n, (16, 16, 1, 1))
        layer = KWConv2d(32, 64, 3, warehouse=warehouse, offset=0, budget=1, hidden=hidden,
                         attention_norm=norm)
        m = 9 * 2 * 4
    else:
        warehouse = Warehouse(n, (16, 16))
        layer = KWLinear(32, 64, warehouse=warehouse, offset=8, budget=1, hidden=hidden, attention_norm=norm)
        m = 2 * 4
    assert layer.cells == m
    by_hand = in_channels * hidden + (hidden if norm == "layernorm" else 0) + 2 * hidden \
        + (hidden + 1) * m * (n + 1)
    assert by_hand == cells.attention_params(in_channels, hidden, m, n, norm=norm)
    assert params(layer.attention) == by_hand
    assert params(warehouse) == n * 16 * 16
    assert params(layer) == by_hand + 64 + params(warehouse)  # attention, bias and the shared warehouse
    assert "attention.beta" in layer.state_dict()  # saved: a fitted beta (b < 1) must survive a reload
    assert layer.state_dict()["warehouse.cells"].data_ptr() == warehouse.cells.data_ptr()  # shared, not copied


# --- b < 1 ---------------------------------------------------------------------------------


@pytest.mark.parametrize("offset", [0, 5])
@pytest.mark.parametrize("budget,k", [(0.5, 2), (0.25, 4)])
def test_budget_below_one_starts_unassigned_mixtures_on_e_z(budget, k, offset):
    torch.manual_seed(10)
    static = nn.Conv2d(8, 8, 3)
    cell = cells.cell_shape([static.weight.shape], budget)
    assert cell == (4, 4, 1, 1)
    m = cells.cells_in(static.weight.shape, cell)
    warehouse = Warehouse(offset + cells.warehouse_size(m, budget), cell)
    layer = KWConv2d.from_module(static, warehouse=warehouse, offset=offset, budget=budget, hidden=16)
    blocks = kernel_to_blocks(layer.tiling, layer.assemble_kernels(layer.attention(torch.randn(2, 8, 5, 5))))
    next_cell = offset
    for i in range(m):
        if i % k != (i // k) % k:  # the spec's rule, restated independently of cells.py
            assert torch.equal(blocks[:, i], torch.zeros_like(blocks[:, i]))
        else:
            assert torch.equal(blocks[:, i], warehouse.cells[next_cell].flatten().expand(2, -1))
            next_cell += 1
    assert next_cell == warehouse.n
    with pytest.raises(ValueError, match="least-squares"):
        layer.load_static_weight(static.weight)


def saver_layer(norm: str = "layernorm") -> KWLinear:
    warehouse = Warehouse(20, (2, 4))
    return KWLinear(8, 4, warehouse=warehouse, offset=6, budget=0.5, hidden=16, attention_norm=norm,
                    basis_ratio=1 / 16)


@pytest.mark.parametrize("norm", ["batchnorm", "layernorm"])
def test_parameter_saver_counts_match_the_spec(norm):
    layer = saver_layer(norm)
    m, n, hidden = 4, 20, 16
    local, basis = 2, 16  # int(b * m); max(int((n - local) / 16), 16)
    nonlocal_cells = n - local
    by_hand = 8 * hidden + (hidden if norm == "layernorm" else 0) + 2 * hidden \
        + hidden * (local + basis + 1) * m + basis * nonlocal_cells + m * (n + 1)
    assert by_hand == cells.attention_params(8, hidden, m, n, norm=norm, budget=0.5, basis_ratio=1 / 16)
    assert params(layer.attention) == by_hand
    assert layer.attention.fc2.bias is None and layer.attention.fc3.bias is None
    assert layer.attention.fc3.weight.shape == (nonlocal_cells, basis)


def test_parameter_saver_puts_logits_back_in_cell_order():
    layer = saver_layer("layernorm")
    attention = layer.attention
    m, n, offset, local, basis = 4, 20, 6, 2, 16
    generator = torch.Generator().manual_seed(11)
    local_values = torch.tensor([[1000.0 * (i + 1) + t for t in range(local)] for i in range(m)])
    basis_values = torch.randint(-3, 4, (m, basis), generator=generator).float()
    e_z_values = -torch.arange(1.0, m + 1).unsqueeze(1)
    fc3 = torch.randint(-2, 3, (n - local, basis), generator=generator).float()
    with torch.no_grad():
        # fc1 = 0 and LayerNorm bias 1 make every hidden unit exactly 1, so fc2's output is its column 0
        attention.fc1.weight.zero_()
        attention.fc1.bias.zero_()
        attention.norm.bias.fill_(1.0)
        attention.fc2.weight.zero_()
        attention.fc2.weight[:, 0] = torch.cat([local_values, basis_values, e_z_values], dim=1).flatten()
        attention.fc3.weight.copy_(fc3)
    nonlocal_values = basis_values @ fc3.T
    before, after = nonlocal_values[:, :offset], nonlocal_values[:, offset:]
    expected = torch.cat([before, local_values, after, e_z_values], dim=1)
    logits = attention.logits(torch.randn(2, 8))
    assert logits.shape == (2, m, n + 1)
    assert torch.equal(logits, expected.expand(2, -1, -1))
    with torch.no_grad():
        attention.saver_bias.copy_(torch.arange(float(m * (n + 1))))
    with_bias = expected + attention.saver_bias.view(m, n + 1)
    assert torch.equal(attention.logits(torch.randn(2, 8)), with_bias.expand(2, -1, -1))


# --- validation ----------------------------------------------------------------------------


def test_cell_that_does_not_divide_the_kernel_is_rejected_with_names_and_numbers():
    warehouse = Warehouse(100, (48, 64, 1, 1))
    message = "layer layer1.0.conv1: cell 48x64x1x1 does not divide kernel 64x64x3x3"
    with pytest.raises(ValueError, match=re.escape(message)):
        KWConv2d(64, 64, 3, warehouse=warehouse, offset=0, budget=1, hidden=16, name="layer1.0.conv1")


def test_cell_of_another_rank_is_rejected():
    with pytest.raises(ValueError, match=r"layer conv: cell 4x4 has rank 2, kernel 4x4x3x3 has rank 4"):
        KWConv2d(4, 4, 3, warehouse=Warehouse(9, (4, 4)), offset=0, budget=1, hidden=16, name="conv")


@pytest.mark.parametrize("n,cell", [(0, (4, 4, 1, 1)), (4, (4, 0, 1, 1)), (4, (4,))])
def test_bad_warehouse_is_rejected(n, cell):
    with pytest.raises(ValueError, match=r"warehouse stage1: .*" + re.escape(f"{n}" if n < 1 else f"{cell}")):
        Warehouse(n, cell, name="stage1")


@pytest.mark.parametrize("offset,budget,n", [(2, 1, 10), (0, 2, 17), (-1, 1, 10), (7, 0.5, 10)])
def test_offset_past_the_warehouse_is_rejected(offset, budget, n):
    cell = (4, 4, 1, 1)
    handed_out = cells.cells_handed_out(9, budget)
    with pytest.raises(ValueError, match=rf"layer conv: offset {offset} \+ {handed_out} .* n={n}"):
        KWConv2d(4, 4, 3, warehouse=Warehouse(n, cell), offset=offset, budget=budget, hidden=16, name="conv")


def test_conv_arguments_are_checked_like_torch():
    warehouse = Warehouse(9, (4, 4, 1, 1))
    with pytest.raises(ValueError, match="strided"):
        KWConv2d(4, 4, 3, stride=2, padding="same", warehouse=warehouse, offset=0, budget=1, hidden=16)
    with pytest.raises(ValueError, match="groups 3"):
        KWConv2d(4, 4, 3, groups=3, warehouse=warehouse, offset=0, budget=1, hidden=16)
    with pytest.raises(ValueError, match="padding_mode"):
        KWConv2d(4, 4, 3, padding_mode="mirror", warehouse=warehouse, offset=0, budget=1, hidden=16)


# --- drop-in plumbing ----------------------------------------------------------------------


def test_from_module_copies_hyper_parameters_and_bias_but_not_weight():
    class MyConv(nn.Conv2d):
        pass

    static = MyConv(4, 8, (3, 2), stride=(2, 1), padding=(1, 0), dilation=(1, 2), groups=2,
                    padding_mode="reflect")
    warehouse = Warehouse(24, (8, 2, 1, 1))
    cells_before = warehouse.cells.detach().clone()
    layer = KWConv2d.from_module(static, warehouse=warehouse, offset=0, budget=1, hidden=16, name="c")
    for attribute in ("in_channels", "out_channels", "kernel_size", "stride", "padding", "dilation", "groups",
                      "padding_mode"):
        assert getattr(layer, attribute) == getattr(static, attribute), attribute
    assert layer.weight_shape == tuple(static.weight.shape)
    assert torch.equal(layer.bias, static.bias) and layer.bias is not static.bias
    assert not hasattr(layer, "weight")
    assert torch.equal(warehouse.cells, cells_before)
    assert layer.warehouse is warehouse and layer.name == "c" and layer.cells == 6
    with pytest.raises(TypeError, match="Conv2d"):
        KWConv2d.from_module(nn.Conv1d(4, 8, 3), warehouse=warehouse, offset=0, budget=1, hidden=16)
    linear = KWLinear.from_module(nn.Linear(8, 4, bias=False), warehouse=Warehouse(2, (4, 4)), offset=0,
                                  budget=1, hidden=16)
    assert (linear.in_features, linear.out_features, linear.bias) == (8, 4, None)


def test_batch_of_one_in_training_mode_uses_running_statistics():
    layer, _ = random_layer(tau=0.0)
    layer.train()
    x = torch.randn(1, 8, 5, 5)
    running_mean = layer.attention.norm.running_mean.clone()
    out = layer(x)
    assert torch.equal(layer.attention.norm.running_mean, running_mean)
    layer.eval()
    assert torch.allclose(out, layer(x), atol=1e-6)


@pytest.mark.parametrize("dims", [2, 3])
def test_channels_last_input_gives_the_same_output(dims):
    torch.manual_seed(12)
    static = STATIC_CONV[dims](8, 8, 3, padding=1, groups=2)
    layer = converted(static, 1, cells.cell_shape([static.weight.shape], 0.5))
    layer.tau = 0.3
    layer.eval()
    x = torch.randn(2, 8, *SPATIAL[dims])
    memory_format = torch.channels_last if dims == 2 else torch.channels_last_3d
    assert torch.allclose(layer(x.to(memory_format=memory_format)), layer(x), atol=1e-6)


def test_bfloat16_runs_close_to_float32():
    layer, _ = random_layer(tau=0.5)
    layer.eval()
    low = copy.deepcopy(layer).to(torch.bfloat16)
    x = torch.randn(2, 8, 6, 6)
    reference = layer(x)
    out = low(x.to(torch.bfloat16))
    assert out.dtype == torch.bfloat16
    assert max_diff(out.float(), reference) <= 0.05 * reference.abs().max().item()


def test_linear_attention_pools_the_rows_of_each_sample():
    torch.manual_seed(13)
    layer = KWLinear(8, 6, warehouse=Warehouse(12, (2, 4)), offset=0, budget=1, hidden=16)
    layer.tau = 0.0
    layer.eval()
    x = torch.randn(3, 5, 8)
    out = layer(x)
    assert torch.allclose(layer(x[1:2]), out[1:2], atol=1e-6)  # samples are independent
    permutation = torch.randperm(5)
    assert torch.allclose(layer(x[:, permutation]), out[:, permutation], atol=1e-6)  # pooling is symmetric
    alone = layer(x[0, :2])  # a 2-D input is two samples, each with its own kernel
    assert not torch.allclose(alone, out[0, :2], atol=1e-3)


def test_reset_cells_redraws_only_the_range_with_the_reference_spread():
    torch.manual_seed(14)
    warehouse = Warehouse(64, (8, 8, 1, 1))
    before = warehouse.cells.detach().clone()
    warehouse.reset_cells(10, 42)
    assert torch.equal(warehouse.cells[:10], before[:10]) and torch.equal(warehouse.cells[42:], before[42:])
    assert not torch.equal(warehouse.cells[10:42], before[10:42])
    fan_out = 32 * 8  # the range viewed as (-1, c_e, 1, 1)
    assert warehouse.cells[10:42].std().item() == pytest.approx(math.sqrt(2 / fan_out), rel=0.1)
    with pytest.raises(ValueError, match=r"\[10, 65\)"):
        warehouse.reset_cells(10, 65)


# --- temperature ---------------------------------------------------------------------------


def test_set_temperature_counts_kw_layers_and_changes_outputs():
    torch.manual_seed(15)
    warehouse = Warehouse(18 + 2, (4, 4, 1, 1))
    model = nn.Sequential(KWConv2d(8, 4, 3, padding=1, warehouse=warehouse, offset=0, budget=1, hidden=16),
                          nn.ReLU(), nn.Conv2d(4, 4, 1),
                          KWConv2d(4, 8, 1, warehouse=warehouse, offset=18, budget=1, hidden=16)).eval()
    x = torch.randn(2, 8, 5, 5)
    at_one = model(x)
    assert set_temperature(model, 0.0) == 2
    assert all(layer.tau == 0.0 for layer in model if is_kw_layer(layer))
    assert not torch.allclose(model(x), at_one, atol=1e-3)
    for bad in (-0.1, 1.5):
        with pytest.raises(ValueError, match=str(bad)):
            set_temperature(model, bad)


def test_temperature_schedule():
    assert temperature_at(0, 10) == 1.0
    assert temperature_at(5, 10) == 0.5
    assert temperature_at(10, 10) == 0.0
    assert temperature_at(20, 10) == 0.0
    assert temperature_at(2.5, 10) == 0.75
    assert temperature_at(3, 0) == 0.0
    with pytest.raises(ValueError, match="-1"):
        temperature_at(-1, 10)


# --- sharing -------------------------------------------------------------------------------


def test_deepcopy_keeps_layers_on_the_copied_shared_warehouse():
    torch.manual_seed(16)
    warehouse = Warehouse(20, (4, 4, 1, 1), name="stage1")
    first = KWConv2d(8, 4, 3, padding=1, warehouse=warehouse, offset=0, budget=1, hidden=16)
    second = KWConv2d(4, 8, 1, warehouse=warehouse, offset=18, budget=1, hidden=16)
    model = nn.Sequential(first, second).eval()
    assert params(model) == params(first) + params(second) - params(warehouse)  # the cells count once
    assert [key for key in model.state_dict() if key.endswith("cells")] == ["0.warehouse.cells",
                                                                          "1.warehouse.cells"]

    clone = copy.deepcopy(model)
    assert clone[0].warehouse is clone[1].warehouse
    assert clone[0].warehouse is not warehouse
    x = torch.randn(2, 8, 5, 5)
    before = model[0](x)
    with torch.no_grad():
        clone[1].warehouse.cells.mul_(2)
    assert torch.allclose(clone[0](x), 2 * before, atol=1e-5)
    assert torch.equal(model[0](x), before)
