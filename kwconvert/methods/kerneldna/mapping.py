"""A trained model's kernels into KernelDNA's families: the parents, before their children are built.

The children's own fit (their scalings to a fixed parent) is the layer's
(:meth:`~kwconvert.methods.kerneldna.layers._KDNAConvNd.preserve`); a parent fitted with its
children (plan option ``fit_parent``) changes a model layer that is not converted, so the
rewriter asks for it here first.
"""
from __future__ import annotations

import torch
from torch import nn

from ...plan import Plan
from .fitting import fit_family, relative_error
from .layers import FRESH_GATE


def fit_parents(model: nn.Module, plan: Plan, init: str) -> tuple[dict[str, tuple], dict[str, float | None]]:
    """KernelDNA's parents before their children are built: with ``fit_parent`` (plan
    option; absent in older plans, which kept parents exact) each parent's kernel is fitted
    with its children's scalings (:func:`fit_family`) and written into the parent layer.

    Returns the children's fitted scalings by name, and each parent's relative kernel error
    against its trained kernel: 0 when it stays exact, None where nothing is fitted
    (``init="random"`` or ``"none"``, the meta device).  Empty for ODConv (no parents).
    """
    families: dict[str, list[str]] = {}
    for layer in plan.layers:
        if layer.parent is not None:
            families.setdefault(layer.parent, []).append(layer.name)
    scalings, errors = {}, {}
    for parent_name, children in families.items():
        parent = model.get_submodule(parent_name)
        if init != "preserve" or parent.weight.is_meta:
            errors[parent_name] = None
        elif not plan.options.get("fit_parent", False):
            errors[parent_name] = 0.0
        else:
            trained = parent.weight.detach().clone()
            fit = fit_family(trained, [model.get_submodule(child).weight / FRESH_GATE for child in children])
            with torch.no_grad():
                parent.weight.copy_(fit.parent)
            scalings.update(zip(children, fit.scalings))
            errors[parent_name] = relative_error(parent.weight, trained)
    return scalings, errors
