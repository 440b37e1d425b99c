"""Fine-tuning helpers (kwconvert.training): optimiser groups for a converted model."""
import pytest
import torch
import torchvision

import kwconvert
from kwconvert.methods.kernelwarehouse.layers import Warehouse, is_kw_layer
from kwconvert.training import FINE_TUNE, TemperatureScheduler, parameter_groups


def test_groups_hold_every_parameter_once_with_their_own_rates_and_decay():
    torch.manual_seed(0)
    model = kwconvert.convert(torchvision.models.resnet18(weights=None, num_classes=10), 1.0)
    groups = parameter_groups(model, 0.1, weight_decay=5e-4, cell_lr_scale=3.0, attention_lr_scale=0.01)
    seen = [id(p) for group in groups for p in group["params"]]
    assert len(seen) == len(set(seen)) == len(list(model.parameters()))
    cells = {id(m.cells) for m in model.modules() if isinstance(m, Warehouse)}
    attention = {id(p) for m in model.modules() if is_kw_layer(m) for p in m.attention.parameters()}
    for group in groups:
        ids = {id(p) for p in group["params"]}
        expected = {"cells": (cells, 0.3), "attention": (attention, 0.001)}.get(group["kind"])
        if expected:
            assert ids <= expected[0] and abs(group["lr"] - expected[1]) < 1e-12
        else:
            assert not ids & (cells | attention) and group["lr"] == 0.1
        assert group["weight_decay"] == (5e-4 if all(p.dim() >= 2 for p in group["params"]) else 0.0)
        assert all((p.dim() >= 2) == (group["weight_decay"] > 0) for p in group["params"])
    # the held logits (fc2's bias) are never decayed towards zero
    held = {id(m.attention.fc2.bias) for m in model.modules() if is_kw_layer(m)}
    assert all(group["weight_decay"] == 0 for group in groups if {id(p) for p in group["params"]} & held)
    torch.optim.SGD(groups, lr=0.1)  # torch accepts them as they are


def test_defaults_are_the_measured_recipe_and_plain_models_get_one_rate():
    groups = parameter_groups(torchvision.models.resnet18(weights=None), 0.1)
    assert {group["kind"] for group in groups} == {"other"} and all(g["lr"] == 0.1 for g in groups)
    assert FINE_TUNE.temperature == 0.0 and FINE_TUNE.attention_lr_scale <= 1 <= FINE_TUNE.cell_lr_scale
    assert FINE_TUNE.fitted_cell_lr_scale > FINE_TUNE.cell_lr_scale


def test_cells_below_b_1_learn_at_the_fitted_rate_and_an_explicit_rate_holds_for_all():
    """Warehouses below b = 1 (their cells fitted at conversion) get ``fitted_cell_lr_scale``, those
    at b = 1 ``cell_lr_scale`` (README: 10x and 3x measured on the fine-tune benchmark); a
    ``cell_lr_scale`` given alone, as from scratch, is every warehouse's."""
    torch.manual_seed(0)
    model = kwconvert.convert(torchvision.models.resnet18(weights=None, num_classes=10), 0.5,
                              warehouses={"stage4.*": {"budget": 1}})
    budget_of = {id(m.warehouse.cells): m.budget for m in model.modules() if is_kw_layer(m)}
    assert sorted(set(budget_of.values())) == [0.5, 1.0]

    def cell_rates(**scales) -> dict[float, set[float]]:
        rates: dict[float, set[float]] = {}
        for group in parameter_groups(model, 0.1, **scales):
            for p in group["params"]:
                if id(p) in budget_of:
                    assert group["kind"] == "cells"
                    rates.setdefault(budget_of[id(p)], set()).add(round(group["lr"], 12))
        return rates

    assert cell_rates() == {0.5: {round(0.1 * FINE_TUNE.fitted_cell_lr_scale, 12)},
                            1.0: {round(0.1 * FINE_TUNE.cell_lr_scale, 12)}}
    assert cell_rates(cell_lr_scale=1.0) == {0.5: {0.1}, 1.0: {0.1}}
    assert cell_rates(cell_lr_scale=2.0, fitted_cell_lr_scale=5.0) == {0.5: {0.5}, 1.0: {0.2}}
    groups = parameter_groups(model, 0.1)
    seen = [id(p) for group in groups for p in group["params"]]
    assert len(seen) == len(set(seen)) == len(list(model.parameters()))


def taus(model) -> set[float]:
    return {module.tau for module in model.modules() if is_kw_layer(module)}


def test_temperature_scheduler_anneals_per_step_and_resumes_from_its_state(tmp_path):
    model = kwconvert.convert(torchvision.models.resnet18(weights=None, num_classes=10), 1.0, init="random")
    schedule = TemperatureScheduler(model, warmup_steps=4)
    seen = [schedule.tau] + [schedule.step() for _ in range(6)]
    assert seen == [1.0, 0.75, 0.5, 0.25, 0.0, 0.0, 0.0]  # Sec. 3.3: linear, then held at 0
    schedule = TemperatureScheduler(model, warmup_steps=4)
    schedule.step(), schedule.step()
    assert taus(model) == {0.5}
    torch.save(schedule.state_dict(), tmp_path / "t.pt")
    fresh = kwconvert.convert(torchvision.models.resnet18(weights=None, num_classes=10), 1.0, init="random")
    resumed = TemperatureScheduler(fresh, warmup_steps=4)
    assert taus(fresh) == {1.0}
    resumed.load_state_dict(torch.load(tmp_path / "t.pt", weights_only=True))
    assert taus(fresh) == {0.5} and resumed.step() == 0.25 and taus(fresh) == {0.25}
    ranged = TemperatureScheduler(fresh, warmup_steps=2, start=0.8, end=0.2)
    assert [ranged.tau, ranged.step(), ranged.step(), ranged.step()] == pytest.approx([0.8, 0.5, 0.2, 0.2])
    assert TemperatureScheduler(fresh, warmup_steps=0).tau == 0.0


def test_temperature_scheduler_refuses_what_it_cannot_schedule():
    with pytest.raises(ValueError, match="no KW layer: convert it first"):
        TemperatureScheduler(torch.nn.Linear(2, 2), warmup_steps=10)
    model = kwconvert.convert(torchvision.models.resnet18(weights=None, num_classes=10), 1.0)
    with pytest.raises(ValueError, match="warmup_steps and last_step must be >= 0"):
        TemperatureScheduler(model, warmup_steps=-1)
    with pytest.raises(ValueError, match="temperatures in \\[0, 1\\]"):
        TemperatureScheduler(model, warmup_steps=5, start=2.0)
