"""Training a converted model: optimiser groups and the fine-tuning recipe.

Two ways to train a KernelWarehouse model:

* **from scratch** (``convert(..., init="random")``): the paper's recipe, tau annealed from
  1 to 0 over the first tenth of training (Sec. 3.3, :func:`kwconvert.temperature_at`);
* **from a trained model** (``init="preserve"``, the default): every attention starts on
  beta whatever the input and whatever tau (:meth:`kwconvert.layers.KWAttention.hold_beta`),
  so the model starts as the original and nothing needs annealing.  ``FINE_TUNE`` below is
  the recipe measured on the fine-tune benchmark (``benchmarks/finetune.py``, README
  "Fine-tuning a converted model").

:func:`parameter_groups` gives the optimiser groups both use: weight decay on kernels and
projection weights only (the reference implementation's groups), and learning rates of
their own for the cells and the attention.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field

from torch import nn

from .layers import Warehouse, is_kw_layer

__all__ = ["FINE_TUNE", "FineTuneRecipe", "parameter_groups"]


@dataclass(frozen=True)
class FineTuneRecipe:
    """How to fine-tune a model converted with ``init="preserve"`` (README "Fine-tuning a
    converted model" has the measurements behind each default)."""
    temperature: float = field(default=0.0, metadata={
        "help": "tau for the whole fine-tune: the held attention keeps the function at any tau, "
                "and tau = 0 lets it learn from the first step (annealing only delays it)"})
    cell_lr_scale: float = field(default=3.0, metadata={
        "help": "warehouse cells' learning rate / the rest's: they re-learn what a b < 1 fit lost"})
    attention_lr_scale: float = field(default=1.0, metadata={
        "help": "attention's learning rate / the rest's (its held logits already make it learn gently: "
                "layers.HELD_LOGIT_SCALE)"})

    def to_dict(self) -> dict:
        return asdict(self)


#: The recipe measured best on the fine-tune benchmark (``benchmarks/finetune.py``).
FINE_TUNE = FineTuneRecipe()


def parameter_groups(model: nn.Module, lr: float, *, weight_decay: float = 0.0,
                     cell_lr_scale: float = FINE_TUNE.cell_lr_scale,
                     attention_lr_scale: float = FINE_TUNE.attention_lr_scale) -> list[dict]:
    """Optimiser groups for a converted (or any) model, each parameter once.

    The warehouses' cells at ``lr * cell_lr_scale``, the attentions at
    ``lr * attention_lr_scale``, everything else at ``lr``; weight decay only on tensors of
    rank >= 2, as the reference implementation does (decay on the attention's held logits,
    a bias, would pull them away from beta).  Each group names its ``kind`` ("cells",
    "attention", "other"); empty groups are left out.
    """
    cells = {id(module.cells) for module in model.modules() if isinstance(module, Warehouse)}
    attention = {id(p) for module in model.modules() if is_kw_layer(module)
                 for p in module.attention.parameters()}
    scales = {"other": 1.0, "cells": cell_lr_scale, "attention": attention_lr_scale}
    grouped: dict[tuple[str, bool], list[nn.Parameter]] = {}
    for parameter in model.parameters():
        if parameter.requires_grad:
            kind = "cells" if id(parameter) in cells else "attention" if id(parameter) in attention else "other"
            grouped.setdefault((kind, parameter.dim() >= 2), []).append(parameter)
    return [{"params": params, "lr": lr * scales[kind], "weight_decay": weight_decay if decays else 0.0,
             "kind": kind} for (kind, decays), params in grouped.items()]
