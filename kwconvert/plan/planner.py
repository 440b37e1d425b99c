"""Planning: LayerGraph + method + budget + options -> Plan.

:func:`plan` traces the model (unless given a graph), and hands the graph to the method's
planning module (``kwconvert.methods.<method>.planning``: KernelWarehouse's reassigned
stages and warehouses, ODConv's and KernelDNA's per-layer choices); every method returns the
same :class:`~kwconvert.plan.schema.Plan`.  ``module=`` plans one sub-module of a model.
"""
from __future__ import annotations

import dataclasses
from typing import Any

import torch
from torch import nn

from .. import methods
from ..trace import LayerGraph, layer_kind, module_inputs, submodule, trace
from .budget import method_budget
from .schema import Plan, StaticLayer


def plan(model: nn.Module | None, budget: float | str | None = None, example_inputs=None, *,
         model_name: str | None = None, graph: LayerGraph | None = None, module: str | None = None,
         method: str = "kernelwarehouse", **options: Any) -> Plan:
    """Plan the KernelWarehouse conversion of ``model`` at budget ``budget``.

    ``method`` picks another conversion (:mod:`kwconvert.methods`): ``"dynamic_conv"`` is
    ``mode="dynamic_conv"``; ``"odconv"`` plans ODConv layers, ``kernels=n`` of them per
    layer (``budget``, if given, is that n: the authors' "4x"), with the options of
    :class:`kwconvert.methods.odconv.planning.ODConvOptions`; ``"kerneldna"`` plans KernelDNA
    families (no budget), with those of ``KernelDNAOptions``.

    Traces the model (or uses ``graph``) and hands it to the method's planning module;
    KernelWarehouse's (:mod:`kwconvert.methods.kernelwarehouse.planning`) groups the
    Conv/Linear layers into warehouses by the paper's reassigned stages, sizes cells,
    warehouses and attention, and applies the budget guard.  ``options`` are that method's
    options (:class:`~kwconvert.methods.kernelwarehouse.options.PlanOptions` for
    KernelWarehouse).

    ``module="backbone.body"`` plans only that sub-module (see :func:`_plan_module`); the
    plan still names the whole model's layers, so ``convert(model, plan)`` applies it.
    """
    budget = method_budget(methods.check_method(method), budget, options)
    if module:
        return _plan_module(model, budget, example_inputs, module, model_name, graph, dict(options, method=method))
    planning = _planning(method)
    opts = planning.Options.from_kwargs(**options)  # refused before tracing
    if graph is None:
        if model is None:
            raise ValueError("plan() needs a model or a traced graph")
        graph = trace(model, example_inputs)
    name = model_name or (type(model).__name__ if model is not None else "model")
    return planning.plan(graph, model, opts, name, budget)


def check_options(method: str, budget: float | str | None = None, **options: Any) -> Any:
    """The options object a ``method`` plan at ``budget`` is made with (``PlanOptions``,
    ``ODConvOptions``, ``KernelDNAOptions``), or the ValueError :func:`plan` would raise for
    them before tracing anything: a front end's early check."""
    method_budget(methods.check_method(method), budget, options)
    return _planning(method).Options.from_kwargs(**options)


def _planning(method: str):
    """The planning module of ``method``: its ``Options`` and its ``plan``.  Imported when used:
    the method folders import the plan's schema."""
    if method == "odconv":
        from ..methods.odconv import planning
    elif method == "kerneldna":
        from ..methods.kerneldna import planning
    else:
        from ..methods.kernelwarehouse import planning
    return planning


def _plan_module(model: nn.Module | None, budget: float, example_inputs, path: str, model_name: str | None,
                 graph: LayerGraph | None, options: dict[str, Any]) -> Plan:
    """Plan sub-module ``path`` of ``model`` only; every layer outside it stays plain.

    The sub-module is traced on the input it receives in one forward of the whole model
    (``example_inputs`` are the whole model's; :func:`kwconvert.trace.module_inputs`), so
    a detector's backbone sees the normalised, resized batch its transform makes.  The
    budget guard bounds the sub-module against its own parameters; the plan's totals are
    the whole model's, so a converted model holds exactly ``params_converted``.
    """
    if model is None:
        raise ValueError(f"planning module {path} needs the whole model, not only a traced graph")
    inner_model = submodule(model, path)
    if graph is None:
        graph = trace(inner_model, module_inputs(model, path, example_inputs))
    name = model_name or type(model).__name__
    inner = plan(inner_model, budget, graph=graph, model_name=name, **options)
    prefix = f"{path}."
    warehouses = tuple(dataclasses.replace(w, layers=tuple(dataclasses.replace(l, name=prefix + l.name)
                                                           for l in w.layers)) for w in inner.warehouses)
    layers = tuple(dataclasses.replace(l, name=prefix + l.name) for l in inner.layers)
    plain = [StaticLayer(prefix + s.layer, s.reason) for s in inner.plain]
    plain += [StaticLayer(n, f"outside module {path}") for n, m in model.named_modules()
              if layer_kind(m) and not n.startswith(prefix)]
    baseline = sum(p.numel() for p in model.parameters())
    notes = (f"only module {path} is converted ({inner.params_baseline:,} of the model's {baseline:,} "
             "parameters); the budget guard bounds it against its own parameters",) + inner.notes
    if isinstance(example_inputs, torch.Tensor):
        input_size = tuple(example_inputs.shape[1:])
    elif isinstance(example_inputs, (tuple, list)) and len(example_inputs) == 1 \
            and isinstance(example_inputs[0], torch.Tensor):
        input_size = tuple(example_inputs[0].shape[1:])
    else:
        input_size = None
    return dataclasses.replace(
        inner, warehouses=warehouses, layers=layers, plain=tuple(plain), params_baseline=baseline,
        params_converted=baseline - inner.params_baseline + inner.params_converted,
        input_size=input_size, notes=notes, module=path,
        unpacked_attention=tuple(prefix + p for p in inner.unpacked_attention))
