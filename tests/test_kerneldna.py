"""KernelDNA (Huang et al., 2025) as a kwconvert method: children derived from a parent kernel.

The least-squares fit of a child's scalings, the gate's 1/2 compensated, the parent fitted
with its children (option fit_parent) and its error reported, families per stage and kernel
shape (the authors' sharing rules), the best parent chosen from the weights, one shared
parent tensor that trains and saves once, and the plan's counts and checks.
"""
from __future__ import annotations

import dataclasses
import json

import pytest
import torch
import torchvision
from torch import nn

import kwconvert
from kwconvert.methods.kerneldna import KDNAConv1d, KDNAConv2d, KDNAConv3d, fit_family, fit_scalings, layer_params
from kwconvert.methods.kerneldna.fitting import relative_error
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


def test_the_joint_fit_never_leaves_the_family_a_larger_error_than_the_fixed_parent():
    """Summed squared relative errors (the parent's counted, 0 when fixed): the joint fit starts
    from the fixed parent's fit and only takes steps that lower it; on unrelated kernels it
    lowers it, moving the parent."""
    generator = torch.Generator().manual_seed(0)
    for shape, children in (((8, 4, 3, 3), 3), ((16, 8, 1, 1), 1), ((6, 6, 5), 2)):
        parent = torch.randn(*shape, generator=generator, dtype=torch.float64)
        targets = [torch.randn(*shape, generator=generator, dtype=torch.float64) * 10 ** k for k in range(children)]
        fixed = sum(fit_scalings(parent, target)[2] ** 2 for target in targets)
        fit = fit_family(parent, targets)
        assert fit.objective <= fixed + 1e-12
        assert fit.objective < 0.99 * fixed and fit.parent_error > 0.05
        assert fit.parent_error == pytest.approx(relative_error(fit.parent, parent), abs=1e-12)
        ones = (1,) * (len(shape) - 3)
        for (s, f), target, error in zip(fit.scalings, targets, fit.child_errors):
            held = fit.parent * s.view(1, 1, *shape[2:]) * f.view(-1, 1, 1, *ones)
            assert error == pytest.approx(relative_error(held, target), abs=1e-12)


def test_a_child_with_a_large_kernel_pulls_the_parent_no_harder_than_a_small_one():
    """Each layer's error counts relative to its own kernel: scaling a child's target by 1000
    leaves the fitted parent and every relative error as they were."""
    generator = torch.Generator().manual_seed(1)
    parent, first, second = (torch.randn(8, 4, 3, 3, generator=generator, dtype=torch.float64) for _ in range(3))
    fit = fit_family(parent, [first, second])
    big = fit_family(parent, [first, 1000 * second])
    assert torch.allclose(big.parent, fit.parent, rtol=1e-9, atol=1e-12)
    assert big.child_errors == pytest.approx(fit.child_errors, abs=1e-9)
    assert big.parent_error == pytest.approx(fit.parent_error, abs=1e-9)


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


def test_ranking_parents_from_inner_products_equals_fitting_every_pair():
    """The planner ranks parents from one Gram tensor; the ranking must be the per-pair fits'."""
    from kwconvert.methods.kerneldna.fitting import parent_ranking
    generator = torch.Generator().manual_seed(3)
    family = [torch.randn(16, 8, 3, 3, generator=generator, dtype=torch.float64) for _ in range(4)]
    family[2] = family[0] * 1.7 + 0.1 * torch.randn(16, 8, 3, 3, generator=generator, dtype=torch.float64)
    pairwise = [sum(fit_scalings(parent, child, 6)[2] for child in family if child is not parent) for parent in family]
    assert parent_ranking(family, 6) == pytest.approx(pairwise, rel=1e-9)


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


def dna_family(dtype: torch.dtype = torch.float32, related: bool = False) -> nn.Module:
    """A stem and four 8 -> 8 convolutions of one family (random kernels, or, with ``related``,
    scaled copies of layer 5's); also a model source for the command line."""
    generator = torch.Generator().manual_seed(3)
    torch.manual_seed(3)
    dna = nn.Conv2d(8, 8, 3, padding=1, dtype=dtype)
    copies = [scaled_copy(dna, generator) if related else nn.Conv2d(8, 8, 3, padding=1, dtype=dtype)
              for _ in range(3)]
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1, dtype=dtype), copies[0], nn.ReLU(), copies[1], nn.ReLU(), dna,
                         nn.ReLU(), copies[2]).eval()


def test_a_family_of_scaled_copies_is_still_held_exactly_with_the_parent_fitted():
    model = dna_family(torch.float64, related=True)
    x = torch.randn(2, 3, 8, 8, dtype=torch.float64)
    converted = kwconvert.convert(model, method="kerneldna", example_inputs=(x,), inplace=False, fit_parent=True)
    result = kwconvert.plan_of(converted)
    (parent,) = {layer.parent for layer in result.layers}   # each member is a scaled copy of any other
    assert result.options["fit_parent"] is True and len(result.layers) == 3
    assert {s.layer: s.fit_error for s in result.plain if s.fit_error is not None} == {
        parent: pytest.approx(0, abs=1e-12)}
    assert max(layer.fit_error for layer in result.layers) < 1e-10
    with torch.no_grad():
        expected = model(x)
        assert torch.allclose(converted(x), expected, rtol=0, atol=1e-10 * float(expected.abs().max()))


@pytest.mark.parametrize("fit_parent", [True, False])
def test_the_parent_holds_the_fitted_kernel_and_the_plan_its_error(fit_parent):
    model = dna_family()
    trained = {name: module.weight.detach().clone() for name, module in model.named_modules()
               if isinstance(module, nn.Conv2d)}
    converted = kwconvert.convert(model, method="kerneldna", example_inputs=(torch.randn(1, 3, 8, 8),),
                                  inplace=False, fit_parent=fit_parent)
    result = kwconvert.plan_of(converted)
    (parent,) = {layer.parent for layer in result.layers}
    children = [layer.name for layer in result.layers]
    held = converted.get_submodule(parent).weight
    reported = {s.layer: s.fit_error for s in result.plain if s.fit_error is not None}
    assert set(reported) == {parent}
    if fit_parent:
        fit = fit_family(trained[parent], [trained[child] / FRESH_GATE for child in children])
        assert torch.allclose(held, fit.parent.float(), rtol=1e-5, atol=1e-7)
        assert reported[parent] == pytest.approx(relative_error(held, trained[parent]), rel=1e-9)
        assert reported[parent] > 0.1   # unrelated kernels: the parent moves towards its children
    else:
        assert torch.equal(held, trained[parent]) and reported[parent] == 0.0
    for layer in result.layers:
        child = converted.get_submodule(layer.name)
        assert child.parent is converted.get_submodule(parent)
        assert layer.fit_error == pytest.approx(relative_error(child.kernel(), trained[layer.name] / FRESH_GATE),
                                                rel=1e-9)
    data = json.loads(result.to_json())
    assert [entry.get("fit_error") for entry in data["plain"] if entry["layer"] == parent] == [reported[parent]]
    assert all("fit_error" not in entry for entry in data["plain"] if entry["layer"] != parent)
    assert Plan.from_json(result.to_json()) == result


def test_fitting_the_parent_lowers_the_family_error_of_a_converted_model():
    model = dna_family()
    errors = {}
    for fit_parent in (False, True):
        converted = kwconvert.convert(model, method="kerneldna", example_inputs=(torch.randn(1, 3, 8, 8),),
                                      inplace=False, fit_parent=fit_parent)
        result = kwconvert.plan_of(converted)
        errors[fit_parent] = sum(layer.fit_error ** 2 for layer in result.layers) + sum(
            s.fit_error ** 2 for s in result.plain if s.fit_error is not None)
    assert errors[True] < 0.99 * errors[False]


def test_an_old_plan_without_parent_errors_loads_and_keeps_its_parents_exact():
    """Plans written before fit_parent existed: no fit_error on plain layers, no fit_parent
    option; they load (no parent error) and convert as they did, parents exact."""
    model = dna_family()
    result = kwconvert.plan(model, method="kerneldna", example_inputs=(torch.randn(1, 3, 8, 8),), fit_parent=True)
    data = json.loads(kwconvert.plan_of(kwconvert.convert(model, result, inplace=False)).to_json())
    assert any(entry.get("fit_error", 0) > 0.1 for entry in data["plain"])
    for entry in data["plain"]:
        entry.pop("fit_error", None)
    del data["options"]["fit_parent"]
    old = Plan.from_dict(data)
    assert all(static.fit_error is None for static in old.plain)
    converted = kwconvert.convert(model, old, inplace=False)
    parent = old.layers[0].parent
    assert torch.equal(converted.get_submodule(parent).weight, model.get_submodule(parent).weight)
    assert [s.fit_error for s in kwconvert.plan_of(converted).plain if s.layer == parent] == [0.0]


@pytest.mark.parametrize("edit, message", [
    (lambda data: data["plain"][0].update(fit_error=0.5), "only a KernelDNA parent has a fit_error"),
    (lambda data: [e.update(fit_error=-1.0) for e in data["plain"] if e["reason"].startswith("KernelDNA parent")],
     "fit_error must be >= 0"),
    (lambda data: data["options"].update(fit_parent="yes"), "options.fit_parent must be true or false"),
])
def test_a_plan_with_a_bad_parent_error_is_refused(edit, message):
    data = json.loads(plan(None, graph=graph_of("resnet18"), method="kerneldna").to_json())
    edit(data)
    with pytest.raises(ValueError, match=message):
        Plan.from_dict(data)


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
    assert kwconvert.plan_of(loaded).plain == result.plain
    assert {s.fit_error for s in result.plain if s.fit_error is not None} == {0.0}   # the default: parents exact


def test_a_meta_model_plans_with_the_first_parent_and_converts_shape_for_shape():
    with torch.device("meta"):
        model = torchvision.models.resnet50(weights=None).eval()
    result = kwconvert.plan(model, method="kerneldna", example_inputs=(torch.randn(1, 3, 64, 64, device="meta"),))
    converted = kwconvert.convert(model, result)
    assert all(layer.fit_error is None for layer in kwconvert.plan_of(converted).layers)
    assert all(static.fit_error is None for static in kwconvert.plan_of(converted).plain)
    assert converted(torch.randn(2, 3, 64, 64, device="meta")).shape == (2, 1000)


def test_the_plan_round_trips_and_refuses_a_child_without_a_static_parent():
    result = plan(None, graph=graph_of("resnet18"), method="kerneldna")
    assert result.options["fit_parent"] is False   # the default: the better model after fine-tuning (README)
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
    ({"fit_parent": "yes"}, "KernelDNA option fit_parent must be true or false, got 'yes'"),
    ({"fit_parent": 1}, "KernelDNA option fit_parent must be true or false, got 1"),
])
def test_bad_options_are_refused(options, message):
    with pytest.raises(ValueError, match=message):
        plan(None, graph=graph_of("resnet18"), method="kerneldna", **options)
    with pytest.raises(ValueError, match="KernelDNA takes no budget"):
        plan(None, 2, graph=graph_of("resnet18"), method="kerneldna")
