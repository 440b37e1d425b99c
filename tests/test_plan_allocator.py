"""The planner below 1 (kwconvert.plan's allocator): a budget below 1 shrinks mobile models
too, the paper's own b < 1 layouts stay as they are, the authors' MobileNetV2 1/2x layout
is reachable through options to the parameter, and pinned choices are kept."""
import pytest
import torchvision

from kwconvert.methods.kernelwarehouse import cells
from kwconvert.pipeline import parse_option
from kwconvert.plan import Plan, plan
from kwconvert.methods.kernelwarehouse.options import PlanOptions
from kwconvert.methods.kernelwarehouse.sizing import HEAD_CELL_RATIO, allocation_target
from kwconvert.trace import trace

from .helpers import plan_of

#: Issue targets at b = 1/2 (total parameters / baseline), and where these models stood
#: before the allocator: 0.998x, 0.99x, 0.997x.
HALF_BUDGET_TARGETS = [("mobilenet_v2", 0.77), ("efficientnet_b0", 0.85), ("mobilenet_v3_large", 0.85)]


@pytest.mark.parametrize("name, target", HALF_BUDGET_TARGETS, ids=[t[0] for t in HALF_BUDGET_TARGETS])
def test_half_budget_shrinks_mobile_models(name, target):
    result, uniform = plan_of(name, 0.5), plan_of(name, 0.5, allocate=False)
    assert uniform.ratio > 0.95  # the paper's layout at b everywhere, held under 1.0 by the guard
    assert result.ratio <= min(target, allocation_target(0.5) + 0.01)
    assert len(result.converted_layers) >= len(uniform.converted_layers)  # never fewer dynamic layers
    assert all(0.5 <= w.budget <= 1 for w in result.warehouses)
    explained = {note.split(":")[1].strip() for note in result.notes if note.startswith("allocator: ")}
    changed = {w.name.rsplit("-", 1)[0] for w in result.warehouses
               if w.budget != 0.5 or any(l.hidden != cells.hidden_size(l.in_channels) for l in w.layers)}
    assert changed and changed <= explained  # every warehouse the allocator changed has its note
    assert Plan.from_json(result.to_json()) == result


@pytest.mark.parametrize("name", ["mobilenet_v2", "efficientnet_b0"])
def test_quarter_budget_reaches_its_target(name):
    assert plan_of(name, 0.25).ratio <= allocation_target(0.25) + 0.01 < plan_of(name, 0.25, allocate=False).ratio


@pytest.mark.parametrize("name, budget", [("resnet18", 0.25), ("resnet18", 0.5), ("resnet50", 0.5)])
def test_the_papers_layouts_below_1_are_left_alone(name, budget):
    result = plan_of(name, budget)
    assert result.ratio <= allocation_target(budget)
    assert result.warehouses == plan_of(name, budget, allocate=False).warehouses
    assert not any(note.startswith("allocator") for note in result.notes)
    assert ("fc", "head") in {(s.layer, s.reason) for s in result.plain}


def test_a_budget_below_1_never_grows_a_model():
    assert PlanOptions().params_ratio(0.9) == 1.0 and PlanOptions().params_ratio(2) == 2.5
    assert plan_of("densenet121", 0.9).ratio <= 1.0


# --- the authors' MobileNetV2 1/2x (their kw1d2x_mobilenetv2) ----------------------------------
#: The README's recipe: reduction 1/32, no parameter saver, expansion convs apart, depthwise
#: convs and the stem at b' = 1, the pointwise convs of the first stages static, the last
#: stage's pointwise convs (with the last 1x1 conv) at 1/2 and the classifier in a warehouse.
AUTHORS_MOBILENET_V2_HALF = dict(
    reduction=1 / 32, param_saver=False, expansion_split=True, head="warehouse", allocate=False,
    warehouses={"stem.*": {"budget": 1}, "*.depthwise": {"budget": 1},
                "pre.conv2d": {"static": True}, "pre.expansion": {"static": True},
                "stage[1-4].conv2d": {"static": True}, "stage[1-4].expansion": {"static": True}})


@pytest.mark.parametrize("width, expected", [(1.0, 2_654_396), (0.5, 1_466_888)])
def test_the_authors_mobilenet_v2_half_is_reproduced_to_the_parameter(width, expected):
    graph = trace(torchvision.models.mobilenet_v2(weights=None, width_mult=width))
    result = plan(None, 0.5, graph=graph, **AUTHORS_MOBILENET_V2_HALF)
    assert result.params_converted == expected
    assert [w.name for w in result.warehouses] == [
        "stem.conv2d", "pre.depthwise", "stage1.depthwise", "stage2.depthwise", "stage3.depthwise",
        "stage4.depthwise", "stage5.expansion", "stage5.depthwise", "stage5.conv2d", "head.linear"]
    assert [w.budget for w in result.warehouses] == [1, 1, 1, 1, 1, 1, 0.5, 1, 0.5, 0.5]
    head = result.warehouses[-1]
    assert head.layer_names == ("classifier.1",) and (head.cell, head.m_t, head.n) == ((1000, 32), 40, 20)
    assert head.layers[0].hidden == 40  # 1280 / 32
    static = {s.layer for s in result.plain if s.reason == "kept static by option warehouses"}
    assert "features.14.conv.2" in static and "features.15.conv.2" not in static


# --- pins and heads -------------------------------------------------------------------------------
def test_pinned_fields_are_never_changed_by_the_allocator():
    pins = {"stage5.conv2d": {"budget": 0.5, "reduction": 1 / 16, "param_saver": False, "cell": [0.5, 0.5]},
            "stage1.*": {"static": True}}
    result = plan_of("mobilenet_v2", 0.5, warehouses=pins)
    pinned = [w for w in result.warehouses if w.name.rsplit("-", 1)[0] == "stage5.conv2d"]
    assert pinned and all(w.budget == 0.5 and w.basis_ratio is None for w in pinned)
    assert all(l.hidden == cells.hidden_size(l.in_channels, 1 / 16) for w in pinned for l in w.layers)
    assert not any(w.name.startswith("stage1.") for w in result.warehouses)
    assert {s.reason for s in result.plain if s.layer.startswith("features.3.")} == {"kept static by option warehouses"}


def test_a_head_the_allocator_converts_keeps_its_pins():
    free, pinned = plan_of("mobilenet_v2", 0.5), plan_of("mobilenet_v2", 0.5, warehouses={"head.*": {"reduction": 1 / 16}})
    assert [l.hidden for w in free.warehouses if w.name == "head.linear" for l in w.layers] == [40]  # narrowed
    assert [l.hidden for w in pinned.warehouses if w.name == "head.linear" for l in w.layers] == [80]  # 1280 / 16


def test_head_option_puts_the_classifier_in_a_warehouse_of_its_own():
    result = plan_of("resnet18", 1, head="warehouse")
    head = result.warehouses[-1]
    assert head.name == "head.linear" and head.layer_names == ("fc",)
    assert head.cell == (1000, cells.divisor_at_most(512, 512 * HEAD_CELL_RATIO[1])) == (1000, 8)
    assert "fc" not in {s.layer for s in result.plain}
    assert plan_of("mobilenet_v2", 0.5, head="plain").plain[-1].layer == "classifier.1"


@pytest.mark.parametrize("pins, message", [
    ({"stem.*": {"budgt": 1}}, "unknown setting"),
    ({"stem.*": {"budget": 0}}, "budget must be a positive"),
    ({"stem.*": {"cell": [1, 2]}}, "cell must be"),
    ({"stem.*": {"static": "yes"}}, "static must be true or false"),
    ({"stem.*": 1}, "dict of settings"),
    ([1], "must map"),
])
def test_bad_pins_are_refused_with_what_is_wrong(pins, message):
    with pytest.raises(ValueError, match=message):
        PlanOptions(warehouses=pins)


def test_pins_come_from_the_command_line_as_json():
    key, value = parse_option('warehouses={"stem.*": {"budget": "1/2", "cell": [1, 0.5]}}')
    assert key == "warehouses" and PlanOptions(warehouses=value).pins("stem.conv2d") == {"budget": 0.5,
                                                                                          "cell": [1.0, 0.5]}
    with pytest.raises(ValueError, match="not valid JSON"):
        parse_option("warehouses={stem: 1}")
