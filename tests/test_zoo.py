"""Any model (issue 6): the zoo sweep's checks on a fast, diverse subset, the committed timm
sample and its rule, sub-module conversion of detection and segmentation backbones, and
(marked slow) the whole sweep against its targets."""
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torchvision
from torch import nn

import kwconvert
from benchmarks import zoo
from kwconvert.fast import reference_path
from tests.helpers import installed_script, one_line

# One or two of each kind: CNNs, mobile nets, Conv3d, Conv1d, ViT (fused qkv), Swin,
# MLP-mixer, ConvNeXt, hybrids (PVT's fused kv, EfficientViT).  ~45 s on one busy core.
FAST_SUBSET = [
    "torchvision:resnet18", "torchvision:mobilenet_v3_small", "video:r3d_18", "custom:conv1d_resnet",
    "timm:deit_tiny_patch16_224", "timm:swin_tiny_patch4_window7_224", "timm:gmixer_12_224",
    "timm:convnext_zepto_rms", "timm:mobilenetv3_small_050", "timm:pvt_v2_b0", "timm:efficientvit_m0",
]


@pytest.mark.parametrize("model", FAST_SUBSET)
def test_model_plans_converts_and_matches_the_original_at_tau_1(model):
    row = zoo.run_case(model, timeout=300)
    assert row["status"] == "pass", f"{model}: {row['status']}: {row['reason']}"
    assert row["ratio_b1"] <= 1.5 and row["ratio_b05"] <= 1.0
    assert row["layer_diff"] <= zoo.LAYER_TOLERANCE and row["max_diff"] <= row["tolerance"]


def test_zoo_writes_its_results_with_the_shared_atomic_writer():
    from benchmarks import results_io
    assert zoo.write_json is results_io.write_json


def test_the_layer_check_finds_a_wrong_conversion():
    """Each converted layer is compared with its static original on the same input."""
    model = nn.Sequential(nn.Conv2d(3, 64, 3), nn.ReLU(), nn.Conv2d(64, 64, 3), nn.Flatten(), nn.Linear(4096, 2))
    plan = kwconvert.plan(model, 1, torch.randn(1, 3, 12, 12))
    assert plan.converted_layers == ("0", "2")
    originals = {name: model.get_submodule(name) for name in plan.converted_layers}
    converted = kwconvert.convert(model, plan, inplace=False)
    x = torch.randn(2, 3, 12, 12)
    with torch.no_grad():
        with zoo._LayerCheck(converted, originals) as check:
            converted(x)
        assert check.worst()[1] <= zoo.LAYER_TOLERANCE and not check.missing
        for warehouse in converted.kw_warehouses.values():
            warehouse.cells.mul_(1.01)
        with zoo._LayerCheck(converted, originals) as check:
            converted(x)
    name, diff = check.worst()
    assert diff > zoo.LAYER_TOLERANCE and name in plan.converted_layers


def test_tolerance_follows_the_models_own_float32_error():
    assert zoo.tolerance(1.0, 1e-7) == zoo.ABSOLUTE_TOLERANCE
    assert zoo.tolerance(674.0, 0.05) == pytest.approx(zoo.FLOAT32_ERROR_FACTOR * 0.05)
    assert zoo.tolerance(1e4, None) == pytest.approx(zoo.RELATIVE_TOLERANCE * 1e4)


def test_timm_sample_covers_every_family_by_its_written_rule():
    import timm
    text = zoo.TIMM_SAMPLE.read_text()
    assert "Rule:" in text and "K = min(" in text
    names = zoo.timm_sample()
    assert len(names) >= 150 and len(set(names)) == len(names)
    assert all(timm.is_model(name) for name in names)
    modules = set(re.findall(r"# (\w+), [\d.]+ M parameters", text))
    families = {m for m in timm.list_modules()
                if any(not n.startswith("test_") for n in timm.list_models(module=m))}
    assert modules == families
    for kind in ("deit_tiny_patch16_224", "swin_tiny_patch4_window7_224", "gmixer_12_224",
                 "mobilenetv3_small_050", "resnet18", "convnext_zepto_rms"):
        assert kind in names


def test_zoo_lists_every_torchvision_classifier_the_video_models_and_conv1d():
    ids = {case.id for case in zoo.all_cases(with_timm=False)}
    assert {f"torchvision:{n}" for n in torchvision.models.list_models(module=torchvision.models)} <= ids
    assert {f"video:{n}" for n in torchvision.models.list_models(module=torchvision.models.video)} <= ids
    assert "custom:conv1d_resnet" in ids


# --- sub-module conversion ----------------------------------------------------------------
def n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def outputs_of(model: nn.Module, path: str, inputs) -> tuple:
    """The whole model's output and what sub-module ``path`` returned inside that forward."""
    seen = {}
    handle = model.get_submodule(path).register_forward_hook(lambda m, a, out: seen.setdefault("out", out))
    try:
        with torch.no_grad(), reference_path():
            output = model(inputs)
    finally:
        handle.remove()
    return output, seen["out"]


def relative_diff(expected: dict, actual: dict) -> float:
    return max(float((expected[k] - actual[k]).abs().max() / expected[k].abs().max()) for k in expected)


def test_fasterrcnn_backbone_body_converts_alone_and_the_detector_still_runs_and_matches():
    torch.manual_seed(0)
    model = torchvision.models.detection.fasterrcnn_resnet50_fpn(
        weights=None, weights_backbone=None, min_size=128, max_size=128).eval()
    images = torch.rand(2, 3, 128, 128)
    plan = kwconvert.plan(model, 1, (images[:1],), module="backbone.body")
    assert plan.module == "backbone.body"
    assert all(name.startswith("backbone.body.layer") for name in plan.converted_layers)
    assert [w.m_t for w in plan.warehouses] == [87, 104, 138, 47]  # ResNet50's Table 14 layout
    assert ("backbone.fpn.inner_blocks.0.0", "outside module backbone.body") in {
        (s.layer, s.reason) for s in plan.plain}
    converted = kwconvert.convert(model, plan, inplace=False).eval()
    assert n_params(converted) == plan.params_converted
    expected, expected_body = outputs_of(model, "backbone.body", images)
    actual, actual_body = outputs_of(converted, "backbone.body", images)
    assert relative_diff(expected_body, actual_body) <= 1e-5
    for before, after in zip(expected, actual):  # the detections themselves, per image
        assert torch.equal(before["labels"], after["labels"])
        assert torch.allclose(before["boxes"], after["boxes"], atol=0.2)  # pixels of a 128-pixel image
        assert torch.allclose(before["scores"], after["scores"], atol=1e-3)


def test_deeplabv3_backbone_converts_alone_and_the_segmenter_still_matches():
    torch.manual_seed(0)
    model = torchvision.models.segmentation.deeplabv3_resnet50(weights=None, weights_backbone=None).eval()
    x = torch.randn(2, 3, 96, 96)
    converted = kwconvert.convert(model, 1, example_inputs=(x[:1],), module="backbone", inplace=False).eval()
    plan = kwconvert.plan_of(converted)
    assert plan.module == "backbone" and plan.converted_layers[0] == "backbone.layer1.0.conv2"
    assert n_params(converted) == plan.params_converted
    expected, _ = outputs_of(model, "backbone", x)
    actual, _ = outputs_of(converted, "backbone", x)
    assert relative_diff(expected, actual) <= 1e-5


def test_module_option_errors_name_the_reason():
    model = torchvision.models.resnet18(weights=None)
    with pytest.raises(ValueError, match=r"no sub-module 'layer9'.*did you mean"):
        kwconvert.plan(model, 1, module="layer9")
    with pytest.raises(ValueError, match="fc .Linear. is not called"):
        kwconvert.plan(WithUnusedHead(), 1, torch.randn(1, 3, 8, 8), module="fc")


class WithUnusedHead(nn.Module):
    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(3, 4, 3))
        self.fc = nn.Linear(4, 2)

    def forward(self, x):
        return self.body(x)


def test_cli_module_option_plans_the_backbone_only(tmp_path):
    result = subprocess.run([installed_script(), "deeplabv3_resnet50", "--module", "backbone", "--dry-run",
                             "--json", "--input-size", "3,64,64"], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    data = json.loads(result.stdout)
    assert data["module"] == "backbone"
    assert all(name.startswith("backbone.") for w in data["warehouses"] for name in w["layers"])
    bad = subprocess.run([installed_script(), "resnet18", "--module", "nope", "--dry-run"],
                         capture_output=True, text=True, timeout=300)
    assert bad.returncode == 2 and "no sub-module 'nope'" in one_line(bad.stderr)  # a usage error


# --- the whole sweep ------------------------------------------------------------------------
@pytest.mark.slow
def test_whole_zoo_meets_its_targets(tmp_path):
    """benchmarks/zoo.py over every model: about an hour on two busy cores."""
    out = tmp_path / "zoo.json"
    zoo.main(["--jobs", "2", "--fresh", "--out", str(out)])
    data = json.loads(out.read_text())
    summary, rows = data["summary"], data["per_model"]
    assert summary["torchvision"]["pass_percent"] == 100.0
    assert summary["video"]["pass_percent"] == 100.0 and summary["custom"]["pass_percent"] == 100.0
    assert summary["timm"]["pass_percent"] >= 95.0
    unexplained = [r for r in rows if r["status"] != "pass" and (r["status"] != "refused" or not r["reason"])]
    assert not unexplained, [(r["model"], r["status"], r["reason"]) for r in unexplained]
