"""Any model (issue 6): the zoo sweep's checks on a fast, diverse subset, the committed timm
sample and its rule, sub-module conversion of detection and segmentation backbones, and
(marked slow) the whole sweep against its targets."""
import json
import re
import subprocess

import pytest
import torch
import torchvision
from torch import nn

import kwconvert
from benchmarks import zoo
from kwconvert import reference_path
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
    assert row["ratio_b025"] < row["ratio_b05"] and row["why_b025"].startswith("static: ")
    assert row["layer_diff"] <= zoo.LAYER_TOLERANCE and row["max_diff"] <= row["tolerance"]


def test_zoo_writes_its_results_with_the_shared_atomic_writer():
    from benchmarks import results_io
    assert zoo.write_json is results_io.write_json


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


# --- budgets below 1: the budget report ---------------------------------------------------
def synthetic_row(model, params, b05, b025, why="static: head 12%, stem 3%; cells 40%", status="pass"):
    return {"model": model, "group": model.partition(":")[0], "status": status, "reason": "",
            "params_baseline": params, "ratio_b1": None if b05 is None else 1.2, "ratio_b05": b05,
            "ratio_b025": b025, "why_b05": why, "why_b025": why}


def test_budget_report_gives_the_distribution_and_lists_models_above_their_target_with_why():
    rows = [synthetic_row("torchvision:big", 5_000_000, 0.90, 0.50, why="static: head 30%; cells 40%"),
            synthetic_row("torchvision:small", 1_000_000, 0.95, 0.55),  # under 2 M: no target of its own
            synthetic_row("torchvision:mobilenet_v2", 3_500_000, 0.80, 0.70),  # 0.77 is stricter than 0.85
            synthetic_row("torchvision:fine", 5_000_000, 0.60, 0.40),
            synthetic_row("torchvision:broken", None, None, None, status="error"),
            synthetic_row("timm:huge", 50_000_000, 0.99, 0.98)]  # targets are torchvision's only
    rows[4]["reason"] = "plan: RuntimeError: boom"
    report = zoo.budget_report(rows)
    line = {(d["group"], d["budget"]): d for d in report["distribution"]}
    half = line["torchvision", 0.5]
    assert (half["models"], half["of"]) == (4, 5)
    assert (half["min"], half["median"], half["max"]) == (0.60, 0.85, 0.95)
    assert (half["min_model"], half["max_model"]) == ("torchvision:fine", "torchvision:small")
    assert half["target"] == zoo.MEDIAN_TARGETS[0.5] and half["met"] is False
    quarter = line["torchvision", 0.25]
    assert quarter["median"] == pytest.approx(0.525) and quarter["met"] is True
    assert line["timm", 0.5]["target"] is None and line["timm", 0.5]["met"] is None
    assert line["all", 0.5]["median"] == 0.90 and line["all", 0.5]["met"] is None
    above = {(a["model"], a["budget"]): a for a in report["above_target"]}
    assert set(above) == {("torchvision:big", 0.5), ("torchvision:mobilenet_v2", 0.5),
                          ("torchvision:broken", 0.5), ("torchvision:broken", 0.25)}
    assert above["torchvision:big", 0.5]["target"] == 0.85 and "head 30%" in above["torchvision:big", 0.5]["why"]
    assert above["torchvision:mobilenet_v2", 0.5]["target"] == 0.77
    assert above["torchvision:broken", 0.25]["ratio"] is None and "boom" in above["torchvision:broken", 0.25]["why"]
    json.dumps(report)  # it goes into the results file


def test_model_target_is_the_stricter_rule_and_torchvision_only():
    mobilenet = synthetic_row("torchvision:mobilenet_v2", 3_500_000, 0.8, 0.5)
    assert zoo.model_target(mobilenet, 0.5) == (0.77, "its own target")
    assert zoo.model_target(synthetic_row("torchvision:x", 2_000_000, 0.8, 0.5), 0.5)[0] == 0.85
    assert zoo.model_target(synthetic_row("torchvision:x", 1_999_999, 0.8, 0.5), 0.5) is None
    assert zoo.model_target(synthetic_row("video:x", 9_000_000, 0.8, 0.5), 0.5) is None
    assert zoo.model_target(mobilenet, 0.25) is None


def test_why_gives_shares_of_the_baseline_largest_static_reason_first_and_the_last_allocator_note():
    from types import SimpleNamespace

    from kwconvert.plan import StaticLayer
    plan = SimpleNamespace(
        params_baseline=1000, params_converted=700,
        plain=(StaticLayer("conv0", "stem"), StaticLayer("fc", "head"),
               StaticLayer("q", "query/key projection (static in ViTs, as in the paper)")),
        warehouses=(SimpleNamespace(warehouse_params=300, attention_params=60),
                    SimpleNamespace(warehouse_params=100, attention_params=40)),
        notes=("budget guard: split a into 2", "allocator: w: " + "x" * 300, "query and key stay static"))
    why = zoo._why(plan, {"conv0": 30, "fc": 150, "q": 2})
    assert why.startswith("static: head 15%, stem 3%, query/key projection <1%; cells 40%; attention 10%; rest 2%; ")
    last = why.split("last of 2 note(s): ")[1]
    assert last.startswith("allocator: w: xxx") and last.endswith("...") and len(last) == zoo.WHY_NOTE_CHARS


class ValueReader(nn.Module):
    """Reads a value in its forward: it cannot be traced or planned on the meta device."""

    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(3, 64, 3), nn.ReLU(), nn.Conv2d(64, 64, 3), nn.ReLU(), nn.Conv2d(64, 64, 3))
        self.head = nn.Linear(64, 4)

    def forward(self, x):
        y = self.body(x)
        y = y if float(y.mean()) > -1e9 else -y
        return self.head(y.mean((2, 3)))


def test_plans_only_plans_on_the_meta_device_as_on_the_cpu_and_falls_back_to_the_cpu(monkeypatch):
    row = zoo.run_case("custom:conv1d_resnet", plans_only=True)
    assert (row["status"], row["device"], row["max_diff"]) == ("planned", "meta", None), row["reason"]
    cpu = {}
    with torch.no_grad():
        zoo._plan_on(zoo.Case("custom:conv1d_resnet"), cpu, "cpu")
    for field in ("ratio_b1", "ratio_b05", "ratio_b025", "why_b05", "why_b025", "params_baseline"):
        assert row[field] == cpu[field], field
    assert row["ratio_b025"] < row["ratio_b05"] < row["ratio_b1"]
    monkeypatch.setitem(zoo.CUSTOM, "value_reader", (ValueReader, (3, 16, 16)))
    row = zoo.run_case("custom:value_reader", plans_only=True)
    assert (row["status"], row["device"]) == ("planned", "cpu"), row["reason"]


def test_plans_only_writes_its_own_file_with_the_budget_report(monkeypatch, tmp_path, capsys):
    monkeypatch.setattr(zoo, "RESULTS", tmp_path / "zoo.json")
    monkeypatch.setattr(zoo, "BUDGET_RESULTS", tmp_path / "zoo_budgets.json")
    monkeypatch.setattr(zoo, "sweep", lambda cases, jobs, threads, timeout, fast_path, on_row, plans_only, method: [
        on_row(zoo.run_case(case.id, timeout, fast_path, plans_only, method)) for case in cases])
    assert zoo.main(["--plans-only", "--subset", "custom:conv1d_resnet", "--no-timm"]) == 0
    assert not (tmp_path / "zoo.json").exists()
    data = json.loads((tmp_path / "zoo_budgets.json").read_text())
    assert data["settings"]["plans_only"] is True and data["summary"]["custom"]["planned"] == 1
    assert [(d["group"], d["budget"]) for d in data["budgets"]["distribution"]] == [
        (group, budget) for group in ("custom", "all") for budget in (1.0, 0.5, 0.25)]
    assert "above target: none" in capsys.readouterr().out


def test_a_conversion_float32_cannot_tell_from_exact_is_checked_in_float64(monkeypatch):
    """A deep model amplifies float32's rounding past the bound (timm's rexnet under ODConv,
    whose kernels are spread copies rounded once more); the float64 build decides."""
    monkeypatch.setattr(zoo, "tolerance", lambda scale, noise: 0.0)  # float32 alone always misses
    row = zoo.run_case("torchvision:resnet18", timeout=300, method="odconv")
    assert row["status"] == "pass", row["reason"]
    assert row["max_diff"] > 0 and row["max_diff_float64"] <= zoo.FLOAT64_TOLERANCE * max(1.0, row["output_scale"])


def test_the_float64_check_does_not_pass_a_conversion_that_is_not_exact(monkeypatch):
    from kwconvert.methods.odconv import layers as odconv_layers
    monkeypatch.setattr(zoo, "tolerance", lambda scale, noise: 0.0)
    exact = odconv_layers._ODConvNd.from_conv.__func__

    def off_by_a_little(cls, conv, **kwargs):  # 1e-6 of every kernel: below the per-layer check
        layer = exact(cls, conv, **kwargs)
        with torch.no_grad():
            layer.weight.mul_(1 + 1e-6)
        return layer

    monkeypatch.setattr(odconv_layers._ODConvNd, "from_conv", classmethod(off_by_a_little))
    row = zoo.run_case("torchvision:resnet18", timeout=300, method="odconv")
    assert row["status"] == "fail" and "in float64" in row["reason"]
