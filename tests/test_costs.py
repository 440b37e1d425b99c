"""The plan's cost columns against torch's FlopCounterMode, on the plain and the converted model."""
from __future__ import annotations

import io
import json

import pytest
import torch
import torchvision
from rich.console import Console
from torch.utils.flop_counter import FlopCounterMode

import kwconvert
from kwconvert.costs import FLOAT32_BYTES
from kwconvert import reference_path
from kwconvert.methods.kernelwarehouse.layers import is_kw_layer
from kwconvert.plan import Plan
from tests.helpers import plan_of

BATCH = 2


def macs_per_module(model: torch.nn.Module, x: torch.Tensor) -> dict[str, int]:
    """FlopCounterMode's count per module name (a module's total includes its children), per
    sample; "Global" is the whole model's."""
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model(x)
    root = type(model).__name__ + "."
    return {name.removeprefix(root): sum(ops.values()) // 2 // x.shape[0]
            for name, ops in counter.get_flop_counts().items()}


def tiny_vit() -> torch.nn.Module:
    from torchvision.models.vision_transformer import VisionTransformer
    return VisionTransformer(image_size=32, patch_size=8, num_layers=2, num_heads=2, hidden_dim=32,
                             mlp_dim=64, num_classes=10)


CASES = [("resnet18", 1.0, (3, 224, 224)), ("resnet18", 0.5, (3, 224, 224)),
         ("mobilenet_v2", 1.0, (3, 224, 224)), ("mobilenet_v2", 0.5, (3, 224, 224))]


def build(name: str) -> torch.nn.Module:
    torch.manual_seed(0)
    return (tiny_vit() if name == "tiny_vit" else torchvision.models.get_model(name, weights=None)).eval()


@pytest.mark.parametrize("name, budget, size", CASES + [("tiny_vit", 1.0, (3, 32, 32))])
def test_each_converted_layer_costs_what_flop_counter_counts(name, budget, size):
    """Plain layer: the convolution's MACs.  Converted layer on the reference path (assemble
    with a matmul, then convolve): convolution + assembly + attention, exactly."""
    model = build(name)
    x = torch.randn(BATCH, *size)
    plan = kwconvert.plan(model, budget, (x[:1],))
    plain = macs_per_module(model, x)
    converted = kwconvert.convert(model, plan).eval()
    with reference_path():
        kw = macs_per_module(converted, x)
    in_both = 0
    for warehouse in plan.warehouses:
        for layer in warehouse.layers:
            cost = kwconvert.costs.layer_cost(layer, warehouse)
            if layer.name in plain:  # not a projection unpacked from torch's MultiheadAttention
                assert cost.conv_macs == plain[layer.name], layer.name
                in_both += 1
            assert cost.conv_macs + cost.added_macs == kw[layer.name], layer.name
    assert in_both == (len(plan.converted_layers) if name != "tiny_vit" else 4)  # the ViT's MLP layers


@pytest.mark.parametrize("name, budget, size", CASES)
def test_model_totals_match_flop_counter(name, budget, size):
    """baseline_macs is the plain model's count; baseline + what KW adds is the KW model's."""
    model = build(name)
    x = torch.randn(BATCH, *size)
    plan = kwconvert.plan(model, budget, (x[:1],))
    assert plan.baseline_macs == macs_per_module(model, x)["Global"]
    converted = kwconvert.convert(model, plan).eval()
    with reference_path():
        assert plan.baseline_macs + plan.cost.added_macs == macs_per_module(converted, x)["Global"]
    data = plan.to_dict()["cost"]
    assert data["macs_ratio"] == pytest.approx(
        (plan.baseline_macs + data["assembly_macs"] + data["attention_macs"]) / plan.baseline_macs)


@pytest.mark.parametrize("budget", [1.0, 0.5, 4.0])
def test_params_and_warehouse_bytes_are_the_converted_model_s(budget):
    model = build("resnet18")
    plan = kwconvert.plan(model, budget)
    replaced = sum(torch.Size(layer.weight_shape).numel() for w in plan.warehouses for layer in w.layers)
    converted = kwconvert.convert(model, plan)
    kw_layers = [module for module in converted.modules() if is_kw_layer(module)]
    assert plan.cost.warehouse_bytes == sum(module.warehouse.cells.numel() * FLOAT32_BYTES for module in kw_layers)
    assert plan.cost.params == sum(p.numel() for p in converted.parameters()) - plan.params_baseline + replaced


def test_resnet50_reads_its_warehouses_at_the_documented_rate():
    """KERNELWAREHOUSE.md / issue 16: 1,184 MB of warehouse per forward at b = 1 and a MAC floor of 1.50."""
    plan = plan_of("resnet50", 1.0)
    assert round(plan.cost.warehouse_bytes / 1e6) == 1184
    assert kwconvert.costs.macs_ratio(plan) == pytest.approx(1.50, abs=0.005)


def test_costs_survive_json_and_a_plan_saved_without_them_shows_unknown():
    plan = kwconvert.plan(build("resnet18"), 1.0)
    again = Plan.from_json(plan.to_json())
    assert again.baseline_macs == plan.baseline_macs and again.cost == plan.cost
    old = json.loads(plan.to_json())  # as a kwconvert before the cost columns wrote it
    del old["cost"]
    for warehouse in old["warehouses"]:
        del warehouse["cost"]
        for detail in warehouse["layer_details"]:
            del detail["positions"]
    legacy = Plan.from_dict(old)
    assert legacy.cost.conv_macs is None and legacy.baseline_macs is None
    assert legacy.cost.assembly_macs == plan.cost.assembly_macs
    text = io.StringIO()
    Console(file=text, width=200).print(legacy.table())
    shown = text.getvalue()
    assert f"warehouses read per forward {plan.cost.warehouse_bytes / 1e6:.0f} MB" in shown  # 167 MB
    assert "baseline MACs" not in shown and "│    ? │" in shown  # the conv MACs column


def test_a_plan_with_impossible_positions_is_refused():
    data = json.loads(kwconvert.plan(build("resnet18"), 1.0).to_json())
    data["warehouses"][0]["layer_details"][0]["positions"] = 0
    with pytest.raises(ValueError, match="positions must be positive, got 0"):
        Plan.from_dict(data)
