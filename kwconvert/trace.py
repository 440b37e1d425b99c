"""Tracer: model + example input -> LayerGraph (candidates, shapes, residual structure).

KernelWarehouse (Li & Yao, ICML 2024, arXiv 2308.08361) converts the convolutional and
linear layers of a network and lets the layers of one (reassigned) stage share a warehouse.
To find those stages the planner needs more than a module list: which layer feeds which,
where the residual adds are, and the shape every layer sees.  This module records that
once, in a :class:`LayerGraph` every later step queries (in the spirit of Torch-Pruning's
``DependencyGraph``).

The graph comes from ``torch.fx.symbolic_trace`` plus fx's own ``ShapeProp`` on one
example input.  Where fx cannot trace a model (data-dependent control flow, fx errors) the
tracer falls back to forward hooks on one real forward: candidates and shapes are still
exact, but the dataflow is assumed to be a chain in execution order and the graph's
``notes`` say so.
"""
from __future__ import annotations

import contextlib
import dataclasses
import io
import math
import operator
import warnings
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any, Iterable, Sequence

import networkx as nx
import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn
from torch.fx.passes.shape_prop import ShapeProp, TensorMetadata

try:  # the fake mode ShapeProp's ``fake_mode`` argument takes lives in a private module of torch:
    from torch._subclasses.fake_tensor import FakeTensorMode  # a speed-up only, never relied on
except ImportError:
    FakeTensorMode = None

from .multihead import unpacked_attention

__all__ = ["Candidate", "ResidualBlock", "LayerGraph", "trace", "layer_kind", "default_example_inputs",
           "module_inputs", "UnknownModuleError"]

#: Candidate layer types, most specific first (isinstance, so subclasses count).
_KIND_OF_TYPE: tuple[tuple[type[nn.Module], str], ...] = (
    (nn.Conv1d, "conv1d"), (nn.Conv2d, "conv2d"), (nn.Conv3d, "conv3d"), (nn.Linear, "linear"))

#: fx targets that add two tensors (``x + y``, ``x += y``, ``torch.add``, ``x.add(y)``).
_ADD_FUNCTIONS = (operator.add, operator.iadd, torch.add)
_ADD_METHODS = ("add", "add_")
#: fx targets that multiply two tensors: with two input-dependent operands, an attention.
_PRODUCT_FUNCTIONS = (operator.matmul, torch.matmul, torch.bmm, torch.einsum, torch.baddbmm)
_PRODUCT_METHODS = ("matmul", "bmm")

#: Default example input: one 3 x 224 x 224 image (ImageNet classification).
DEFAULT_INPUT_SIZE = (1, 3, 224, 224)


def layer_kind(module: nn.Module) -> str | None:
    """"conv1d" / "conv2d" / "conv3d" / "linear" for a candidate layer, else None."""
    for module_type, kind in _KIND_OF_TYPE:
        if isinstance(module, module_type):
            return kind
    return None


@dataclass(frozen=True)
class Candidate:
    """One Conv/Linear layer the method could convert, as seen on the example input.

    ``weight_shape`` is ``(C_out, C_in/groups, *kernel)`` (Linear: ``(out, in)``);
    ``order`` is the execution-order index; ``calls`` counts the places the module is
    called from (the graph records its first call).  ``out_layout`` is the shape the
    output is reshaped to when a reshape/view is its only reader (a ViT's fused qkv:
    ``(B, N, 3, heads, head_dim)``), else None.  ``rows`` is set by the planner on the
    part of a layer it converts alone: output rows ``[start, stop)`` (the value rows of a
    fused qkv); ``weight_shape`` is then that part's.  ``custom_forward`` names the class
    of a subclass that overrides torch's forward (timm's ``Conv2dSame``, ``StdConv2d``);
    ``weight_read`` is True when the model reads the layer's weight outside its forward
    (``x.to(self.proj.weight.dtype)``); ``extra_params`` counts the layer's own parameters
    besides weight and bias (the gain of timm's ``ScaledStdConv2d``).
    """
    name: str
    kind: str
    weight_shape: tuple[int, ...]
    in_channels: int
    groups: int
    input_shape: tuple[int, ...] | None
    output_shape: tuple[int, ...] | None
    order: int
    calls: int = 1
    out_layout: tuple[int, ...] | None = None
    rows: tuple[int, int] | None = None
    custom_forward: str | None = None
    weight_read: bool = False
    extra_params: int = 0

    @property
    def out_channels(self) -> int:
        return self.weight_shape[0]

    @property
    def kernel_size(self) -> tuple[int, ...]:
        return self.weight_shape[2:]

    @property
    def weight_numel(self) -> int:
        return math.prod(self.weight_shape)

    @property
    def positions(self) -> int | None:
        """Output positions per sample over all its calls (a conv's output map, a Linear's
        tokens), from the first call's shape; None when the layer's output was not seen."""
        if self.output_shape is None:
            return None
        per_call = self.output_shape[1:-1] if self.kind == "linear" else self.output_shape[2:]
        return math.prod(per_call) * self.calls

    @property
    def macs(self) -> int | None:
        """Multiply-adds per sample (grouped: ``weight_shape`` already holds C_in / groups)."""
        return None if self.positions is None else self.weight_numel * self.positions

    @property
    def is_conv(self) -> bool:
        return self.kind != "linear"

    @property
    def depthwise(self) -> bool:
        """One input channel per group (groups = channels): paper's depthwise convs."""
        return self.is_conv and self.groups > 1 and self.weight_shape[1] == 1

    @property
    def grouped(self) -> bool:
        """Grouped but not depthwise (ResNeXt, RegNet): C_in/groups is a fraction of C_in."""
        return self.is_conv and self.groups > 1 and not self.depthwise

    @property
    def pointwise(self) -> bool:
        return self.is_conv and all(k == 1 for k in self.kernel_size)

    @property
    def input_spatial(self) -> tuple[int, ...] | None:
        """Spatial size of the input (convs: dims after the channel dim), None if unknown."""
        if self.input_shape is None or not self.is_conv:
            return None
        return self.input_shape[2:]


@dataclass(frozen=True)
class ResidualBlock:
    """A residual add, the latest common ancestor of its operands, and the layers between.

    ``add`` and ``fork`` are node ids of :attr:`LayerGraph.dataflow`; ``members`` are the
    candidates between fork and add in execution order (a layer may lie in several
    blocks; the planner gives it to the first).  ``attention`` is True when an attention
    product (scaled dot-product attention, or a matmul of two input-dependent tensors)
    lies between fork and add: a transformer's token mixer.
    """
    add: str
    fork: str
    members: tuple[str, ...]
    shape: tuple[int, ...]
    order: int
    attention: bool = False


@dataclass(frozen=True, eq=False)
class LayerGraph:
    """The central object of planning: candidates, shapes and the dataflow between them.

    ``dataflow`` is a networkx DiGraph over the traced fx nodes (node attributes
    ``role`` in {"input", "candidate", "add", "pass", "other", "const", "output"},
    ``order``, ``shape``, ``candidate``); ``flow`` condenses it to the candidates, the
    residual adds, the inputs and the output, with an edge wherever data moves between
    them without passing another one.  ``traced_with`` is "fx" or "hooks"; with hooks the
    dataflow is a chain in execution order and ``notes`` say what was lost.
    ``unpacked_attention`` lists the nn.MultiheadAttention modules traced unpacked
    (:mod:`kwconvert.multihead`): their layers ``PATH.q_proj`` ... exist only once unpacked.
    """
    candidates: tuple[Candidate, ...]
    dataflow: nx.DiGraph
    input_shapes: tuple[tuple[int, ...], ...]
    params_baseline: int
    norm_types: frozenset[str]
    traced_with: str = "fx"
    unused: tuple[tuple[str, str], ...] = ()
    notes: tuple[str, ...] = ()
    node_of: dict[str, str] = field(default_factory=dict)
    unpacked_attention: tuple[str, ...] = ()

    @property
    def input_size(self) -> tuple[int, ...] | None:
        """The traced input's size without the batch (None for several inputs): what a plan
        states its costs at."""
        return self.input_shapes[0][1:] if len(self.input_shapes) == 1 else None

    def static_order(self, reasons: dict[str, str]) -> list[tuple[str, str]]:
        """(layer, reason) pairs in execution order (layers the trace did not see last, by name)."""
        order = {c.name: c.order for c in self.candidates}
        return sorted(reasons.items(), key=lambda kv: (order.get(kv[0], len(order)), kv[0]))

    # --- candidates -------------------------------------------------------------------
    @cached_property
    def _by_name(self) -> dict[str, Candidate]:
        return {c.name: c for c in self.candidates}

    def candidate(self, name: str) -> Candidate:
        try:
            return self._by_name[name]
        except KeyError:
            raise KeyError(f"{name!r} is not a traced candidate layer") from None

    def __contains__(self, name: object) -> bool:
        return name in self._by_name

    @property
    def exact(self) -> bool:
        """True when the dataflow was traced (fx), False for the hook fallback's chain."""
        return self.traced_with == "fx"

    @cached_property
    def residual_blocks(self) -> tuple[ResidualBlock, ...]:
        """Residual adds in execution order (none for the hook fallback's chain)."""
        return _residual_blocks(self) if self.exact else ()

    # --- condensed dataflow -----------------------------------------------------------
    @cached_property
    def flow(self) -> nx.DiGraph:
        """Candidates, residual adds, inputs and output, linked by direct dataflow."""
        return _condense(self.dataflow)

    @cached_property
    def _flow_order(self) -> dict[str, int]:
        return {node: data["order"] for node, data in self.flow.nodes(data=True)}

    def upstream_candidates(self, name: str) -> tuple[str, ...]:
        """Nearest candidates whose output reaches ``name``'s input (through adds too)."""
        # Keep only the edges into ``name`` and into adds: walking back then stops at the
        # first candidate on every path.
        view = nx.subgraph_view(self.flow, filter_edge=lambda u, v: v == name or self._is_add(v))
        return self._candidates_in(nx.ancestors(view, name))

    def downstream_candidates(self, name: str) -> tuple[str, ...]:
        """Nearest candidates that read ``name``'s output (through adds too)."""
        view = nx.subgraph_view(self.flow, filter_edge=lambda u, v: u == name or self._is_add(u))
        return self._candidates_in(nx.descendants(view, name))

    def direct_inputs(self, name: str) -> tuple[str, ...]:
        """Flow nodes feeding ``name`` with nothing but pass-through ops in between."""
        return tuple(sorted(self.flow.predecessors(name), key=self._flow_order.__getitem__))

    def _is_add(self, node: str) -> bool:
        return self.flow.nodes[node]["role"] == "add"

    def _candidates_in(self, nodes: Iterable[str]) -> tuple[str, ...]:
        found = [n for n in nodes if self.flow.nodes[n]["role"] == "candidate"]
        return tuple(sorted(found, key=self._flow_order.__getitem__))

    @cached_property
    def stems(self) -> tuple[str, ...]:
        """Candidates with no candidate upstream (the paper's "first conv")."""
        downstream: set[str] = set()
        for cand in self.candidates:  # execution order: a later one's descendants are covered
            if cand.name not in downstream:
                downstream |= nx.descendants(self.flow, cand.name)
        return tuple(c.name for c in self.candidates if c.name not in downstream)

    def direct_outputs(self, name: str) -> tuple[str, ...]:
        """Flow nodes reading ``name``'s output with nothing but pass-through ops between."""
        return tuple(sorted(self.flow.successors(name), key=self._flow_order.__getitem__))

    def feeds_depthwise(self, name: str) -> bool:
        """True when a depthwise conv reads this layer's output directly (no add between)."""
        return any(self.flow.nodes[d]["role"] == "candidate" and self.candidate(d).depthwise
                   for d in self.direct_outputs(name))

    def adds_upstream(self, name: str) -> tuple[str, ...]:
        """Residual adds upstream of a candidate, latest first."""
        adds = [n for n in nx.ancestors(self.flow, name) if self.flow.nodes[n]["role"] == "add"]
        return tuple(sorted(adds, key=self._flow_order.__getitem__, reverse=True))

    # --- pass-through walk --------------------------------------------------------------
    def source(self, node: str) -> str:
        """Walk back from dataflow node ``node`` through pass-through ops (norms, ...)."""
        while self.dataflow.nodes[node]["role"] == "pass":
            node = self.dataflow.nodes[node]["source_input"]
        return node

    def input_source(self, name: str) -> str | None:
        """``source`` of the tensor a candidate reads (None for the hook fallback)."""
        node = self.node_of.get(name)
        if node is None:
            return None
        first = self.dataflow.nodes[node].get("source_input")
        return self.source(first) if first is not None else None

    # --- stages without dataflow ----------------------------------------------------------
    def resolution_stages(self) -> dict[str, int]:
        """Stage index per candidate: the order in which its input resolution first appears.

        Used when the residual structure is unknown (hook fallback).  A layer reading a
        resolution seen before (ResNet's shortcut projection, run after the block's strided
        conv) joins that resolution's stage, which also hands strided layers to the stage
        they read from, as the paper's reassignment does.  Layers without a spatial input
        (Linear) stay in the stage of the layer before them.
        """
        index_of: dict[tuple[int, ...], int] = {}
        stages, stage = {}, 0
        for cand in self.candidates:
            if cand.input_spatial is not None:
                stage = index_of.setdefault(cand.input_spatial, len(index_of))
            stages[cand.name] = stage
        return stages

    def summary(self) -> str:
        return (f"{len(self.candidates)} candidate layers, {len(self.residual_blocks)} residual adds, "
                f"traced with {self.traced_with}")


# ---------------------------------------------------------------------------------------
# trace()
# ---------------------------------------------------------------------------------------
def default_example_inputs(model: nn.Module) -> tuple[torch.Tensor, ...]:
    """One image at the model's own size when it declares one (timm's ``pretrained_cfg``
    / ``default_cfg``), else 3 x 224 x 224, on the model's device and dtype."""
    size = DEFAULT_INPUT_SIZE
    for attr in ("pretrained_cfg", "default_cfg"):
        cfg = getattr(model, attr, None)
        if isinstance(cfg, dict) and cfg.get("input_size"):
            size = (1, *cfg["input_size"])
            break
    param = next(model.parameters(), None)
    device = param.device if param is not None else None
    dtype = param.dtype if param is not None and param.is_floating_point() else None
    return (torch.randn(size, device=device, dtype=dtype),)


def trace(model: nn.Module, example_inputs: torch.Tensor | Sequence[torch.Tensor] | None = None) -> LayerGraph:
    """Trace ``model`` on ``example_inputs`` (default: :func:`default_example_inputs`).

    Runs in eval mode under ``no_grad`` and restores the model's training flag.  Raises
    ValueError when the model has no Conv/Linear layer, or when it rejects the input.
    """
    inputs = _as_tuple(example_inputs) if example_inputs is not None else default_example_inputs(model)
    if layer_kind(model):
        raise ValueError(f"the model is itself one {type(model).__name__}: wrap it in a container "
                         "(e.g. nn.Sequential) so that the layer can be swapped")
    was_training = model.training
    model.eval()
    try:
        # nn.MultiheadAttention uses its projections as tensors: unpacked, they are layers.
        with torch.no_grad(), unpacked_attention(model) as unpacked:
            named = [(name, module) for name, module in model.named_modules() if layer_kind(module)]
            if not named:
                raise ValueError(f"{type(model).__name__} has no Conv1d/Conv2d/Conv3d/Linear layer to convert")
            graph = _trace_fx(model, inputs, named)
    finally:
        model.train(was_training)
    if unpacked:
        note = (f"{len(unpacked)} nn.MultiheadAttention module(s) are unpacked into q/k/v/out Linear layers "
                f"({unpacked[0]}{', ...' if len(unpacked) > 1 else ''}); converting rebuilds them that way")
        graph = dataclasses.replace(graph, unpacked_attention=unpacked, notes=graph.notes + (note,))
    return graph


class _Recorded(Exception):
    """Raised by the pre-hook of :func:`module_inputs` to stop the forward once it has the input."""


def module_inputs(model: nn.Module, path: str, example_inputs: Any = None) -> tuple[torch.Tensor, ...]:
    """The tensors sub-module ``path`` receives in one forward of the whole ``model``.

    A detection or segmentation model hands its backbone a tensor it builds itself
    (normalised, resized, batched), so the backbone is traced on what a forward pre-hook
    records at its first call, not on a guess.  The rest of the forward is skipped once
    the input is recorded.  ``example_inputs`` are the whole model's positional arguments
    (a tensor, or a tuple of anything the model takes; default: one image).
    """
    target = submodule(model, path)
    if example_inputs is None:
        inputs = default_example_inputs(model)
    else:
        inputs = example_inputs if isinstance(example_inputs, (tuple, list)) else (example_inputs,)
    recorded: list[tuple[tuple, dict]] = []

    def record(module, args, kwargs):
        recorded.append((args, kwargs))
        raise _Recorded()

    handle = target.register_forward_pre_hook(record, with_kwargs=True)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            model(*inputs)
    except _Recorded:
        pass
    except Exception as err:
        raise ValueError(f"the model rejected its example input while kwconvert recorded the input of "
                         f"{path} ({_one_line(err)}); pass another input size or example_inputs") from None
    finally:
        handle.remove()
        model.train(was_training)
    if not recorded:
        raise ValueError(f"sub-module {path} ({type(target).__name__}) is not called in the model's forward "
                         "on the example input, so it cannot be traced")
    args, kwargs = recorded[0]
    if kwargs or not args or not all(isinstance(a, torch.Tensor) for a in args):
        received = [type(a).__name__ for a in args] + [f"{k}={type(v).__name__}" for k, v in kwargs.items()]
        raise ValueError(f"sub-module {path} is called with ({', '.join(received)}); kwconvert traces "
                         "modules called with positional tensors only")
    return tuple(a.detach() for a in args)


class UnknownModuleError(ValueError):
    """A sub-module path (``module=``, ``--module``) the model does not have: a usage error."""


def submodule(model: nn.Module, path: str) -> nn.Module:
    """``model.get_submodule(path)``, or an UnknownModuleError naming the nearest valid paths."""
    import difflib
    try:
        return model.get_submodule(path)
    except AttributeError:
        names = [name for name, _ in model.named_modules() if name]
        close = difflib.get_close_matches(path, names, n=3, cutoff=0.6)
        hint = f"; did you mean {', '.join(close)}?" if close else ""
        raise UnknownModuleError(f"the model ({type(model).__name__}) has no sub-module '{path}'{hint}") from None


def _as_tuple(inputs: torch.Tensor | Sequence[torch.Tensor]) -> tuple[torch.Tensor, ...]:
    if isinstance(inputs, torch.Tensor):
        return (inputs,)
    inputs = tuple(inputs)
    if not inputs or not all(isinstance(t, torch.Tensor) for t in inputs):
        raise ValueError("example_inputs must be a tensor or a non-empty tuple of tensors")
    return inputs


def _input_sizes(inputs: tuple[torch.Tensor, ...]) -> str:
    return ", ".join("x".join(map(str, t.shape)) for t in inputs)


def _one_line(err: BaseException) -> str:
    text = " ".join(str(err).split())
    return f"{type(err).__name__}: {text[:300]}"


def _rejected(inputs: tuple[torch.Tensor, ...], err: BaseException) -> ValueError:
    return ValueError(f"the model rejected an example input of size {_input_sizes(inputs)} "
                      f"({_one_line(err)}); pass another input size or example_inputs")


class _CandidateLeafTracer(fx.Tracer):
    """fx's tracer, but every candidate (Conv/Linear subclasses too) is one leaf node."""

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        return layer_kind(m) is not None or super().is_leaf_module(m, module_qualified_name)


def _trace_fx(model: nn.Module, inputs: tuple[torch.Tensor, ...],
              named: list[tuple[str, nn.Module]]) -> LayerGraph:
    tracer = _CandidateLeafTracer()
    try:
        graph = tracer.trace(model)
        module = fx.GraphModule(tracer.root, graph)
    except Exception as err:  # fx raises many types (TraceError, TypeError, ...)
        return _trace_hooks(model, inputs, named, f"fx could not trace the model ({_one_line(err)})")
    if not _propagate_shapes(module, inputs):
        try:
            with contextlib.redirect_stderr(io.StringIO()):  # ShapeProp prints its tracebacks
                ShapeProp(module).propagate(*inputs)
        except Exception as err:
            try:
                model(*inputs)
            except Exception as model_err:
                raise _rejected(inputs, model_err) from None
            return _trace_hooks(model, inputs, named,
                                f"the fx graph failed on the example input ({_one_line(err)})")
    return _graph_from_fx(model, module.graph, inputs, named)


def _propagate_shapes(module: fx.GraphModule, inputs: tuple[torch.Tensor, ...]) -> bool:
    """ShapeProp on fake tensors: shapes without the arithmetic (vit_h_14: 0.3 s, not 3 s).

    Returns False when fake propagation fails (an op without a fake kernel, a module that
    cannot be copied) or this torch has no FakeTensorMode where we look for it; the caller
    then propagates real tensors (public ShapeProp alone).
    """
    if FakeTensorMode is None:
        return False
    try:
        with warnings.catch_warnings(), contextlib.redirect_stderr(io.StringIO()):
            warnings.simplefilter("ignore")
            ShapeProp(module, fake_mode=FakeTensorMode(allow_non_fake_inputs=True)).propagate(*inputs)
        return True
    except Exception:
        for node in module.graph.nodes:
            node.meta.pop("tensor_meta", None)
        return False


# --- fx path ------------------------------------------------------------------------------
def _shape_of(node: fx.Node) -> tuple[int, ...] | None:
    meta = node.meta.get("tensor_meta")
    return tuple(meta.shape) if isinstance(meta, TensorMetadata) else None


def _graph_from_fx(model: nn.Module, graph: fx.Graph, inputs: tuple[torch.Tensor, ...],
                   named: list[tuple[str, nn.Module]]) -> LayerGraph:
    modules = dict(named)
    attention_modules = {name for name, m in model.named_modules() if isinstance(m, nn.MultiheadAttention)}
    dataflow, calls, constant_only = _dataflow(graph, modules, attention_modules)
    attributes = {node.target for node in graph.nodes if node.op == "get_attr"}
    candidates, notes, node_of = [], [], {}
    for name, nodes_called in sorted(calls.items(), key=lambda item: dataflow.nodes[item[1][0].name]["order"]):
        first = nodes_called[0]
        tensor_arg = dataflow.nodes[first.name]["source_input"]
        candidates.append(_candidate(name, modules[name], len(candidates),
                                     dataflow.nodes[tensor_arg]["shape"] if tensor_arg else None,
                                     _shape_of(first), len(nodes_called), _out_layout(first),
                                     weight_read=f"{name}.weight" in attributes))
        node_of[name] = first.name
        if len(nodes_called) > 1:
            notes.append(f"{name} is called at {len(nodes_called)} places; it is recorded once, "
                         "at its first call, and its other calls do not shape the grouping")
    if not candidates:
        raise ValueError(f"{type(model).__name__} calls none of its Conv/Linear layers in its traced forward")
    return LayerGraph(
        candidates=tuple(candidates), dataflow=dataflow,
        input_shapes=tuple(tuple(t.shape) for t in inputs), params_baseline=_count_params(model),
        norm_types=_norm_types(model), traced_with="fx",
        unused=_unused(model, named, calls.keys(), graph, constant_only - calls.keys()),
        notes=tuple(notes), node_of=node_of)


def _dataflow(graph: fx.Graph, modules: dict[str, nn.Module], attention_modules: set[str] = frozenset()):
    """The fx graph as a networkx DiGraph with roles, and the calls of each candidate.

    Returns ``(dataflow, calls, constant_only)``: ``calls`` maps a candidate to its call
    nodes on input-dependent tensors, ``constant_only`` names candidates only ever called
    on parameters or buffers (Swin V2's relative-position MLP).
    """
    nodes = list(graph.nodes)
    dataflow = nx.DiGraph()
    dependent: set[fx.Node] = set()  # nodes whose value depends on a model input
    calls: dict[str, list[fx.Node]] = {}
    constant_only: set[str] = set()  # candidates called on parameters/buffers only
    for order, node in enumerate(nodes):
        # Sizes read off a tensor (x.shape, x.size()) are not dataflow: only tensor-valued
        # inputs make a node depend on the model input or link it in the graph.
        tensor_inputs = [a for a in node.all_input_nodes if a in dependent]
        if node.op == "placeholder" or (tensor_inputs and "tensor_meta" in node.meta):
            dependent.add(node)
        is_candidate = node.op == "call_module" and node.target in modules
        if is_candidate and node in dependent:
            calls.setdefault(node.target, []).append(node)
        elif is_candidate:
            constant_only.add(node.target)
            is_candidate = False
        role = _role(node, tensor_inputs, is_candidate and len(calls[node.target]) == 1, dependent)
        dataflow.add_node(node.name, role=role, order=order, shape=_shape_of(node),
                          candidate=node.target if role == "candidate" else None,
                          source_input=tensor_inputs[0].name if tensor_inputs else None,
                          attention=_is_attention(node, tensor_inputs)
                          or (node.op == "call_module" and node.target in attention_modules))
        dataflow.add_edges_from((a.name, node.name) for a in node.all_input_nodes if "tensor_meta" in a.meta)
    return dataflow, calls, constant_only


def _role(node: fx.Node, tensor_inputs: list[fx.Node], is_candidate: bool, dependent: set[fx.Node]) -> str:
    if node.op == "placeholder":
        return "input"
    if node.op == "output":
        return "output"
    if node not in dependent:
        return "const"
    if is_candidate:
        return "candidate"
    if _is_residual_add(node, tensor_inputs):
        return "add"
    return "pass" if len(tensor_inputs) == 1 else "other"


def _is_attention(node: fx.Node, tensor_inputs: list[fx.Node]) -> bool:
    """Scaled dot-product attention, or a product of two input-dependent tensors (q @ k^T)."""
    if node.op == "call_function" and node.target is F.scaled_dot_product_attention:
        return True
    is_product = ((node.op == "call_function" and node.target in _PRODUCT_FUNCTIONS)
                  or (node.op == "call_method" and node.target in _PRODUCT_METHODS))
    return is_product and len(tensor_inputs) >= 2


def _out_layout(node: fx.Node) -> tuple[int, ...] | None:
    """The shape a candidate's output is reshaped to, when a reshape/view is its only reader."""
    users = list(node.users)
    if len(users) != 1:
        return None
    user = users[0]
    if (user.op == "call_method" and user.target in ("reshape", "view", "unflatten")) or (
            user.op == "call_function" and user.target in (torch.reshape, torch.unflatten)):
        return _shape_of(user)
    return None


def _is_residual_add(node: fx.Node, tensor_inputs: list[fx.Node]) -> bool:
    """Spec rule 3: an add of two input-dependent tensors of one shape."""
    is_add = ((node.op == "call_function" and node.target in _ADD_FUNCTIONS)
              or (node.op == "call_method" and node.target in _ADD_METHODS))
    if not is_add or len(tensor_inputs) != 2:
        return False
    shapes = {_shape_of(a) for a in tensor_inputs} | {_shape_of(node)}
    return len(shapes) == 1 and None not in shapes


def _residual_blocks(graph: LayerGraph) -> tuple[ResidualBlock, ...]:
    """Every residual add with its fork (latest common ancestor) and the layers between."""
    dataflow, flow = graph.dataflow, graph.flow
    blocks = []
    for add, data in flow.nodes(data=True):
        if data["role"] != "add":
            continue
        left, right = (a for a in dataflow.predecessors(add) if dataflow.nodes[a]["role"] != "const")
        common = {n for n in (nx.ancestors(dataflow, left) | {left}) & (nx.ancestors(dataflow, right) | {right})
                  if dataflow.nodes[n]["role"] != "const"}
        if not common:
            continue  # two independent inputs meet: a merge, not a residual
        fork = max(common, key=lambda n: dataflow.nodes[n]["order"])
        between = nx.descendants(dataflow, fork) & nx.ancestors(dataflow, add)
        members = tuple(sorted((dataflow.nodes[n]["candidate"] for n in between
                                if dataflow.nodes[n]["role"] == "candidate"),
                               key=lambda name: graph.candidate(name).order))
        attention = any(dataflow.nodes[n].get("attention") for n in between)
        blocks.append(ResidualBlock(add=add, fork=fork, members=members, shape=data["shape"],
                                    order=dataflow.nodes[add]["order"], attention=attention))
    return tuple(sorted(blocks, key=lambda b: b.order))


def _condense(dataflow: nx.DiGraph) -> nx.DiGraph:
    """Keep the candidates, adds, inputs and output; link each to its nearest kept sources."""
    kept_roles = {"candidate", "add", "input", "output"}
    flow = nx.DiGraph()
    sources: dict[str, frozenset[str]] = {}
    for node in nx.topological_sort(dataflow):
        data = dataflow.nodes[node]
        upstream = frozenset().union(*(sources[p] for p in dataflow.predecessors(node)))
        if data["role"] in kept_roles:
            key = data["candidate"] or node
            flow.add_node(key, role=data["role"], order=data["order"], shape=data["shape"], node=node)
            flow.add_edges_from((src, key) for src in upstream)
            sources[node] = frozenset((key,))
        else:
            sources[node] = upstream
    return flow


def _unused(model: nn.Module, named: list[tuple[str, nn.Module]], called: Iterable[str],
            graph: fx.Graph | None, constant_only: Iterable[str] = ()) -> tuple[tuple[str, str], ...]:
    """Candidates never called as a layer on the input, with why."""
    called, constant_only = set(called), set(constant_only)
    leaves = {n.target for n in graph.nodes if n.op == "call_module"} if graph is not None else set()
    attributes = {n.target for n in graph.nodes if n.op == "get_attr"} if graph is not None else set()
    unused = []
    for name, _ in named:
        if name in called:
            continue
        if name in constant_only:
            unused.append((name, "reads only parameters and buffers, never the model input"))
            continue
        if f"{name}.weight" in attributes:
            unused.append((name, "its weight is used by a function, the layer itself is never called"))
            continue
        parts = name.split(".")
        leaf = next((".".join(parts[:i]) for i in range(len(parts) - 1, 0, -1)
                     if ".".join(parts[:i]) in leaves), None)
        if leaf is not None:
            kind = type(model.get_submodule(leaf)).__name__
            unused.append((name, f"inside {kind} {leaf}, which uses its weight without calling it"))
        else:
            unused.append((name, "not called on the example input"))
    return tuple(unused)


def _candidate(name: str, module: nn.Module, order: int, input_shape, output_shape, calls: int,
               out_layout: tuple[int, ...] | None = None, weight_read: bool = False) -> Candidate:
    kind = layer_kind(module)
    weight = getattr(module, "weight", None)
    if kind == "linear":
        shape = tuple(weight.shape) if weight is not None else (module.out_features, module.in_features)
        in_channels, groups = module.in_features, 1
    else:
        shape = tuple(weight.shape) if weight is not None else (
            module.out_channels, module.in_channels // module.groups, *module.kernel_size)
        in_channels, groups = module.in_channels, module.groups
    return Candidate(name=name, kind=kind, weight_shape=tuple(int(s) for s in shape),
                     in_channels=int(in_channels), groups=int(groups),
                     input_shape=tuple(input_shape) if input_shape is not None else None,
                     output_shape=tuple(output_shape) if output_shape is not None else None,
                     order=order, calls=calls, out_layout=out_layout, custom_forward=_custom_forward(module),
                     weight_read=weight_read,
                     extra_params=sum(p.numel() for n, p in module.named_parameters(recurse=False)
                                      if n not in ("weight", "bias")))


def _custom_forward(module: nn.Module) -> str | None:
    """The class name of a Conv/Linear subclass whose forward is not torch's, else None."""
    for module_type, _ in _KIND_OF_TYPE:
        if isinstance(module, module_type):
            if type(module).forward is module_type.forward:
                return None
            return f"{type(module).__module__}.{type(module).__qualname__}"
    return None


def _count_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def _norm_types(model: nn.Module) -> frozenset[str]:
    kinds = set()
    for module in model.modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            kinds.add("batchnorm")
        elif isinstance(module, nn.LayerNorm):
            kinds.add("layernorm")
        elif isinstance(module, nn.GroupNorm):
            kinds.add("groupnorm")
    return frozenset(kinds)


# --- hook fallback ----------------------------------------------------------------------
def _trace_hooks(model: nn.Module, inputs: tuple[torch.Tensor, ...],
                 named: list[tuple[str, nn.Module]], why: str) -> LayerGraph:
    """One real forward with hooks: exact candidates and shapes, dataflow assumed a chain."""
    seen: dict[str, list] = {}

    def record(name):
        def hook(module, args, output):
            if name in seen:
                seen[name][3] += 1
                return
            tensor = next((a for a in args if isinstance(a, torch.Tensor)), None)
            out = output if isinstance(output, torch.Tensor) else None
            seen[name] = [len(seen), tuple(tensor.shape) if tensor is not None else None,
                          tuple(out.shape) if out is not None else None, 1]
        return hook

    handles = [module.register_forward_hook(record(name)) for name, module in named]
    try:
        with _weight_reads(named) as read:
            model(*inputs)
    except Exception as err:
        raise _rejected(inputs, err) from None
    finally:
        for handle in handles:
            handle.remove()
    if not seen:
        raise ValueError(f"{type(model).__name__} calls none of its Conv/Linear layers in its forward")
    modules = dict(named)
    candidates = [_candidate(name, modules[name], order, in_shape, out_shape, calls, weight_read=name in read)
                  for name, (order, in_shape, out_shape, calls) in sorted(seen.items(), key=lambda kv: kv[1][0])]
    notes = [f"{why}; fell back to forward hooks: layers and shapes are exact, but the dataflow is "
             "assumed to be a chain in execution order, so residual blocks, stage handovers, "
             "stem-fed and expansion layers are guessed, and stages follow spatial resolution changes"]
    notes += [f"{c.name} is called at {c.calls} places; it is recorded once, at its first call"
              for c in candidates if c.calls > 1]
    return LayerGraph(
        candidates=tuple(candidates), dataflow=_chain(candidates),
        input_shapes=tuple(tuple(t.shape) for t in inputs), params_baseline=_count_params(model),
        norm_types=_norm_types(model), traced_with="hooks",
        unused=_unused(model, named, seen.keys(), None), notes=tuple(notes),
        node_of={c.name: c.name for c in candidates})


@contextlib.contextmanager
def _weight_reads(named: list[tuple[str, nn.Module]]):
    """Names of the layers whose ``weight`` the model reads outside their own forward.

    What fx sees as a ``get_attr`` node the hook fallback sees at run time: each layer's
    class is swapped for a subclass that notes reads of ``weight`` while the layer is not
    running, and put back on exit.
    """
    read: set[str] = set()
    running: set[str] = set()
    originals = [(module, type(module)) for _, module in named]
    handles = []
    for name, module in named:
        module.__class__ = _watching(type(module), name, read, running)
        handles.append(module.register_forward_pre_hook(lambda m, a, name=name: running.add(name)))
        handles.append(module.register_forward_hook(lambda m, a, o, name=name: running.discard(name)))
    try:
        yield read
    finally:
        for handle in handles:
            handle.remove()
        for module, cls in originals:
            module.__class__ = cls


def _watching(cls: type, name: str, read: set[str], running: set[str]) -> type:
    def __getattr__(self, attr):
        if attr == "weight" and name not in running:
            read.add(name)
        return cls.__getattr__(self, attr)
    return type(cls.__name__, (cls,), {"__getattr__": __getattr__})


def _chain(candidates: list[Candidate]) -> nx.DiGraph:
    chain = nx.DiGraph()
    chain.add_node("input", role="input", order=0, shape=None, candidate=None, source_input=None)
    previous = "input"
    for cand in candidates:
        chain.add_node(cand.name, role="candidate", order=cand.order + 1, shape=cand.output_shape,
                       candidate=cand.name, source_input=previous)
        chain.add_edge(previous, cand.name)
        previous = cand.name
    chain.add_node("output", role="output", order=len(candidates) + 1, shape=None, candidate=None,
                   source_input=previous)
    chain.add_edge(previous, "output")
    return chain
