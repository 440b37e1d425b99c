"""KernelDNA (Huang et al., 2025) as a kwconvert method: children derived from a parent kernel.

The least-squares fit of a child's scalings, the gate's 1/2 compensated, families per stage
and kernel shape (the authors' sharing rules), the best parent chosen from the weights,
one shared parent tensor that trains and saves once, and the plan's counts and checks.
"""
from __future__ import annotations

import dataclasses
import json

import pytest
import torch
import torchvision
from torch import nn

import kwconvert
from kwconvert.methods.kerneldna import KDNAConv1d, KDNAConv2d, KDNAConv3d, fit_scalings, layer_params
from kwconvert.methods.kerneldna.layers import FRESH_GATE
from kwconvert.plan import Plan, plan

from .helpers import graph_of

CHILD = {1: (nn.Conv1d, KDNAConv1d, (2, 6, 11)), 2: (nn.Conv2d, KDNAConv2d, (2, 6, 9, 8)),
         3: (nn.Conv3d, KDNAConv3d, (2, 6, 5, 6, 5))}


def scaled_copy(parent: nn.Module, generator: torch.Generator, bias: bool = True, noise: float = 0.0) -> nn.Module:
    """A conv whose kernel is ``parent``'s scaled along its positions and its filters (a child
    can hold it exactly), plus ``noise`` times the kernel's RMS of its own."""
    conv = type(parent)(parent.in_channels, parent.out_channels, parent.kernel_size, padding=parent.padding,
                        bias=bias, dtype=parent.weight.dtype)
    ones = (1,) * (parent.weight.dim() - 2)
    positions = torch.rand(parent.kernel_size, generator=generator, dtype=parent.weight.dtype) + 0.5
    filters = torch.rand(parent.out_channels, generator=generator, dtype=parent.weight.dtype) + 0.5
    with torch.no_grad():
        conv.weight.copy_(parent.weight * positions * filters.view(-1, 1, *ones))
        own = torch.randn(conv.weight.shape, generator=generator, dtype=conv.weight.dtype)
        conv.weight.add_(own * noise * conv.weight.pow(2).mean().sqrt())
    return conv


def test_fit_scalings_recovers_a_scaled_parent_and_beats_no_scaling():
    generator = torch.Generator().manual_seed(0)
    parent = torch.randn(8, 4, 3, 3, generator=generator, dtype=torch.float64)
    s = torch.rand(3, 3, generator=generator, dtype=torch.float64) + 0.5
    f = torch.rand(8, generator=generator, dtype=torch.float64) + 0.5
    _, _, error = fit_scalings(parent, parent * s * f.view(-1, 1, 1, 1))
    assert error < 1e-10
    other = torch.randn(8, 4, 3, 3, generator=generator, dtype=torch.float64)
    _, _, fitted = fit_scalings(parent, other)
    assert fitted <= float((parent - other).norm() / other.norm())   # s = f = 1 is a point it can take
    assert 0.5 < fitted <= 1.0                                       # unrelated kernels: little to share


@pytest.mark.parametrize("rank", [1, 2, 3])
def test_a_child_holding_a_scaled_parent_computes_its_conv_with_the_gate_compensated(rank):
    static, child_type, shape = CHILD[rank]
    generator = torch.Generator().manual_seed(rank)
    torch.manual_seed(rank)
    parent = static(6, 10, 3, padding=1, bias=False, dtype=torch.float64)
    trained = scaled_copy(parent, generator)
    child, error = child_type.from_conv(trained, parent)
    assert error < 1e-10
    x = torch.randn(*shape, generator=generator, dtype=torch.float64)
    with torch.no_grad():
        expected = trained(x)
        for mode in (child.eval, child.train):
            mode()
            assert torch.allclose(child(x), expected, rtol=0, atol=1e-10 * float(expected.abs().max()))
        assert float(child.gate(x).sub(FRESH_GATE).abs().max()) == 0.0   # a fresh gate, compensated by the kernel
    assert child.parent is parent


def test_every_child_parameter_learns_within_two_steps_and_the_parent_kernel_with_them():
    torch.manual_seed(0)
    parent = nn.Conv2d(8, 8, 3, padding=1)
    child, _ = KDNAConv2d.from_conv(nn.Conv2d(8, 8, 3, padding=1), parent)
    model = nn.Sequential(parent, nn.ReLU(), child).train()
    optimiser = torch.optim.SGD(model.parameters(), lr=0.1)
    assert len(list(model.parameters())) == len({id(p) for p in model.parameters()})  # the kernel once
    before = parent.weight.detach().clone()
    learned = set()
    for _ in range(2):
        optimiser.zero_grad()
        model(torch.randn(4, 8, 6, 6)).pow(2).mean().backward()
        learned |= {name for name, p in child.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}
        optimiser.step()
    assert learned == {name for name, _ in child.named_parameters()}
    assert not torch.equal(parent.weight, before)


def test_resnet18_families_follow_the_authors_sharing_of_3x3_kernels():
    result = plan(None, graph=graph_of("resnet18"), method="kerneldna", parent="first")
    children = {layer.name: layer.parent for layer in result.layers}
    assert children == {"layer1.0.conv2": "layer1.0.conv1", "layer1.1.conv1": "layer1.0.conv1",
                        "layer1.1.conv2": "layer1.0.conv1", "layer2.1.conv1": "layer2.0.conv2",
                        "layer2.1.conv2": "layer2.0.conv2", "layer3.1.conv1": "layer3.0.conv2",
                        "layer3.1.conv2": "layer3.0.conv2", "layer4.1.conv1": "layer4.0.conv2",
                        "layer4.1.conv2": "layer4.0.conv2"}
    reasons = {static.layer: static.reason for static in result.plain}
    assert reasons["layer1.0.conv1"] == "KernelDNA parent of 3 in stage1"
    assert reasons["conv1"].startswith("stem") and reasons["layer2.0.downsample.0"].startswith("residual shortcut")
    assert reasons["layer2.0.conv1"].startswith("no other conv of its kernel shape")
    assert result.options["share"] == "spatial"
    saved = sum(math_prod(layer.weight_shape) - layer.params for layer in result.layers)
    assert result.params_converted == result.params_baseline - saved


def math_prod(shape) -> int:
    out = 1
    for size in shape:
        out *= size
    return out


def test_mobilenet_v2_shares_pointwise_kernels_and_keeps_gates_that_would_outweigh_them_static():
    result = plan(None, graph=graph_of("mobilenet_v2"), method="kerneldna", parent="first")
    assert result.options["share"] == "pointwise"
    assert all(layer.weight_shape[2:] == (1, 1) for layer in result.layers)
    assert all(layer.params < math_prod(layer.weight_shape) for layer in result.layers)
    assert result.params_converted < result.params_baseline
    reasons = [static.reason for static in result.plain]
    assert any(reason.startswith("its gate (") for reason in reasons)


def test_children_per_parent_cuts_a_family():
    result = plan(None, graph=graph_of("resnet18"), method="kerneldna", parent="first", children_per_parent=1)
    parents = [layer.parent for layer in result.layers]
    assert max(parents.count(parent) for parent in parents) == 1
    assert {"layer1.0.conv1", "layer1.1.conv1"} <= set(parents)


def test_the_best_parent_is_the_kernel_the_others_are_noisy_scaled_copies_of():
    generator = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    dna = nn.Conv2d(8, 8, 3, padding=1, bias=False)
    copies = [scaled_copy(dna, generator, bias=False, noise=0.05) for _ in range(3)]
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), copies[0], nn.ReLU(), copies[1], nn.ReLU(), dna,
                          nn.ReLU(), copies[2]).eval()
    x = torch.randn(1, 3, 8, 8)
    best = kwconvert.plan(model, example_inputs=(x,), method="kerneldna")
    assert {layer.parent for layer in best.layers} == {"5"}
    first = kwconvert.plan(model, example_inputs=(x,), method="kerneldna", parent="first")
    assert {layer.parent for layer in first.layers} == {"1"}

    def fit_errors(chosen: Plan) -> list[float]:
        return [layer.fit_error for layer in kwconvert.plan_of(kwconvert.convert(model, chosen, inplace=False)).layers]

    assert max(fit_errors(best)) < 0.1 and sum(fit_errors(best)) < sum(fit_errors(first))


def test_a_converted_model_saves_loads_and_holds_the_planned_parameters(tmp_path):
    model = torchvision.models.resnet18(weights=None).eval()
    converted = kwconvert.convert(model, "1", method="kerneldna", example_inputs=(torch.randn(1, 3, 32, 32),),
                                  inplace=False).eval()
    result = kwconvert.plan_of(converted)
    assert sum(p.numel() for p in converted.parameters()) == result.params_converted
    assert all(0 <= layer.fit_error <= 1 for layer in result.layers)
    kwconvert.save(converted, tmp_path / "kd", source="torchvision:resnet18")
    loaded = kwconvert.load(tmp_path / "kd").eval()
    assert loaded.layer1[1].conv1.parent is loaded.get_submodule(result.layers[1].parent)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(loaded(x), converted(x))
    assert [layer.fit_error for layer in kwconvert.plan_of(loaded).layers] == [l.fit_error for l in result.layers]


def test_a_meta_model_plans_with_the_first_parent_and_converts_shape_for_shape():
    with torch.device("meta"):
        model = torchvision.models.resnet50(weights=None).eval()
    result = kwconvert.plan(model, method="kerneldna", example_inputs=(torch.randn(1, 3, 64, 64, device="meta"),))
    converted = kwconvert.convert(model, result)
    assert all(layer.fit_error is None for layer in kwconvert.plan_of(converted).layers)
    assert converted(torch.randn(2, 3, 64, 64, device="meta")).shape == (2, 1000)


def test_the_plan_round_trips_and_refuses_a_child_without_a_static_parent():
    result = plan(None, graph=graph_of("resnet18"), method="kerneldna")
    assert Plan.from_json(result.to_json()) == result
    assert json.loads(result.to_json())["layers"][0]["parent"] == result.layers[0].parent
    first = result.layers[0]
    orphan = dataclasses.replace(result, layers=(dataclasses.replace(first, parent=None),) + result.layers[1:])
    with pytest.raises(ValueError, match=f"plan layer {first.name}: a kerneldna child needs a parent"):
        Plan.from_json(orphan.to_json())
    converted_parent = dataclasses.replace(result, layers=(dataclasses.replace(first, parent="layer2.0.conv1"),)
                                           + result.layers[1:])
    with pytest.raises(ValueError, match="its parent layer2.0.conv1 must stay a static layer"):
        Plan.from_json(converted_parent.to_json().replace('"layer": "layer2.0.conv1"', '"layer": "gone"'))
    assert first.params == layer_params(first.in_channels, first.weight_shape[0], first.weight_shape[2:],
                                        first.hidden)


@pytest.mark.parametrize("options, message", [
    ({"share": "some"}, "option share must be one of"),
    ({"children_per_parent": 0}, "KernelDNA option children_per_parent must be a positive integer"),
    ({"kernels": 2}, "unknown KernelDNA option 'kernels'"),
])
def test_bad_options_are_refused(options, message):
    with pytest.raises(ValueError, match=message):
        plan(None, graph=graph_of("resnet18"), method="kerneldna", **options)
    with pytest.raises(ValueError, match="KernelDNA takes no budget"):
        plan(None, 2, graph=graph_of("resnet18"), method="kerneldna")
