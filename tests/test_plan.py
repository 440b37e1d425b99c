"""The planner: the paper's Table 14 layouts and the reference parameter counts, the budget
guard on models beyond the paper, the options, and invariants on random CNNs."""
import copy
import dataclasses
import functools
import json
import math

import pytest
import torch
import torchvision
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from rich.console import Console
from torch import nn

import kwconvert
from kwconvert.methods.kernelwarehouse import cells
from kwconvert.methods.kernelwarehouse.options import PlanOptions
from kwconvert.plan import Plan, check_consistent, parse_budget, plan
from kwconvert.trace import trace

from .helpers import graph_of, plan_of


def conv_share(name: str, result: Plan) -> float:
    """Share of the model's conv weights held by converted layers."""
    graph = graph_of(name)
    convs = [c for c in graph.candidates if c.is_conv]
    converted = set(result.converted_layers)
    return sum(c.weight_numel for c in convs if c.name in converted) / sum(c.weight_numel for c in convs)


# --- Table 14 (m_t and n per warehouse, execution order) --------------------------------
R18_B1 = [56, 47, 47, 27]
R18_SMALL = [224, 188, 188, 108]
R50_B1 = [87, 104, 138, 47]
MNV2_B1 = [9, 36, 34, 78, 18, 42, 27, 102, 36, 120, 27, 58, 27]
MNV2_B4_MT = [9, 36, 11, 1, 2, 18, 7, 3, 27, 4, 4, 36, 9, 3, 27, 11, 3, 27, 20]
MNV2_B4_N = [36, 144, 44, 4, 8, 72, 28, 12, 108, 16, 16, 144, 36, 12, 108, 44, 12, 108, 80]
# The paper lists ConvNeXt-Tiny as 16,4,4,4,147,24,...: the reference creates the three
# downsample warehouses (m_t 4) first, right after the stem.  Plans list warehouses by first
# member in execution order, so each downsample warehouse follows the stage it closes.
CONVNEXT_16 = [16, 147, 24, 4, 147, 24, 4, 147, 24, 147, 24, 147, 24, 4, 147, 24]

TABLE_14 = [
    ("resnet18", 0.25, {}, R18_SMALL, [56, 47, 47, 27]),
    ("resnet18", 0.5, {}, R18_SMALL, [112, 94, 94, 54]),
    ("resnet18", 1, {}, R18_B1, R18_B1),
    ("resnet18", 2, {}, R18_B1, [112, 94, 94, 54]),
    ("resnet18", 4, {}, R18_B1, [224, 188, 188, 108]),
    ("resnet50", 0.5, {}, [348, 416, 552, 188], [174, 208, 276, 94]),
    ("resnet50", 1, {}, R50_B1, R50_B1),
    ("resnet50", 4, {}, R50_B1, [348, 416, 552, 188]),
    ("mobilenet_v2", 1, {}, MNV2_B1, MNV2_B1),
    ("mobilenet_v2", 4, {}, MNV2_B4_MT, MNV2_B4_N),
    ("convnext_tiny", 1, {"max_blocks_per_stage": 3}, CONVNEXT_16, CONVNEXT_16),
]


@pytest.mark.parametrize("name, budget, options, m_t, n", TABLE_14,
                         ids=[f"{c[0]}-b{c[1]}{'-cut3' if c[2] else ''}" for c in TABLE_14])
def test_table_14_layout(name, budget, options, m_t, n):
    result = plan_of(name, budget, **options)
    assert [w.m_t for w in result.warehouses] == m_t
    assert [w.n for w in result.warehouses] == n
    # the budget guard never touches the paper's layouts
    assert not any(note.startswith("budget guard") for note in result.notes)
    assert "kept static to honour the budget" not in {s.reason for s in result.plain}


# --- parameter counts -----------------------------------------------------------------
EXACT_COUNTS = [
    ("resnet50", 0.5, {}, 17_638_264),
    ("convnext_tiny", 1, {}, 39_370_674),  # the reference's public config: 12 warehouses
]
ROUNDED_COUNTS = [  # millions, to the 0.01 M the spec gives
    ("resnet18", 0.25, 4.03), ("resnet18", 0.5, 7.43), ("resnet18", 1, 11.93), ("resnet18", 2, 23.24),
    ("resnet18", 4, 45.86), ("resnet50", 1, 28.05), ("resnet50", 4, 102.02),
    ("mobilenet_v2", 1, 5.17), ("mobilenet_v2", 4, 11.38),
]


@pytest.mark.parametrize("name, budget, options, expected", EXACT_COUNTS, ids=[c[0] for c in EXACT_COUNTS])
def test_parameter_count_equals_reference_exactly(name, budget, options, expected):
    assert plan_of(name, budget, **options).params_converted == expected


@pytest.mark.parametrize("name, budget, millions", ROUNDED_COUNTS, ids=[f"{c[0]}-b{c[1]}" for c in ROUNDED_COUNTS])
def test_parameter_count_matches_reference_to_rounding(name, budget, millions):
    assert round(plan_of(name, budget).params_converted / 1e6, 2) == millions


@pytest.mark.parametrize("budget, millions", [(1, 2.85), (4, 4.65)])
def test_mobilenet_v2_half_width_count(budget, millions):
    graph = graph_of("mobilenet_v2", width_mult=0.5)
    assert round(plan(None, budget, graph=graph).params_converted / 1e6, 2) == millions


def test_resnet18_stage1_worked_example():
    """KERNELWAREHOUSE.md: cells 64x64, four 3x3 convs (9 cells), layer2.0.conv1 (18) and
    its 1x1 downsample (2) handed over to stage 1: m_t = 56."""
    stage1 = plan_of("resnet18", 1).warehouses[0]
    assert stage1.name == "stage1.conv2d" and stage1.cell == (64, 64, 1, 1)
    assert stage1.layer_names == ("layer1.0.conv1", "layer1.0.conv2", "layer1.1.conv1", "layer1.1.conv2",
                                  "layer2.0.conv1", "layer2.0.downsample.0")
    assert [layer.cells for layer in stage1.layers] == [9, 9, 9, 9, 18, 2]
    assert [layer.offset for layer in stage1.layers] == [0, 9, 18, 27, 36, 54]


def test_resnet50_plain_layers_and_parameter_saver():
    result = plan_of("resnet50", 0.5)
    assert [(s.layer, s.reason) for s in result.plain] == [
        ("conv1", "stem"), ("layer1.0.conv1", "stem-fed pointwise conv"),
        ("layer1.0.downsample.0", "stem-fed pointwise conv"), ("fc", "head")]
    assert {w.basis_ratio for w in result.warehouses} == {1 / 16}
    assert plan_of("resnet18", 0.5).warehouses[0].basis_ratio is None  # 0.24 < 1/2: saver off
    without = plan_of("resnet50", 0.5, param_saver=False, allocate=False)
    assert without.params_converted > result.params_converted


#: Budgets beyond the paper's: not 1/k (0.3, 0.4, 0.6, 2/3, 3/4) or not integers (1.5, 2.5).
ANY_BUDGETS = ["1/4", "0.3", "1/3", "0.4", "1/2", "0.6", "2/3", "3/4", "1", "1.5", "2", "2.5", "3", "4"]


@functools.lru_cache(maxsize=None)
def video_graph():
    """r2plus1d_18: conv3d, and an odd input-channel GCD (45) that b < 1 cuts to 15."""
    return trace(torchvision.models.get_model("r2plus1d_18", weights=None), torch.randn(1, 3, 8, 112, 112))


def walk_fits(result: Plan) -> None:
    for warehouse in result.warehouses:
        offset = 0
        for layer in warehouse.layers:
            assert layer.offset == offset
            offset += cells.cells_handed_out(layer.cells, warehouse.budget)
        assert offset <= warehouse.n == cells.warehouse_size(warehouse.m_t, warehouse.budget)
        assert result.budget <= warehouse.budget <= max(result.budget, 1)  # the allocator's b' range


@pytest.mark.parametrize("budget", ANY_BUDGETS)
@pytest.mark.parametrize("name", ["resnet18", "mobilenet_v2", "r2plus1d_18"])
def test_every_budget_plans_a_walk_that_fits_its_warehouses(name, budget):
    """resnet18 at b = 0.4 used to plan a stage-1 walk of 112 cells for n = 89, then fail to convert."""
    if name == "r2plus1d_18":
        result = plan(None, parse_budget(budget), graph=video_graph(), model_name=name)
    else:
        result = plan_of(name, parse_budget(budget))
    walk_fits(result)
    assert Plan.from_json(result.to_json()) == result


def test_resnet18_at_0_4_has_the_budgets_n_and_floor_shares():
    stage1 = plan_of("resnet18", 0.4).warehouses[0]
    assert (stage1.m_t, stage1.n) == (224, 89)
    assert [layer.cells for layer in stage1.layers] == [36, 36, 36, 36, 72, 8]
    assert [layer.offset for layer in stage1.layers] == [0, 14, 28, 42, 56, 84]  # floor(0.4 * m) each


def test_attention_norm_and_params_follow_cells_arithmetic():
    result = plan_of("convnext_tiny", 1)
    assert {w.attention_norm for w in result.warehouses} == {"layernorm"}
    assert {w.attention_norm for w in plan_of("resnet18", 1).warehouses} == {"batchnorm"}
    for w in result.warehouses:
        assert w.warehouse_params == w.n * math.prod(w.cell)
        assert w.attention_params == sum(
            cells.attention_params(l.in_channels, l.hidden, l.cells, w.n, norm="layernorm") for l in w.layers)
        assert all(l.hidden == cells.hidden_size(l.in_channels) for l in w.layers)


# --- budget guard on models beyond the paper ----------------------------------------------
TRAPS = ["resnext50_32x4d", "efficientnet_b0", "mobilenet_v3_large", "regnet_y_400mf", "densenet121"]


@pytest.mark.parametrize("name", TRAPS)
@pytest.mark.parametrize("budget, bound", [(1, 1.5), (0.5, 1.0)])
def test_trap_models_stay_within_budget(name, budget, bound):
    result = plan_of(name, budget)
    assert result.params_converted <= bound * result.params_baseline
    assert conv_share(name, result) >= 0.5


def test_grouped_convs_get_their_own_warehouses():
    result = plan_of("resnext50_32x4d", 1)
    grouped = [w for w in result.warehouses if w.name.endswith(".grouped")]
    assert len(grouped) == 4 and all(l.groups == 32 for w in grouped for l in w.layers)
    mixed = plan_of("resnext50_32x4d", 1, separate_grouped=False, max_params_ratio=100)
    assert mixed.params_converted > 3 * result.params_converted  # the ResNeXt trap


def test_guard_splits_then_keeps_layers_static_only_when_over_the_limit():
    result = plan_of("densenet121", 1)
    assert any(note.startswith("budget guard: split pre.conv2d") for note in result.notes)
    assert result.warehouses[0].name == "pre.conv2d-1"
    tight = plan_of("resnet18", 1, max_params_ratio=1.0)
    assert tight.params_converted <= tight.params_baseline
    assert "kept static to honour the budget" in {s.reason for s in tight.plain}
    loose = plan_of("densenet121", 1, max_params_ratio=1e6)
    assert [w.name for w in loose.warehouses] == ["pre.conv2d"]


def test_squeeze_excitation_convs_get_warehouses_of_their_own_or_stay_plain():
    result = plan_of("efficientnet_b0", 1)
    se_warehouses = [w for w in result.warehouses if ".squeeze_excitation" in w.name]
    members = [name for w in se_warehouses for name in w.layer_names]
    assert len(members) == 32 and all(".fc1" in name or ".fc2" in name for name in members)
    others = [w for w in result.warehouses if w not in se_warehouses]
    assert not any(".fc1" in n or ".fc2" in n for w in others for n in w.layer_names)
    plain = plan_of("efficientnet_b0", 1, squeeze_excitation="plain")
    se = [s.layer for s in plain.plain if s.reason == "squeeze-excitation conv on a pooled map"]
    assert sorted(se) == sorted(members)


class Untraceable(nn.Module):
    """A torchvision model behind data-dependent control flow: only the hook fallback works."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, x):
        return self.model(x) if x.abs().sum() > 0 else self.model(-x)


def test_hook_fallback_stages_by_resolution_and_says_so():
    result = plan(Untraceable(torchvision.models.resnet18(weights=None)), 1)
    assert any("fell back to forward hooks" in note for note in result.notes)
    # resolution stages happen to reproduce ResNet18's reassigned stages
    assert [(w.name, w.m_t) for w in result.warehouses] == [
        ("stage1.conv2d", 56), ("stage2.conv2d", 47), ("stage3.conv2d", 47), ("stage4.conv2d", 27)]
    assert [(s.layer, s.reason) for s in result.plain] == [("model.conv1", "stem"), ("model.fc", "head")]


# --- options ----------------------------------------------------------------------------
def test_unknown_and_invalid_options_are_rejected():
    with pytest.raises(ValueError, match="unknown plan option.*colour.*valid options: stem"):
        plan_of("resnet18", 1, colour="red")
    for bad in ({"stem": "maybe"}, {"max_blocks_per_stage": 0}, {"reduction": 2}, {"mode": "condconv"},
                {"max_params_ratio": -1}, {"include": [3]}):
        with pytest.raises(ValueError, match="option"):
            plan_of("resnet18", 1, **bad)
    assert all(help_text for help_text in PlanOptions.help().values())


def test_stem_and_stem_fed_options():
    result = plan_of("resnet18", 1, stem="warehouse")
    assert result.warehouses[0].name == "stem.conv2d" and result.warehouses[0].layer_names == ("conv1",)
    assert plan_of("mobilenet_v2", 1, stem="plain").plain[0].reason == "stem"
    result = plan_of("resnet50", 1, stem_fed_pointwise_plain=False)
    assert result.warehouses[0].layer_names[:2] == ("layer1.0.conv1", "layer1.0.conv2")


def test_depthwise_and_expansion_options():
    assert not any("depthwise" in w.name for w in plan_of("mobilenet_v2", 1, separate_depthwise=False).warehouses)
    assert len(plan_of("mobilenet_v2", 1, expansion_split=True).warehouses) == 19
    assert len(plan_of("mobilenet_v2", 4, expansion_split=False).warehouses) == 13
    expansion = plan_of("mobilenet_v2", 4).warehouse_of("features.2.conv.0.0")
    assert expansion.name == "pre.expansion"


def test_include_and_exclude_patterns():
    result = plan_of("resnet18", 1, exclude=["layer4.*"])
    assert not any(name.startswith("layer4") for name in result.converted_layers)
    assert ("layer4.1.conv2", "excluded by option") in {(s.layer, s.reason) for s in result.plain}
    result = plan_of("resnet18", 1, include="layer1.*")
    assert set(result.converted_layers) == {"layer1.0.conv1", "layer1.0.conv2", "layer1.1.conv1",
                                            "layer1.1.conv2"}
    for option in ("include", "exclude"):  # a typo said, not a plan that quietly ignores it
        with pytest.raises(ValueError, match=rf"{option} pattern 'layer9\*' matches no layer of the model "
                                             r"\(its layers: conv1, layer1.0.conv1, layer1.0.conv2, \.\.\."):
            plan_of("resnet18", 1, **{option: ["layer1.*", "layer9*"]})


def test_a_plan_prints_as_one_line():
    result = plan_of("resnet18", 1)
    assert repr(result) == (f"Plan(model='resnet18', budget=1, 4 warehouses of 19 layers, 2 static, parameters "
                            f"{result.params_baseline:,} -> {result.params_converted:,} ({result.ratio:.2f}x))")


def test_dynamic_conv_mode_is_whole_kernels_one_layer_each():
    result = plan_of("resnet18", 4, mode="dynamic_conv")
    assert len(result.warehouses) == 19
    for w in result.warehouses:
        (layer,) = w.layers
        assert (w.name, w.cell, layer.cells, w.n) == (layer.name, layer.weight_shape, 1, 4)
    assert {w.n for w in plan_of("resnet18", 2.7, mode="dynamic_conv").warehouses} == {2}


# --- budget -----------------------------------------------------------------------------
@pytest.mark.parametrize("text, value", [("0.5", 0.5), ("1/2", 0.5), ("4", 4.0), (" 1/4 ", 0.25), ("2x", 2.0)])
def test_parse_budget_accepts(text, value):
    assert parse_budget(text) == value


@pytest.mark.parametrize("text", ["abc", "0", "-1", "nan", "inf", "1/0", "", "1/2/3", "-1/2"])
def test_parse_budget_rejects(text):
    with pytest.raises(ValueError, match="budget must be a positive finite number"):
        parse_budget(text)


@pytest.mark.parametrize("budget", [0, -0.5, float("nan"), float("inf")])
def test_plan_rejects_bad_budget(budget):
    with pytest.raises(ValueError, match="budget must be a positive finite number"):
        plan_of("resnet18", budget)


# --- output -----------------------------------------------------------------------------
def test_table_renders_warehouses_summary_plain_layers_and_totals():
    console = Console(record=True, width=160)
    console.print(plan_of("resnet50", 0.5).table())
    text = console.export_text()
    for expected in ("stage1.conv2d", "layer2.0.downsample.0", "512x256x1x1", "attention",
                     "stem-fed pointwise conv", "17,638,264", "25,557,032", "0.690"):
        assert expected in text


def test_json_keeps_documented_keys():
    data = json.loads(plan_of("resnet18", 1).to_json())
    assert {"model", "budget", "params", "warehouses", "plain"} <= data.keys()
    assert data["params"] == {"baseline": 11_689_512, "converted": 11_932_148}
    assert {"name", "layers", "cell", "m", "m_t", "n"} <= data["warehouses"][0].keys()
    assert data["plain"][0] == {"layer": "conv1", "reason": "stem"}


# --- plans edited by hand ------------------------------------------------------------------
def edited(data: dict, path: tuple, value) -> dict:
    """A deep copy of ``data`` with the entry at ``path`` set to ``value`` (deleted for DELETE)."""
    data = copy.deepcopy(data)
    *parents, last = path
    target = functools.reduce(lambda node, key: node[key], parents, data)
    if value is DELETE:
        del target[last]
    else:
        target[last] = value
    return data


DELETE = object()
W0, L0, L1 = ("warehouses", 0), ("warehouses", 0, "layer_details", 0), ("warehouses", 0, "layer_details", 1)
WHERE = r"plan warehouse stage1\.conv2d"
CONTRADICTIONS = {  # resnet18 at b = 1: stage1 has cells 64x64, m 9, 9, 9, 9, 18, 2 (m_t = n = 56)
    "m": ((*W0, "m", 0), 10, WHERE + r", layer layer1\.0\.conv1: m is 10 but cell 64x64x1x1 tiles the kernel in 9"),
    "m_t": ((*W0, "m_t"), 57, WHERE + r": m_t is 57, its layers' m sum to 56"),
    "n": ((*W0, "n"), 57, WHERE + r": n is 57, budget 1 x m_t 56 gives 56"),
    "n-too-small": ((*W0, "n"), 0, WHERE + r": n is 0, too few for the 56 cells its layers start on"),
    "offset": ((*L1, "offset"), 0, WHERE + r", layer layer1\.0\.conv2: offset is 0, the one-to-one walk gives 9"),
    "cell-not-dividing": ((*W0, "cell"), [48, 64, 1, 1],
                          WHERE + r", layer layer1\.0\.conv1: cell 48x64x1x1 does not divide kernel 64x64x3x3"),
    "cell-without-m": ((*W0, "cell"), [32, 64, 1, 1], WHERE + r", layer layer1\.0\.conv1: m is 9 but cell "
                                                          r"32x64x1x1 tiles the kernel in 18"),
    "kernel": ((*L0, "weight_shape"), [64, 64, 3], WHERE + r", layer layer1\.0\.conv1: weight_shape \[64, 64, 3\] "
                                                       r"is not a conv2d kernel"),
    "kind": ((*L0, "kind"), "conv4d", WHERE + r", layer layer1\.0\.conv1: kind is 'conv4d'"),
    "planned-twice": (("warehouses", 1, "layers", 0), "layer1.0.conv1",
                      r"plan warehouse stage2\.conv2d, layer layer1\.0\.conv1: the layer is planned twice"),
    "also-plain": (("plain", 0, "layer"), "layer1.0.conv1", WHERE + r", layer layer1\.0\.conv1: .* also listed as plain"),
    "warehouse-name": (("warehouses", 1, "name"), "stage1.conv2d", WHERE + r": two warehouses have that name"),
    "warehouse-params": ((*W0, "params", "warehouse"), 1, WHERE + r": params\.warehouse is 1, n 56 cells of 64x64x1x1 "
                                                             r"hold 229376"),
    "attention-params": ((*W0, "params", "attention"), 1, WHERE + r": params\.attention is 1"),
    "budget": (("budget",), 0, r"plan: budget must be a positive finite number"),
}
MALFORMED = {
    "missing-top-level": (("warehouses",), DELETE, r"^plan JSON: 'warehouses' is missing$"),
    "missing-nested": (("params", "baseline"), DELETE, r"^plan JSON: 'params': 'baseline' is missing$"),
    "missing-in-warehouse": ((*W0, "n"), DELETE, r"^plan JSON: warehouse stage1\.conv2d: 'n' is missing$"),
    "missing-in-layer": ((*L0, "offset"), DELETE,
                         r"^plan JSON: warehouse stage1\.conv2d, layer layer1\.0\.conv1: 'offset' is missing$"),
    "string-for-integer": ((*W0, "n"), "56",
                           r"^plan JSON: warehouse stage1\.conv2d: 'n' must be an integer, got a string '56'$"),
    "float-for-integer": ((*W0, "m_t"), 56.5, r"'m_t' must be an integer, got a number 56\.5$"),
    "boolean-for-number": (("budget",), True, r"^plan JSON: 'budget' must be a number, got a boolean$"),
    "null-for-list": ((*W0, "m"), None, r"'m' must be a list of integers, got null$"),
    "list-of-strings": ((*W0, "cell"), ["64", "64", 1, 1], r"'cell' must be a list of integers, got a list$"),
    "not-an-object": ((*W0,), 5, r"^plan JSON: warehouses\[0\] must be an object, got an integer$"),
    "lengths-differ": ((*W0, "m"), [9, 9], r"'layers', 'm' and 'layer_details' differ in length \(6, 2, 6\)"),
    "format-newer": (("format",), 2, r"plan format 2 is newer than this kwconvert reads"),
}


@pytest.mark.parametrize("edit", CONTRADICTIONS.values(), ids=CONTRADICTIONS.keys())
def test_plan_json_that_contradicts_itself_is_refused_as_it_is_read(edit):
    path, value, message = edit
    with pytest.raises(ValueError, match=message):
        Plan.from_dict(edited(plan_of("resnet18", 1).to_dict(), path, value))


@pytest.mark.parametrize("edit", MALFORMED.values(), ids=MALFORMED.keys())
def test_malformed_plan_json_is_one_value_error_naming_the_field(edit):
    path, value, message = edit
    with pytest.raises(ValueError, match=message):
        Plan.from_dict(edited(plan_of("resnet18", 1).to_dict(), path, value))
    with pytest.raises(ValueError, match=r"^plan JSON must be an object, got a list$"):
        Plan.from_dict([])


def test_plan_edited_in_python_is_refused_before_it_is_applied():
    """The same checks, in one place, guard convert() against a plan edited with dataclasses.replace."""
    model = torchvision.models.resnet18(weights=None)
    result = plan(model, 0.5)
    stage1 = result.warehouses[0]
    edited_plan = dataclasses.replace(result, warehouses=(dataclasses.replace(stage1, n=113),) + result.warehouses[1:])
    with pytest.raises(ValueError, match=r"plan warehouse stage1\.conv2d: n is 113, budget 0\.5 x m_t 224 gives 112"):
        kwconvert.convert(model, edited_plan)
    assert not any(isinstance(m, kwconvert.KWConv2d) for m in model.modules())


class OddChannels(nn.Module):
    """Two convs sharing a warehouse whose output-channel GCD (45, as in r2plus1d_18) is odd."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 64, 3, padding=1)
        self.pointwise = nn.Conv2d(64, 45, 1)
        self.spatial = nn.Conv2d(64, 45, 3, padding=1)

    def forward(self, x):
        x = self.stem(x)
        return self.pointwise(x) + self.spatial(x)


def test_odd_channel_gcd_at_small_budget_gives_cells_that_tile_and_convert():
    """At b < 1 the odd GCD 45 goes to 15, its largest divisor below the half (not 45 // 2 = 22)."""
    model = OddChannels().eval()
    x = torch.randn(1, 3, 8, 8)
    result = plan(model, 0.5, x, stem="plain", stem_fed_pointwise_plain=False, max_params_ratio=100,
                  allocate=False)
    assert [(w.cell, [layer.cells for layer in w.layers]) for w in result.warehouses] == [((15, 32, 1, 1), [6, 54])]
    assert Plan.from_json(result.to_json()) == result
    converted = kwconvert.convert(model, result, inplace=False)
    assert sum(p.numel() for p in converted.parameters()) == result.params_converted


def odd_cells() -> nn.Module:
    """A chain 45 -> 45 whose cells at b < 1 (15 x 15) tile the layers in odd m: 81, 81, 9."""
    return nn.Sequential(nn.Conv2d(3, 45, 3, padding=1), nn.ReLU(), nn.Conv2d(45, 45, 3, padding=1), nn.ReLU(),
                         nn.Conv2d(45, 45, 3, padding=1), nn.ReLU(), nn.Conv2d(45, 45, 1))


@pytest.mark.parametrize("budget", [0.5, 0.25, 0.4, 0.75, 1.5])
def test_odd_m_plans_and_converts_at_any_budget(budget):
    """At b = 1/2 the reference's walk (one cell per two mixtures) hands out 41 + 41 + 5 = 87
    cells for n = floor(171 / 2) = 85; floor shares hand out 40 + 40 + 4 = 84."""
    model = odd_cells().eval()
    x = torch.randn(1, 3, 6, 6)
    result = plan(model, budget, x, stem="plain", max_params_ratio=100, allocate=False)
    (warehouse,) = result.warehouses
    assert [layer.cells for layer in warehouse.layers] == ([81, 81, 9] if budget < 1 else [9, 9, 1])
    walk_fits(result)
    converted = kwconvert.convert(model, result, inplace=False).eval()
    assert sum(p.numel() for p in converted.parameters()) == result.params_converted
    error = kwconvert.plan_of(converted).warehouses[0].init_error
    if budget < 1:
        assert 0 < error < 1
    else:
        assert error == 0
        with torch.no_grad():
            assert torch.allclose(converted(x), model(x), atol=1e-5)


# --- properties on random CNNs -------------------------------------------------------------
class RandomCNN(nn.Module):
    """A stem, then plain / residual / branch / depthwise-separable / grouped blocks, a head."""

    def __init__(self, stem_kernel: int, blocks: list[tuple[str, int, int, int]]):
        super().__init__()
        width = blocks[0][1]
        self.stem = nn.Conv2d(3, width, stem_kernel, padding=stem_kernel // 2)
        self.blocks = nn.ModuleList()
        self.kinds = []
        for kind, out, kernel, stride in blocks:
            self.blocks.append(self._block(kind, width, out, kernel, stride))
            self.kinds.append(kind)
            width = out if kind != "residual" else width
        self.head = nn.Linear(width, 5)

    @staticmethod
    def _block(kind, width, out, kernel, stride) -> nn.Module:
        pad = kernel // 2
        if kind == "residual":
            return nn.Sequential(nn.Conv2d(width, width, kernel, padding=pad), nn.ReLU(),
                                 nn.Conv2d(width, width, kernel, padding=pad))
        if kind == "branch":
            return nn.ModuleList([nn.Conv2d(width, out // 2, 1, stride=stride),
                                  nn.Conv2d(width, out - out // 2, kernel, stride=stride, padding=pad)])
        if kind == "separable":
            return nn.Sequential(nn.Conv2d(width, width, 1), nn.Conv2d(width, width, kernel, stride, pad, groups=width),
                                 nn.BatchNorm2d(width), nn.Conv2d(width, out, 1))
        if kind == "grouped":
            groups = math.gcd(width, out)
            groups = 2 if groups % 2 == 0 else 1
            return nn.Conv2d(width, out, kernel, stride, pad, groups=groups)
        return nn.Sequential(nn.Conv2d(width, out, kernel, stride, pad), nn.ReLU())

    def forward(self, x):
        x = self.stem(x)
        for kind, block in zip(self.kinds, self.blocks):
            if kind == "residual":
                x = x + block(x)
            elif kind == "branch":
                x = torch.cat([branch(x) for branch in block], dim=1)
            else:
                x = block(x)
        return self.head(x.mean((2, 3)))


blocks_strategy = st.lists(
    st.tuples(st.sampled_from(["plain", "residual", "branch", "separable", "grouped"]),
              st.sampled_from([4, 6, 8, 12, 16, 24]), st.sampled_from([1, 3, 5]), st.sampled_from([1, 2])),
    min_size=1, max_size=6)


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(stem_kernel=st.sampled_from([1, 3, 7]), blocks=blocks_strategy,
       budget=st.sampled_from([0.25, 0.5, 1.0, 2.0, 4.0]),
       options=st.sampled_from([{}, {"max_blocks_per_stage": 1}, {"stem": "warehouse"},
                                {"mode": "dynamic_conv"}, {"separate_depthwise": False}]))
def test_random_cnn_plans_are_complete_consistent_and_deterministic(stem_kernel, blocks, budget, options):
    torch.manual_seed(0)
    model = RandomCNN(stem_kernel, blocks)
    graph = trace(model, torch.randn(1, 3, 32, 32))
    result = plan(model, budget, graph=graph, **options)

    # every candidate is in exactly one warehouse or plain with a reason
    converted = [name for w in result.warehouses for name in w.layer_names]
    plain = [s.layer for s in result.plain]
    assert sorted(converted + plain) == sorted([c.name for c in graph.candidates] + [u for u, _ in graph.unused])
    assert all(s.reason for s in result.plain)

    for w in result.warehouses:
        assert w.n >= 1 and w.m_t == sum(l.cells for l in w.layers)
        for layer in w.layers:
            assert cells.cells_in(layer.weight_shape, w.cell) == layer.cells
            assert layer.cells * math.prod(w.cell) == math.prod(layer.weight_shape)
    assert result.params_converted <= PlanOptions(**options).params_ratio(budget) * result.params_baseline

    again = plan(model, budget, graph=trace(model, torch.randn(1, 3, 32, 32)), **options)
    assert again.to_json() == result.to_json()
    assert Plan.from_json(result.to_json()) == result

    # the plan's parameter count is the converted model's, and b >= 1 preserves the function
    model.eval()
    converted = kwconvert.convert(model, result, inplace=False).eval()
    assert sum(p.numel() for p in converted.parameters()) == result.params_converted
    if budget >= 1:
        x = torch.randn(2, 3, 32, 32)
        with torch.no_grad():
            assert torch.allclose(converted(x), model(x), atol=1e-4, rtol=1e-4)


@settings(max_examples=50, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(blocks=blocks_strategy, init=st.sampled_from(["preserve", "random"]),
       budget=st.floats(min_value=0, max_value=4, exclude_min=True) | st.sampled_from([0.3, 0.4, 2 / 3, 0.75, 2.5]))
def test_random_cnn_plans_convert_at_any_budget(blocks, budget, init):
    """Whatever b in (0, 4]: the plan passes the checks a loaded plan passes, converts to its
    parameter count, and a preserving conversion is exact at b >= 1 (tau = 1) and a fit below."""
    torch.manual_seed(0)
    model = RandomCNN(3, blocks).eval()
    x = torch.randn(2, 3, 16, 16)
    result = plan(model, budget, x[:1])
    check_consistent(result)
    walk_fits(result)
    converted = kwconvert.convert(model, result, init=init, inplace=False).eval()
    assert sum(p.numel() for p in converted.parameters()) == result.params_converted
    errors = [w.init_error for w in kwconvert.plan_of(converted).warehouses]
    if init == "random":
        assert errors == [None] * len(errors)
    elif budget >= 1:
        assert errors == [0.0] * len(errors)
        with torch.no_grad():
            assert torch.allclose(converted(x), model(x), atol=1e-4, rtol=1e-4)
    else:
        assert all(0 <= e <= 1 for e in errors)


# --- every torchvision classifier ---------------------------------------------------------
@pytest.mark.slow
def test_every_torchvision_classifier_plans():
    """All of torchvision.models.list_models(module=torchvision.models): about 30-50 s of
    planning on 2 cores (benchmarks/plan_speed.py records it)."""
    failures = []
    for name in torchvision.models.list_models(module=torchvision.models):
        model = torchvision.models.get_model(name, weights=None)
        try:
            result = plan(model, 1, model_name=name)
            assert result.warehouses and result.params_converted <= 1.5 * result.params_baseline
        except Exception as err:  # collect every failure, not just the first
            failures.append(f"{name}: {type(err).__name__}: {err}")
        del model
    assert not failures, "\n".join(failures)


# --- vision transformers ----------------------------------------------------------------------
@functools.lru_cache(maxsize=None)
def timm_graph(name: str):
    import timm
    return trace(timm.create_model(name, pretrained=False))


DEIT_COUNTS = [("deit_tiny_patch16_224", 1, 6.39), ("deit_tiny_patch16_224", 4, 20.44),
               ("deit_small_patch16_224", 1, 24.36)]


@pytest.mark.parametrize("name, budget, millions", DEIT_COUNTS, ids=[f"{c[0]}-b{c[1]}" for c in DEIT_COUNTS])
def test_deit_parameter_counts_are_within_5_percent_of_the_paper(name, budget, millions):
    result = plan(None, budget, graph=timm_graph(name))
    assert abs(result.params_converted / 1e6 - millions) <= 0.05 * millions


def test_vit_value_and_mlp_layers_share_warehouses_by_groups_of_blocks_query_key_static():
    graph = timm_graph("deit_tiny_patch16_224")
    result = plan(None, 1, graph=graph)
    assert [w.name for w in result.warehouses] == ["stage1a.linear", "stage1b.linear", "stage1c.linear",
                                                   "stage1d.linear"]
    first = result.warehouses[0]
    assert first.layer_names == tuple(f"blocks.{block}.{layer}" for block in range(3)
                                      for layer in ("attn.qkv", "attn.proj", "mlp.fc1", "mlp.fc2"))
    qkv = first.layers[0]
    assert (qkv.rows, qkv.weight_shape, qkv.cells) == ((384, 576), (192, 192), 1)
    assert first.cell == (192, 192) and first.m_t == 30
    assert any("query and key stay static" in note for note in result.notes)
    assert Plan.from_json(result.to_json()) == result
    assert [w.m_t for w in plan(None, 1, graph=graph, blocks_per_warehouse=None).warehouses] == [120]
    assert [w.m_t for w in plan(None, 1, graph=graph, blocks_per_warehouse=4).warehouses] == [40, 40, 40]
    whole = plan(None, 1, graph=graph, static_query_key=False).warehouses[0].layers[0]
    assert (whole.rows, whole.weight_shape) == (None, (576, 192))


def test_separate_query_key_projections_stay_static():
    from torchvision.models.vision_transformer import VisionTransformer
    model = VisionTransformer(image_size=32, patch_size=8, num_layers=2, num_heads=2, hidden_dim=32,
                              mlp_dim=64, num_classes=10)
    result = plan(model, 1, torch.randn(1, 3, 32, 32))
    prefix = "encoder.layers.encoder_layer_0.self_attention"
    static = {s.layer: s.reason for s in result.plain}
    assert static[f"{prefix}.q_proj"].startswith("query/key projection")
    assert {f"{prefix}.v_proj", f"{prefix}.out_proj"} <= set(result.converted_layers)
    assert len(result.unpacked_attention) == 2
    assert plan(model, 1, torch.randn(1, 3, 32, 32), exclude=["*attention*"]).unpacked_attention == ()


def test_submodule_plan_names_the_whole_models_layers():
    model = torchvision.models.segmentation.fcn_resnet50(weights=None, weights_backbone=None)
    result = plan(model, 1, torch.randn(1, 3, 64, 64), module="backbone")
    assert result.module == "backbone" and [w.m_t for w in result.warehouses] == [87, 104, 138, 47]
    assert result.converted_layers[0] == "backbone.layer1.0.conv2"
    assert {s.reason for s in result.plain if not s.layer.startswith("backbone.")} == {"outside module backbone"}
    whole = sum(p.numel() for p in model.parameters())
    backbone = sum(p.numel() for p in model.backbone.parameters())
    alone = plan(model.backbone, 1, torch.randn(1, 3, 64, 64))
    assert result.params_baseline == whole
    assert result.params_converted - whole == alone.params_converted - backbone
    assert Plan.from_json(result.to_json()) == result


def test_layers_kwconvert_cannot_swap_stay_static_with_the_reason():
    class Doubled(nn.Conv2d):
        def forward(self, x):
            return 2 * super().forward(x)

    class ReadsWeight(nn.Module):
        def __init__(self):
            super().__init__()
            self.stem = nn.Conv2d(3, 64, 3)
            self.doubled = Doubled(64, 64, 3)
            self.proj = nn.Conv2d(64, 64, 3)

        def forward(self, x):
            return self.proj(self.doubled(self.stem(x)).to(self.proj.weight.dtype))

    result = plan(ReadsWeight(), 1, torch.randn(1, 3, 16, 16), max_params_ratio=100)
    reasons = {s.layer: s.reason for s in result.plain}
    assert reasons["doubled"].startswith("Doubled overrides torch's forward")
    assert reasons["proj"].startswith("the model reads its weight outside its forward")
    assert result.converted_layers == ("stem",)


def test_tables_never_cut_a_name_or_a_number_at_80_columns():
    """efficientnet's split stages differ only at the end of their names."""
    import io

    plan = kwconvert.plan(torchvision.models.efficientnet_b0(weights=None), 0.5, (torch.randn(1, 3, 64, 64),))
    text = io.StringIO()
    Console(file=text, width=80, force_terminal=False).print(plan.table())
    shown = text.getvalue()
    assert "\u2026" not in shown and "..." not in shown  # nothing ellipsised
    lines = shown.splitlines()
    for w in plan.warehouses:  # titles on a line of their own, whole
        assert f"{w.name}: cell {'x'.join(map(str, w.cell))}, m_t {w.m_t}, n {w.n}" in lines
        assert f"{w.warehouse_params:,}" in shown
    assert max(len(line) for line in lines) <= 80
