"""ODConv (Li, Zhou & Yao, ICLR 2022) as a kwconvert method.

The authors' parameter counts and layer choice (measured on OSVAI/ODConv's own models),
the function kept at conversion (every layer kind and rank, eval and train, T = 1 and 30),
learning away from it, the heads each layer kind has, a training batch of one, the meta
device, the im2col path, the plan (JSON, options, cost) and the temperature schedule.
"""
from __future__ import annotations

import copy
import io
import json
import math

import pytest
import torch
import torchvision
from rich.console import Console
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

import kwconvert
from kwconvert import costs, execution, methods
from kwconvert.methods.odconv import (OD_LAYER_TYPES, ODConv1d, ODConv2d, ODConv3d, attention_width, layer_params,
                                      set_temperature, temperature_at)
from kwconvert.methods.odconv.layers import KERNEL_SPREAD, START_TEMPERATURE, Heads
from kwconvert.per_sample import PerSampleConv
from kwconvert.plan import Plan, plan

from .helpers import graph_of, trained_like

STATIC_CONV = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}
OD_FOR = {1: ODConv1d, 2: ODConv2d, 3: ODConv3d}
SPATIAL = {1: (9,), 2: (7, 6), 3: (5, 6, 5)}
#: max |diff| relative to the largest output value.
TOLERANCE = {torch.float32: 1e-4, torch.float64: 1e-10}
TEMPERATURES = (1.0, START_TEMPERATURE)


def od_plan(name: str, kernels: int = 1, **options) -> Plan:
    """The ODConv plan of a torchvision model (random weights), ``name`` with its kwargs."""
    model_name, _, width = name.partition("@")
    kwargs = {"width_mult": float(width)} if width else {}
    return plan(None, kernels, graph=graph_of(model_name, **kwargs), model_name=name, method="odconv", **options)


def params(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def od_layers(model: nn.Module) -> dict[str, nn.Module]:
    return {name: m for name, m in model.named_modules() if isinstance(m, OD_LAYER_TYPES)}


def relative_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach(), b.detach()
    return float((a - b).abs().max()) / max(float(b.abs().max()), torch.finfo(b.dtype).tiny)


class TinyNet(nn.Module):
    """Every geometry of one rank: dense with bias, strided and reflect-padded, grouped (4) and
    dilated, depthwise, 'same'-padded, pointwise; a BatchNorm and a Linear head."""

    def __init__(self, dims: int = 2, in_channels: int = 3) -> None:
        super().__init__()
        conv = STATIC_CONV[dims]
        self.stem = conv(in_channels, 16, 3, padding=1)
        self.norm = getattr(nn, f"BatchNorm{dims}d")(16)
        self.down = conv(16, 32, 3, stride=2, padding=1, padding_mode="reflect", bias=False)
        self.grouped = conv(32, 32, 3, padding=2, dilation=2, groups=4, bias=False)
        self.depthwise = conv(32, 32, 3, padding=1, groups=32)
        self.same = conv(32, 32, 3, padding="same")
        self.pointwise = conv(32, 32, 1)
        self.head = nn.Linear(32, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.norm(self.stem(x)))
        for conv in (self.down, self.grouped, self.depthwise, self.same, self.pointwise):
            x = torch.relu(conv(x))
        return self.head(x.flatten(2).mean(-1))


# =======================================================================================
# 1. The authors' parameter counts and layer choice
# =======================================================================================
#: (model, kernels, parameters, converted layers): measured by instantiating OSVAI/ODConv's
#: od_resnet18/50/101 and od_mobilenetv2 (width 1.0 and 0.5) with kernel_num = kernels.
AUTHORS = [
    ("resnet18", 1, 11_943_944, 16), ("resnet18", 4, 44_901_640, 16),
    ("resnet50", 1, 28_635_112, 48), ("resnet50", 4, 90_670_888, 48),
    ("resnet101", 1, 50_818_769, 99), ("resnet101", 2, 90_441_623, 99),
    ("mobilenet_v2", 1, 4_940_185, 51), ("mobilenet_v2", 4, 11_512_149, 51),
    ("mobilenet_v2@0.5", 1, 2_425_537, 51), ("mobilenet_v2@0.5", 4, 4_435_501, 51),
]


@pytest.mark.parametrize("name, kernels, expected, layers", AUTHORS, ids=[f"{c[0]}-{c[1]}x" for c in AUTHORS])
def test_parameter_count_equals_the_authors_code(name, kernels, expected, layers):
    result = od_plan(name, kernels)
    assert result.params_converted == expected
    assert len(result.layers) == layers
    assert result.method == "odconv" and result.budget == kernels and not result.warehouses
    assert all(layer.kernels == kernels for layer in result.layers)


@pytest.mark.parametrize("name, kernels, expected, device", [
    ("resnet18", 4, 44_901_640, "meta"), ("mobilenet_v2@0.5", 1, 2_425_537, "cpu")], ids=["resnet18-4x", "mnv2-0.5-1x"])
def test_the_converted_model_holds_the_authors_parameter_count(name, kernels, expected, device):
    model_name, _, width = name.partition("@")
    kwargs = {"width_mult": float(width)} if width else {}
    with torch.device(device):
        model = torchvision.models.get_model(model_name, weights=None, **kwargs)
    converted = kwconvert.convert(model, kernels, method="odconv", init="none")
    assert params(converted) == expected == kwconvert.plan_of(converted).params_converted
    layers = od_layers(converted)
    assert sorted(layers) == sorted(layer.name for layer in kwconvert.plan_of(converted).layers)
    assert {p.device.type for p in converted.parameters()} == {device}
    for planned in kwconvert.plan_of(converted).layers:  # each layer holds what its plan entry says
        module = layers[planned.name]
        bias = 0 if module.bias is None else module.bias.numel()
        assert params(module) - bias == planned.params == methods.layer_params("odconv", planned)
        assert module.kernels == kernels and module.hidden == planned.hidden


def test_resnet18_converts_the_authors_layers():
    result = od_plan("resnet18", 4)
    assert [layer.name for layer in result.layers] == [
        f"layer{stage}.{block}.conv{conv}" for stage in (1, 2, 3, 4) for block in (0, 1) for conv in (1, 2)]
    reasons = {static.layer: static.reason for static in result.plain}
    assert set(reasons) == {"conv1", "layer2.0.downsample.0", "layer3.0.downsample.0", "layer4.0.downsample.0", "fc"}
    assert reasons["conv1"].startswith("stem")
    assert all(reasons[f"layer{s}.0.downsample.0"].startswith("residual shortcut") for s in (2, 3, 4))
    assert reasons["fc"].startswith("Linear")
    # the attention width: max(int(C_in / 16), 16)
    assert [layer.hidden for layer in result.layers] == [16] * 5 + [16, 16, 16] + [16, 16, 16, 16] + [16, 32, 32, 32]


@pytest.mark.parametrize("name", ["mobilenet_v2", "mobilenet_v2@0.5"])
def test_mobilenet_v2_converts_the_authors_layers(name):
    result = od_plan(name, 1)
    names = [layer.name for layer in result.layers]
    assert len(names) == 51
    assert "features.18.0" in names and "features.1.conv.0.0" in names  # the last 1x1, the first depthwise
    assert {static.layer for static in result.plain} == {"features.0.0", "classifier.1"}
    depthwise = [layer for layer in result.layers if layer.groups > 1]
    assert len(depthwise) == 17 and all(layer.groups == layer.in_channels == layer.weight_shape[0]
                                        for layer in depthwise)


# =======================================================================================
# 2. Function kept at conversion
# =======================================================================================
#: name: Conv keyword arguments (8 input channels; "out" and "k" default to 16 and 3)
GEOMETRIES = {
    "dense-bias": {"padding": 1},
    "strided-no-bias": {"stride": 2, "padding": 1, "bias": False},
    "grouped": {"groups": 4, "padding": 1},
    "depthwise": {"out": 8, "groups": 8, "padding": 1},
    "depthwise-multiplier": {"groups": 8, "padding": 1},
    "pointwise": {"k": 1},
    "reflect": {"padding": 1, "padding_mode": "reflect"},
    "dilated": {"padding": 2, "dilation": 2},
    "same": {"padding": "same", "dilation": 2},
    "same-even": {"k": 4, "padding": "same"},
}


def static_conv(dims: int, geometry: str, dtype=torch.float32, seed: int = 0) -> nn.Module:
    kwargs = dict(GEOMETRIES[geometry])
    out, k = kwargs.pop("out", 16), kwargs.pop("k", 3)
    torch.manual_seed(seed)
    conv = STATIC_CONV[dims](8, out, k, dtype=dtype, **kwargs)
    with torch.no_grad():
        if conv.bias is not None:
            conv.bias.normal_()  # a bias that shows in the output
    return conv


@pytest.mark.filterwarnings("ignore:Using padding='same' with even kernel")  # torch's own, as nn.Conv
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("kernels", [1, 4])
@pytest.mark.parametrize("geometry", GEOMETRIES)
@pytest.mark.parametrize("dims", [1, 2, 3])
def test_a_converted_layer_equals_its_conv_in_eval_and_train_at_every_temperature(dims, geometry, kernels, dtype):
    conv = static_conv(dims, geometry, dtype)
    layer = OD_FOR[dims].from_conv(conv, kernels=kernels, name="layer")
    assert layer.weight.dtype == dtype and layer.kernels == kernels
    x = torch.randn(3, 8, *SPATIAL[dims], dtype=dtype)
    with torch.no_grad():
        expected = conv(x)
        for train in (False, True):
            layer.train(train)
            for temperature in TEMPERATURES:
                layer.temperature = temperature
                out = layer(x)
                assert out.shape == expected.shape
                assert relative_diff(out, expected) <= TOLERANCE[dtype], (train, temperature)
                assert relative_diff(layer(x[0]), expected[0]) <= TOLERANCE[dtype]  # unbatched: a batch of one


def reference_output(layer: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Eq. 4 of the paper, one sample at a time with torch's own ConvNd:
    ``a_f * conv(a_c * x, a_s * sum_i a_w,i W_i) + bias``, absent heads counting 1."""
    attentions = layer.attention(x)
    ones = (1,) * (x.dim() - 2)
    conv = STATIC_CONV[x.dim() - 2](layer.in_channels, layer.out_channels, layer.kernel_size, layer.stride,
                                    layer.padding, layer.dilation, layer.groups, bias=False,
                                    padding_mode=layer.padding_mode, dtype=x.dtype)
    outputs = []
    for b in range(x.shape[0]):
        mixture = layer.weight[0] if attentions.kernel is None else torch.einsum(
            "n,n...->...", attentions.kernel[b], layer.weight)
        if attentions.spatial is not None:
            mixture = mixture * attentions.spatial[b].view(layer.kernel_size)
        conv.weight.data.copy_(mixture)
        out = conv(x[b:b + 1] * attentions.channel[b].view(-1, *ones))
        if attentions.filter is not None:
            out = out * attentions.filter[b].view(-1, *ones)
        outputs.append(out if layer.bias is None else out + layer.bias.view(-1, *ones))
    return torch.cat(outputs)


@pytest.mark.filterwarnings("ignore:Using padding='same' with even kernel")
@pytest.mark.parametrize("kernels", [1, 3])
@pytest.mark.parametrize("geometry", GEOMETRIES)
@pytest.mark.parametrize("dims", [1, 2, 3])
def test_a_layer_computes_the_papers_equation(dims, geometry, kernels):
    """With the authors' random init (every head live, input-dependent) at T = 1 and 30."""
    conv = static_conv(dims, geometry, torch.float64)
    layer = OD_FOR[dims].from_conv(conv, kernels=kernels, init="random").eval()
    with torch.no_grad():
        if layer.bias is not None:
            layer.bias.normal_()
        x = torch.randn(3, 8, *SPATIAL[dims], dtype=torch.float64)
        for temperature in TEMPERATURES:
            layer.temperature = temperature
            assert relative_diff(layer(x), reference_output(layer, x)) <= 1e-12


#: name: (model, one sample's input size, plan options, converted layers)
MODELS = {
    "resnet18": (lambda: torchvision.models.resnet18(weights=None), (3, 64, 64), {}, 16),
    "mobilenet_v2": (lambda: torchvision.models.mobilenet_v2(weights=None), (3, 64, 64), {}, 51),
    "conv1d": (lambda: TinyNet(1, 4), (4, 20), {"stem": "convert"}, 6),
    "conv2d": (lambda: TinyNet(2), (3, 12, 12), {"stem": "convert"}, 6),
    "conv3d": (lambda: TinyNet(3), (3, 6, 6, 6), {"stem": "convert"}, 6),
}


def run(model: nn.Module, x: torch.Tensor, train: bool, temperature: float | None = None) -> torch.Tensor:
    """One forward of a fresh copy (train mode updates BatchNorm statistics), same dropout draws."""
    model = copy.deepcopy(model).train(train)
    if temperature is not None:
        assert set_temperature(model, temperature) == len(od_layers(model))
    torch.manual_seed(1)
    with torch.no_grad():
        return model(x)


@pytest.mark.filterwarnings("ignore:Using padding='same' with even kernel")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("kernels", [1, 4])
@pytest.mark.parametrize("name", MODELS)
def test_a_converted_model_equals_the_original_in_eval_and_train_at_every_temperature(name, kernels, dtype):
    build, input_size, options, converted_layers = MODELS[name]
    torch.manual_seed(0)
    original = trained_like(build()).to(dtype).eval()
    x = torch.randn(2, *input_size, dtype=dtype)
    converted = kwconvert.convert(original, kernels, example_inputs=(x[:1],), inplace=False, method="odconv",
                                  **options)
    assert len(od_layers(converted)) == converted_layers and not od_layers(original)  # inplace=False
    assert all(layer.temperature == 1.0 for layer in od_layers(converted).values())
    for train in (False, True):
        expected = run(original, x, train)
        for temperature in TEMPERATURES:
            diff = relative_diff(run(converted, x, train, temperature), expected)
            assert diff <= TOLERANCE[dtype], (train, temperature, diff)


def test_squeeze_excitation_convs_stay_static_and_the_model_keeps_its_function():
    torch.manual_seed(0)
    original = trained_like(torchvision.models.mobilenet_v3_small(weights=None)).eval()
    x = torch.randn(2, 3, 64, 64)
    converted = kwconvert.convert(original, 2, example_inputs=(x[:1],), inplace=False, method="odconv")
    reasons = [static.reason for static in kwconvert.plan_of(converted).plain]
    assert reasons.count("squeeze-excitation conv on a pooled map") == 18
    assert len(od_layers(converted)) == 33
    assert not any(name.endswith((".fc1", ".fc2")) for name in od_layers(converted))  # the SE blocks' convs
    with torch.no_grad():
        assert relative_diff(converted(x), original(x)) <= TOLERANCE[torch.float32]


def test_a_state_dict_loads_into_a_model_converted_with_init_none():
    torch.manual_seed(0)
    x = torch.randn(3, 3, 12, 12)
    trained = kwconvert.convert(TinyNet(2), 4, example_inputs=(x[:1],), method="odconv", stem="convert", init="random")
    set_temperature(trained, 1.0)
    empty = kwconvert.convert(TinyNet(2), kwconvert.plan_of(trained), init="none")
    empty.load_state_dict(trained.state_dict())
    with torch.no_grad():
        assert torch.equal(empty.eval()(x), trained.eval()(x))


def test_calibration_is_refused_for_odconv():
    with pytest.raises(ValueError, match="a odconv conversion starts exactly as the original: drop it"):
        kwconvert.convert(TinyNet(2), 4, example_inputs=(torch.randn(1, 3, 12, 12),), method="odconv",
                          calibration=torch.randn(2, 3, 12, 12))


# =======================================================================================
# 3. It learns away from the original
# =======================================================================================
def fit_step(layer: nn.Module, optimiser: torch.optim.Optimizer, x: torch.Tensor, target: torch.Tensor) -> float:
    optimiser.zero_grad()
    loss = nn.functional.mse_loss(layer(x), target)
    loss.backward()
    optimiser.step()
    return loss.item()


#: (dims, geometry, kernels, the attention's heads)
LEARNING = [(2, "dense-bias", 4, ("channel", "filter", "spatial", "kernel")),
            (2, "depthwise", 4, ("channel", "spatial", "kernel")),
            (2, "pointwise", 1, ("channel", "filter")),
            (1, "grouped", 1, ("channel", "filter", "spatial")),
            (3, "dense-bias", 2, ("channel", "filter", "spatial", "kernel"))]


@pytest.mark.parametrize("dims, geometry, kernels, heads", LEARNING, ids=[f"{c[0]}d-{c[1]}-{c[2]}" for c in LEARNING])
def test_every_parameter_learns_within_two_steps(dims, geometry, kernels, heads):
    """Step one: the heads start at zero, so only they, the kernels and the bias have a
    gradient; step two: the heads have moved and pass gradients to fc and the BatchNorm."""
    conv = static_conv(dims, geometry)
    layer = OD_FOR[dims].from_conv(conv, kernels=kernels).train()
    assert layer.heads.names == heads
    expected = {"weight", "attention.fc.weight", "attention.norm.weight", "attention.norm.bias"}
    expected |= {f"attention.{head}_fc.{p}" for head in heads for p in ("weight", "bias")}
    expected |= {"bias"} if conv.bias is not None else set()
    assert {name for name, _ in layer.named_parameters()} == expected
    optimiser = torch.optim.SGD(layer.parameters(), lr=0.1)
    torch.manual_seed(2)
    x = torch.randn(6, 8, *SPATIAL[dims])
    target = torch.randn_like(layer(x))
    untouched = []
    for _ in range(2):
        fit_step(layer, optimiser, x, target)
        untouched.append({name for name, p in layer.named_parameters() if p.grad is None or not p.grad.abs().max() > 0})
    assert untouched == [{"attention.fc.weight", "attention.norm.weight", "attention.norm.bias"}, set()]


def test_a_short_fine_tune_makes_the_kernels_differ_between_samples():
    conv = static_conv(2, "dense-bias")
    layer = ODConv2d.from_conv(conv, kernels=4).train()
    start = layer.weight.detach().clone()
    torch.manual_seed(3)
    x, target = torch.randn(8, 8, 6, 6), torch.randn(8, 16, 6, 6)

    def attention_and_kernels() -> tuple[torch.Tensor, torch.Tensor]:
        with torch.no_grad():
            attentions = layer.eval().attention(x)
            layer.train()
            return attentions.kernel, layer.kernels_per_sample(attentions)

    kernel_attention, kernels = attention_and_kernels()
    assert torch.equal(kernel_attention, torch.full((8, 4), 0.25))  # the same mixture for every sample
    assert torch.equal(kernels, kernels[:1].expand_as(kernels))
    optimiser = torch.optim.Adam(layer.parameters(), lr=1e-2)
    losses = [fit_step(layer, optimiser, x, target) for _ in range(20)]
    assert losses[-1] < 0.9 * losses[0]
    kernel_attention, kernels = attention_and_kernels()
    assert float((kernel_attention.max(0).values - kernel_attention.min(0).values).max()) > 1e-2
    assert all(relative_diff(kernels[i], kernels[0]) > 1e-3 for i in range(1, 8))
    # the n kernels learned different things (the first step's updates are the same for all:
    # the kernel attention is uniform until its head has moved)
    update = layer.weight.detach() - start
    assert all(relative_diff(update[i], update[0]) > 0.1 for i in range(1, 4))


@pytest.mark.parametrize("dims, geometry, sigmoids", [
    (2, "dense-bias", 3), (2, "depthwise", 2), (2, "pointwise", 2), (1, "depthwise-multiplier", 3),
    (3, "grouped", 3)])
@pytest.mark.parametrize("kernels", [1, 4])
def test_the_kernel_copies_start_different_and_average_to_the_scaled_kernel(dims, geometry, sigmoids, kernels):
    """2 per sigmoid head (each halves a fresh layer's output); n copies, spread around it."""
    conv = static_conv(dims, geometry, torch.float64)
    layer = OD_FOR[dims].from_conv(conv, kernels=kernels)
    assert layer.heads.sigmoids == sigmoids
    scaled = conv.weight.detach() * 2.0 ** sigmoids
    weight = layer.weight.detach()
    assert weight.shape == (kernels, *conv.weight.shape)
    if kernels == 1:
        assert torch.equal(weight[0], scaled)
        return
    torch.testing.assert_close(weight.mean(0), scaled, rtol=0, atol=1e-14 * float(scaled.abs().max()))
    rms = float(scaled.pow(2).mean().sqrt())
    spread = [float((weight[i] - scaled).pow(2).mean().sqrt()) / rms for i in range(kernels)]
    assert all(0.3 * KERNEL_SPREAD < s < 3 * KERNEL_SPREAD for s in spread), spread
    assert all(not torch.equal(weight[i], weight[j]) for i in range(kernels) for j in range(i))
    again = OD_FOR[dims].from_conv(conv, kernels=kernels, generator=torch.Generator().manual_seed(5))
    same = OD_FOR[dims].from_conv(conv, kernels=kernels, generator=torch.Generator().manual_seed(5))
    assert torch.equal(again.weight, same.weight)


def test_preserve_refuses_a_kernel_of_another_shape():
    layer = ODConv2d(8, 16, 3, kernels=2, name="features.3")
    with pytest.raises(ValueError, match=r"layer features.3: kernel \(16, 8, 5, 5\) does not fit \(16, 8, 3, 3\)"):
        layer.preserve(torch.zeros(16, 8, 5, 5), None)


# =======================================================================================
# 4. The heads each layer kind has, and its parameter count
# =======================================================================================
#: (rank, C_in, C_out, groups, kernel size, kernels, heads)
HEADS = [
    (2, 16, 32, 1, 3, 4, ("channel", "filter", "spatial", "kernel")),
    (2, 16, 16, 16, 3, 4, ("channel", "spatial", "kernel")),            # depthwise: no filter head
    (2, 16, 32, 16, 3, 4, ("channel", "filter", "spatial", "kernel")),  # channel multiplier 2: it has one
    (2, 16, 32, 1, 1, 4, ("channel", "filter", "kernel")),              # 1x1: no spatial head
    (2, 16, 32, 4, 3, 1, ("channel", "filter", "spatial")),             # n = 1: no kernel head
    (2, 16, 16, 16, 1, 1, ("channel",)),                                # all three gone
    (1, 24, 48, 2, 5, 3, ("channel", "filter", "spatial", "kernel")),
    (3, 8, 8, 8, (1, 3, 3), 2, ("channel", "spatial", "kernel")),
    (3, 320, 64, 1, (3, 1, 1), 4, ("channel", "filter", "spatial", "kernel")),  # hidden 20
]


@pytest.mark.parametrize("dims, c_in, c_out, groups, kernel_size, kernels, heads", HEADS)
def test_each_layer_kind_has_the_authors_heads_and_parameters(dims, c_in, c_out, groups, kernel_size, kernels, heads):
    layer = OD_FOR[dims](c_in, c_out, kernel_size, groups=groups, kernels=kernels)
    assert layer.heads.names == heads
    attention = layer.attention
    for head in ("filter", "spatial", "kernel"):
        assert (getattr(attention, f"{head}_fc") is not None) == (head in heads), head
    points = math.prod(layer.kernel_size)
    sizes = {"channel": c_in, "filter": c_out, "spatial": points, "kernel": kernels}
    assert [fc.out_features for fc in attention.heads] == [sizes[h] for h in heads]
    assert layer.hidden == attention_width(c_in) == max(c_in // 16, 16)
    expected = layer_params(c_in, c_out, groups, layer.kernel_size, kernels, layer.hidden)
    assert params(layer) - c_out == expected  # the bias is the original's
    assert params(OD_FOR[dims](c_in, c_out, kernel_size, groups=groups, kernels=kernels, bias=False)) == expected
    assert Heads.of(c_in, c_out, groups, points, kernels).names == heads


def test_a_pointwise_single_kernel_layer_is_one_shared_convolution(monkeypatch):
    """No per-sample kernel exists (n = 1, one point): the batch is not folded into groups."""
    conv = static_conv(2, "pointwise", torch.float64)
    layer = ODConv2d.from_conv(conv, kernels=1, init="random").eval()
    calls = []
    per_sample = PerSampleConv._per_sample_conv
    monkeypatch.setattr(PerSampleConv, "_per_sample_conv",
                        lambda self, *args: calls.append(1) or per_sample(self, *args))
    x = torch.randn(3, 8, 5, 5, dtype=torch.float64)
    with torch.no_grad():
        assert relative_diff(layer(x), reference_output(layer, x)) <= 1e-12
    assert not calls


# =======================================================================================
# 5. A training batch of one, and the meta device
# =======================================================================================
def test_a_training_batch_of_one_uses_the_attention_s_running_statistics():
    with pytest.raises(ValueError, match="Expected more than 1 value per channel"):  # why it needs care
        nn.BatchNorm1d(4).train()(torch.randn(1, 4))
    torch.manual_seed(4)
    layer = ODConv2d.from_conv(nn.Conv2d(8, 16, 3, padding=1), kernels=4, init="random")  # heads not at zero
    layer.temperature = 1.0
    norm = layer.attention.norm
    with torch.no_grad():
        norm.running_mean.normal_()
        norm.running_var.uniform_(0.5, 2.0)
    before = copy.deepcopy(norm.state_dict())
    x = torch.randn(1, 8, 6, 6)
    out = layer.train()(x)
    out.square().mean().backward()
    assert all(p.grad is not None for p in layer.parameters())
    assert all(torch.equal(before[key], value) for key, value in norm.state_dict().items())  # not updated
    with torch.no_grad():
        assert torch.equal(out, layer.eval()(x))
        pair = torch.cat([x, x + 1])  # two samples: the batch's own statistics
        assert relative_diff(layer.train()(pair), layer.eval()(pair)) > 1e-3


def test_a_converted_model_trains_on_a_batch_of_one():
    torch.manual_seed(0)
    model = kwconvert.convert(TinyNet(2), 4, example_inputs=(torch.randn(1, 3, 12, 12),), method="odconv",
                              stem="convert", init="random")
    optimiser = torch.optim.SGD(model.parameters(), lr=0.01)
    for _ in range(2):
        optimiser.zero_grad()
        loss = nn.functional.cross_entropy(model.train()(torch.randn(1, 3, 12, 12)), torch.tensor([3]))
        loss.backward()
        optimiser.step()
    assert math.isfinite(loss.item())


def test_a_meta_model_converts_shape_for_shape():
    with torch.device("meta"):
        model = torchvision.models.mobilenet_v2(weights=None)
    converted = kwconvert.convert(model, 4, method="odconv")
    assert params(converted) == 11_512_149 == kwconvert.plan_of(converted).params_converted
    assert len(od_layers(converted)) == 51
    assert {t.device.type for t in (*converted.parameters(), *converted.buffers())} == {"meta"}
    for train in (False, True):
        out = converted.train(train)(torch.empty(2, 3, 64, 64, device="meta"))
        assert out.shape == (2, 1000) and out.device.type == "meta"


# =======================================================================================
# 6. The im2col path
# =======================================================================================
@pytest.mark.parametrize("kernels", [1, 4])
@pytest.mark.parametrize("geometry", ["dense-bias", "grouped", "depthwise", "strided-no-bias", "reflect", "dilated"])
@pytest.mark.parametrize("dims", [1, 2, 3])
def test_the_im2col_path_equals_the_default_path(dims, geometry, kernels, monkeypatch):
    conv = static_conv(dims, geometry, torch.float64)
    layer = OD_FOR[dims].from_conv(conv, kernels=kernels, init="random").eval()  # heads not at zero
    layer.temperature = 1.0
    x = torch.randn(3, 8, *SPATIAL[dims], dtype=torch.float64)
    with torch.no_grad():
        kernels_of = layer.kernels_per_sample(layer.attention(x))
        assert relative_diff(kernels_of[1], kernels_of[0]) > 1e-3  # the samples' kernels differ
        default = layer(x)
        calls = []
        im2col_conv = PerSampleConv._im2col_conv
        monkeypatch.setattr(PerSampleConv, "_im2col_conv",
                            lambda self, *args: calls.append(1) or im2col_conv(self, *args))
        with execution.use_path("im2col"):
            im2col = layer(x)
    assert calls == [1]
    assert relative_diff(im2col, default) <= 1e-12
    assert relative_diff(im2col, reference_output(layer, x)) <= 1e-12


# =======================================================================================
# 7. The plan's JSON
# =======================================================================================
def test_an_odconv_plan_survives_json_and_shows_as_a_table():
    result = od_plan("resnet18", 4)
    data = json.loads(result.to_json())
    assert data["method"] == "odconv" and data["warehouses"] == [] and len(data["layers"]) == 16
    assert data["options"]["kernels"] == 4 and data["options"]["method"] == "odconv"
    assert data["layers"][0] | {"cost": None} == {
        "name": "layer1.0.conv1", "kind": "conv2d", "weight_shape": [64, 64, 3, 3], "in_channels": 64, "groups": 1,
        "kernels": 4, "hidden": 16, "params": 4 * 64 * 64 * 9 + 64 * 16 + 2 * 16 + 16 * 64 + 64 + 16 * 64 + 64
        + 16 * 9 + 9 + 16 * 4 + 4, "positions": 56 * 56, "parent": None, "fit_error": None, "cost": None}
    again = Plan.from_json(result.to_json())
    assert again == result and again.cost == result.cost
    assert "method='odconv', kernels=4, 16 layers" in repr(result)
    text = io.StringIO()
    Console(file=text, width=200).print(result.table())
    shown = text.getvalue()
    assert "with odconv, 4 kernels per layer: 16 layers converted" in shown
    assert "layer4.1.conv2" in shown and "residual shortcut" in shown and "kernels read per forward" in shown


def edit(data: dict, what: str) -> str:
    """Make one layer of a resnet18 ODConv plan's JSON wrong; return that layer's name."""
    layer = data["layers"][5]
    if what == "params":
        layer["params"] += 1
    elif what == "kernels":
        layer["kernels"] = 2
    elif what == "linear":
        data["plain"] = [s for s in data["plain"] if s["layer"] != "fc"]
        data["layers"].append({"name": "fc", "kind": "linear", "weight_shape": [1000, 512], "in_channels": 512,
                               "groups": 1, "kernels": 4, "hidden": 32, "params": 4 * 512 * 1000})
        return "fc"
    elif what == "twice":
        data["layers"].append(dict(layer))
    return layer["name"]


@pytest.mark.parametrize("what, message", [("params", r"params is \d+, its sizes give \d+"),
                                           ("kernels", "kernels is 2, the plan's is 4"),
                                           ("linear", "kind is 'linear'; odconv converts conv1d, conv2d and conv3d"),
                                           ("twice", "the layer is planned twice")])
def test_an_edited_plan_is_refused_naming_the_layer(what, message):
    data = json.loads(od_plan("resnet18", 4).to_json())
    name = edit(data, what)
    with pytest.raises(ValueError, match=f"plan layer {name}: {message}"):
        Plan.from_dict(data)


def test_a_plan_for_another_model_is_refused_by_convert():
    result = od_plan("resnet18", 2)
    model = torchvision.models.resnet18(weights=None)
    model.layer1[0].conv1 = nn.Conv2d(64, 64, 5, padding=2, bias=False)
    with pytest.raises(ValueError, match="plan layer layer1.0.conv1: planned kernel 64x64x3x3 but the model's is "
                                         "64x64x5x5"):
        kwconvert.convert(model, result)
    model.layer1[0].conv1 = nn.Identity()
    with pytest.raises(ValueError, match="plan layer layer1.0.conv1: planned as conv2d but the model has Identity"):
        kwconvert.convert(model, result)
    assert not od_layers(model)


# =======================================================================================
# 8. Options
# =======================================================================================
def test_stem_convert_converts_the_stem():
    result = od_plan("resnet18", 1, stem="convert")
    assert [layer.name for layer in result.layers][:2] == ["conv1", "layer1.0.conv1"]
    assert len(result.layers) == 17
    conv1 = result.layers[0]
    assert conv1.in_channels == 3 and conv1.hidden == 16 and conv1.weight_shape == (64, 3, 7, 7)


def test_shortcut_convert_converts_the_downsample_projections():
    result = od_plan("resnet18", 1, shortcut="convert")
    names = {layer.name for layer in result.layers}
    assert {f"layer{s}.0.downsample.0" for s in (2, 3, 4)} <= names and len(names) == 19
    assert "conv1" not in names


def test_every_option_changes_the_converted_model_as_planned():
    with torch.device("meta"):
        model = torchvision.models.resnet18(weights=None)
    converted = kwconvert.convert(model, 2, method="odconv", stem="convert", shortcut="convert", reduction=0.25,
                                  min_hidden=8, exclude=["layer4.1.*"])
    result = kwconvert.plan_of(converted)
    layers = od_layers(converted)
    assert len(layers) == 18 and "conv1" in layers and "layer4.1.conv1" not in layers
    assert params(converted) == result.params_converted
    assert {name: layer.hidden for name, layer in layers.items()} == {
        layer.name: max(int(layer.in_channels * 0.25), 8) for layer in result.layers}
    assert layers["conv1"].hidden == 8 and layers["layer4.0.conv2"].hidden == 128


def test_exclude_and_include_keep_layers_static():
    excluded = od_plan("resnet18", 1, exclude=("layer4.*", "layer1.0.conv2"))
    reasons = {static.layer: static.reason for static in excluded.plain}
    assert len(excluded.layers) == 11
    assert reasons["layer1.0.conv2"] == reasons["layer4.1.conv1"] == "excluded by option"
    assert reasons["layer4.0.downsample.0"] == "excluded by option"
    included = od_plan("resnet18", 1, include="layer2.*")  # one glob as a string
    assert [layer.name for layer in included.layers] == ["layer2.0.conv1", "layer2.0.conv2", "layer2.1.conv1",
                                                         "layer2.1.conv2"]
    assert {static.reason for static in included.plain if static.layer.startswith("layer3")} == {"excluded by option"}


@pytest.mark.parametrize("budget, options, message", [
    (None, {"cell": 2}, "unknown ODConv option 'cell'; ODConv takes exclude, include, kernels"),
    (None, {"kernels": 2.5}, "ODConv option kernels must be a positive integer, got 2.5"),
    (2, {"kernels": 4}, "ODConv: budget 2 and kernels=4 disagree; give one"),
    (2.5, {}, "ODConv's budget is its kernels per layer, a whole number >= 1: got 2.5"),
    ("1/2", {}, "a whole number >= 1: got 1/2"),
    (0, {}, "a whole number >= 1: got 0"),
    (None, {"stem": "warehouse"}, "option stem must be one of 'plain', 'convert', got 'warehouse'"),
    (None, {"reduction": 0}, r"ODConv option reduction must be in \(0, 1\], got 0"),
    (None, {"min_hidden": 0}, "ODConv option min_hidden must be a positive integer, got 0"),
])
def test_bad_odconv_options_are_refused_clearly(budget, options, message):
    with pytest.raises(ValueError, match=message):
        plan(None, budget, graph=graph_of("resnet18"), method="odconv", **options)


@pytest.mark.parametrize("kernels", [0, -2])
def test_kernels_below_one_are_refused_naming_kernels(kernels):
    with pytest.raises(ValueError, match="kernels"):
        plan(None, graph=graph_of("resnet18"), method="odconv", kernels=kernels)


@pytest.mark.parametrize("budget", [True, False])
def test_a_bool_budget_is_refused(budget):
    with pytest.raises(ValueError, match="budget"):
        plan(None, budget, graph=graph_of("resnet18"), method="odconv")


def test_an_unknown_method_and_kernelwarehouse_with_odconv_options_are_refused():
    graph = graph_of("resnet18")
    with pytest.raises(ValueError, match="method must be one of kernelwarehouse, dynamic_conv, odconv, kerneldna, got 'nope'"):
        plan(None, 4, graph=graph, method="nope")
    with pytest.raises(ValueError, match="unknown plan option"):
        plan(None, 4, graph=graph, kernels=4)
    with pytest.raises(ValueError, match="needs a budget"):
        plan(None, graph=graph)
    assert od_plan("resnet18").budget == 1.0 and plan(None, "4x", graph=graph, method="odconv").budget == 4.0


# =======================================================================================
# 9. Temperature
# =======================================================================================
def test_the_authors_temperature_schedule():
    assert temperature_at(0) == 30.0
    assert temperature_at(5) == 15.5
    assert temperature_at(2.5) == pytest.approx(30 - 29 / 4)
    assert temperature_at(10) == temperature_at(10.5) == temperature_at(200) == 1.0
    assert temperature_at(3, warmup_epochs=0) == 1.0
    with pytest.raises(ValueError, match="epoch must be >= 0"):
        temperature_at(-1)


def test_set_temperature_sets_every_layer_and_refuses_non_positive_values():
    torch.manual_seed(0)
    preserved = kwconvert.convert(TinyNet(2), 4, example_inputs=(torch.randn(1, 3, 12, 12),), method="odconv",
                                  stem="convert")
    layers = od_layers(preserved)
    assert len(layers) == 6 and {layer.temperature for layer in layers.values()} == {1.0}
    assert set_temperature(preserved, 12.5) == 6
    assert {layer.attention.temperature for layer in layers.values()} == {12.5}
    for bad in (0, -1.0, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="the ODConv temperature must be positive"):
            set_temperature(preserved, bad)
    assert {layer.temperature for layer in layers.values()} == {12.5}
    scratch = kwconvert.convert(TinyNet(2), 4, example_inputs=(torch.randn(1, 3, 12, 12),), method="odconv",
                                init="random")
    assert {layer.temperature for layer in od_layers(scratch).values()} == {START_TEMPERATURE}
    assert {methods.temperature_of(layer) for layer in methods.temperature_layers(scratch).values()} == {30.0}


def test_the_temperature_divides_every_head_s_logits():
    torch.manual_seed(5)
    layer = ODConv2d(8, 16, 3, padding=1, kernels=4).eval()  # the authors' random init
    x = torch.randn(2, 8, 6, 6)
    with torch.no_grad():
        layer.temperature = 1.0
        cold = layer.attention(x)
        layer.temperature = 4.0
        warm = layer.attention(x)
        hidden = torch.relu(layer.attention.norm(layer.attention.fc(x.mean((2, 3)))))
        logits = layer.attention.kernel_fc(hidden)
    torch.testing.assert_close(cold.kernel, logits.softmax(1))
    torch.testing.assert_close(warm.kernel, (logits / 4).softmax(1))
    torch.testing.assert_close(warm.channel, torch.sigmoid(layer.attention.channel_fc(hidden) / 4))
    assert warm.kernel.std(1).max() < cold.kernel.std(1).max()


# =======================================================================================
# 10. Cost
# =======================================================================================
def macs_per_module(model: nn.Module, x: torch.Tensor) -> dict[str, int]:
    """FlopCounterMode's count per module name (a module's includes its children's), per sample."""
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model(x)
    root = type(model).__name__ + "."
    return {name.removeprefix(root): sum(ops.values()) // 2 // x.shape[0]
            for name, ops in counter.get_flop_counts().items()}


@pytest.mark.parametrize("name, kernels", [("resnet18", 1), ("resnet18", 4), ("mobilenet_v2", 4)])
def test_the_plan_s_macs_are_what_flop_counter_counts(name, kernels):
    """Plain model: baseline MACs, and each converted layer's conv MACs.  Converted model: each
    layer's conv + attention + kernel mixture (the spatial product is elementwise, uncounted)."""
    torch.manual_seed(0)
    model = torchvision.models.get_model(name, weights=None).eval()
    x = torch.randn(2, 3, 64, 64)
    result = kwconvert.plan(model, kernels, (x[:1],), method="odconv")
    plain = macs_per_module(model, x)
    assert result.baseline_macs == plain["Global"]
    assert result.cost.conv_macs == sum(plain[layer.name] for layer in result.layers)
    converted = kwconvert.convert(model, result, init="random", inplace=False).eval()
    od = macs_per_module(converted, x)
    for layer in result.layers:
        cost = costs.dynamic_layer_cost(layer)
        assert cost.conv_macs == plain[layer.name], layer.name
        spatial = math.prod(layer.weight_shape) if converted.get_submodule(layer.name).heads.spatial else 0
        assert od[layer.name] == cost.conv_macs + cost.attention_macs + cost.assembly_macs - spatial, layer.name
    assert result.cost.warehouse_bytes == 4 * sum(m.weight.numel() for m in od_layers(converted).values())


# =======================================================================================
# 11. The dynamic_conv alias
# =======================================================================================
def test_method_dynamic_conv_is_mode_dynamic_conv():
    graph = graph_of("resnet18")
    by_method = plan(None, 4, graph=graph, method="dynamic_conv")
    by_mode = plan(None, 4, graph=graph, mode="dynamic_conv")
    assert by_method == by_mode
    assert by_method.warehouses == by_mode.warehouses and by_method.params_converted == by_mode.params_converted
    assert by_method.options["mode"] == "dynamic_conv" and not by_method.layers
    assert by_method.params_converted != plan(None, 4, graph=graph).params_converted  # not KernelWarehouse
    with pytest.raises(ValueError, match="method 'dynamic_conv' is mode 'dynamic_conv', not 'kernelwarehouse'"):
        plan(None, 4, graph=graph, method="dynamic_conv", mode="kernelwarehouse")


def test_a_dynamic_conv_plan_says_it_is_one():
    result = plan(None, 4, graph=graph_of("resnet18"), method="dynamic_conv")
    data = json.loads(result.to_json())
    del data["method"]  # as written before methods existed
    assert result.setting == "at budget 4 (dynamic_conv)"
    assert Plan.from_dict(data) == result
