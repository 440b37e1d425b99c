"""Training a converted model: optimiser groups and the fine-tuning recipe.

Two ways to train a KernelWarehouse model:

* **from scratch** (``convert(..., init="random")``): the paper's recipe, tau annealed from
  1 to 0 over the first tenth of training (Sec. 3.3), per iteration by
  :class:`TemperatureScheduler`, which saves and resumes like torch's LR schedulers;
* **from a trained model** (``init="preserve"``, the default): every attention starts on
  beta whatever the input and whatever tau (:meth:`kwconvert.methods.kernelwarehouse.layers.KWAttention.hold_beta`),
  so the model starts as the original and nothing needs annealing.  ``FINE_TUNE`` below is
  the recipe measured on the fine-tune benchmark (``benchmarks/finetune.py``, README
  "Fine-tuning a converted model").

:func:`parameter_groups` gives the optimiser groups both use: weight decay on kernels and
projection weights only (the reference implementation's groups), and learning rates of
their own for the cells and the attention.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from torch import nn

from .methods.kernelwarehouse.layers import Warehouse, is_kw_layer, set_temperature, temperature_at

__all__ = ["FINE_TUNE", "FineTuneRecipe", "TemperatureScheduler", "parameter_groups"]


@dataclass(frozen=True)
class FineTuneRecipe:
    """How to fine-tune a model converted with ``init="preserve"`` (README "Fine-tuning a
    converted model" has the measurements behind each default)."""
    temperature: float = field(default=0.0, metadata={
        "help": "tau for the whole fine-tune: the held attention keeps the function at any tau, "
                "and tau = 0 lets it learn from the first step (annealing only delays it)"})
    cell_lr_scale: float = field(default=3.0, metadata={
        "help": "learning rate of the cells of a warehouse at b >= 1 / the rest's (10x cost KW 1x 0.1-0.4 point)"})
    fitted_cell_lr_scale: float = field(default=10.0, metadata={
        "help": "learning rate of the cells of a warehouse below b = 1 / the rest's: they re-learn what "
                "the conversion's fit lost (10x gained KW 1/2x 0.04-0.64 point over 3x, more the longer "
                "the fine-tune)"})
    attention_lr_scale: float = field(default=1.0, metadata={
        "help": "attention's learning rate / the rest's (its held logits already make it learn gently: "
                "layers.HELD_LOGIT_SCALE)"})

    def to_dict(self) -> dict:
        return asdict(self)


#: The recipe measured best on the fine-tune benchmark (``benchmarks/finetune.py``).
FINE_TUNE = FineTuneRecipe()


def parameter_groups(model: nn.Module, lr: float, *, weight_decay: float = 0.0,
                     cell_lr_scale: float | None = None, fitted_cell_lr_scale: float | None = None,
                     attention_lr_scale: float = FINE_TUNE.attention_lr_scale) -> list[dict]:
    """Optimiser groups for a converted (or any) model, each parameter once.

    The cells of warehouses at b >= 1 at ``lr * cell_lr_scale``, of warehouses below b = 1 at
    ``lr * fitted_cell_lr_scale``, the attentions at ``lr * attention_lr_scale``, everything
    else at ``lr``; weight decay only on tensors of rank >= 2, as the reference implementation
    does (decay on the attention's held logits, a bias, would pull them away from beta).  Left
    out, the scales are ``FINE_TUNE``'s; a ``cell_lr_scale`` given alone holds for every
    warehouse (from scratch: 1).  Each group names its ``kind`` ("cells", "attention", "other";
    the cells of both kinds of warehouse are "cells"); empty groups are left out.
    """
    if fitted_cell_lr_scale is None:
        fitted_cell_lr_scale = FINE_TUNE.fitted_cell_lr_scale if cell_lr_scale is None else cell_lr_scale
    if cell_lr_scale is None:
        cell_lr_scale = FINE_TUNE.cell_lr_scale
    cells = {id(module.cells) for module in model.modules() if isinstance(module, Warehouse)}
    fitted = {id(module.warehouse.cells) for module in model.modules() if is_kw_layer(module) and module.budget < 1}
    attention = {id(p) for module in model.modules() if is_kw_layer(module)
                 for p in module.attention.parameters()}

    def kind_and_scale(parameter: nn.Parameter) -> tuple[str, float]:
        if id(parameter) in cells:
            return "cells", fitted_cell_lr_scale if id(parameter) in fitted else cell_lr_scale
        return ("attention", attention_lr_scale) if id(parameter) in attention else ("other", 1.0)

    grouped: dict[tuple[str, float, bool], list[nn.Parameter]] = {}
    for parameter in model.parameters():
        if parameter.requires_grad:
            grouped.setdefault((*kind_and_scale(parameter), parameter.dim() >= 2), []).append(parameter)
    return [{"params": params, "lr": lr * scale, "weight_decay": weight_decay if decays else 0.0,
             "kind": kind} for (kind, scale, decays), params in grouped.items()]


class TemperatureScheduler:
    """The paper's temperature schedule (Sec. 3.3), stepped once per iteration like torch's LR
    schedulers: tau goes linearly from ``start`` to ``end`` over ``warmup_steps`` calls of
    :meth:`step`, then stays at ``end``.

    The paper anneals over the first 10 % of training (``warmup_steps = total_steps // 10``).
    Construction sets every KW layer of ``model`` to the tau of ``last_step``; ``state_dict``
    / ``load_state_dict`` carry the position, so a resumed run continues the schedule where
    the checkpoint left it instead of restarting at tau = 1.
    """

    def __init__(self, model: nn.Module, warmup_steps: int, *, start: float = 1.0, end: float = 0.0,
                 last_step: int = 0) -> None:
        if warmup_steps < 0 or last_step < 0:
            raise ValueError(f"warmup_steps and last_step must be >= 0, got {warmup_steps} and {last_step}")
        if not (0.0 <= start <= 1.0 and 0.0 <= end <= 1.0):
            raise ValueError(f"start and end are temperatures in [0, 1], got {start} and {end}")
        self.model = model
        self.warmup_steps, self.start, self.end, self.last_step = warmup_steps, start, end, last_step
        if set_temperature(model, self.tau) == 0:
            raise ValueError("the model has no KW layer: convert it first (kwconvert.convert)")

    @property
    def tau(self) -> float:
        """The temperature at ``last_step``."""
        return self.end + (self.start - self.end) * temperature_at(self.last_step, self.warmup_steps)

    def step(self) -> float:
        """Advance one iteration and set the model's layers to the new tau (returned)."""
        self.last_step += 1
        set_temperature(self.model, self.tau)
        return self.tau

    def state_dict(self) -> dict[str, Any]:
        return {"warmup_steps": self.warmup_steps, "start": self.start, "end": self.end,
                "last_step": self.last_step}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue the schedule a ``state_dict`` recorded (and set the layers' tau to it)."""
        self.warmup_steps, self.start, self.end = state["warmup_steps"], state["start"], state["end"]
        self.last_step = state["last_step"]
        set_temperature(self.model, self.tau)
