"""Vision transformers: query and key stay static, the value projection becomes dynamic.

KernelWarehouse (Li & Yao, ICML 2024, arXiv 2308.08361) applies to ViTs too (DeiT): "each
partitioned weight of the value projection and of the MLP layers is a mixture from a
warehouse shared across several blocks; query and key projections stay static".  The
planner groups the blocks (option ``blocks_per_warehouse``); this module knows which
projections are queries and keys, and how a *fused* projection is split:

* separate ``q`` / ``k`` Linears (``q_proj``, ``to_k``, ...) stay static;
* a fused ``qkv`` (timm's ``Attention``, Swin, ...) or ``kv`` (PVT) Linear whose output is
  stacked as ``(..., 3 or 2, heads, head_dim)`` converts only its value rows, the last
  third (half): :class:`PartlyDynamicLinear` holds the other rows in a static Linear and
  the value rows in a ``KWLinear``, and concatenates them back in their places, so the
  attention code that reads ``qkv(x)`` is unchanged and, at tau = 1 with
  ``init="preserve"``, so is its output;
* a fused projection whose layout kwconvert cannot read (per-head interleaved, or traced
  without fx) stays static, with that reason;
* ``nn.MultiheadAttention`` (torchvision's ViT) packs q, k and v in one
  ``in_proj_weight`` and uses it, and ``out_proj``, as tensors: no layer to swap.  It is
  *unpacked* into :class:`UnpackedMultiheadAttention`, the same attention with four
  Linear layers (``q_proj``, ``k_proj``, ``v_proj``, ``out_proj``), which the rules above
  then treat like timm's separate projections.  The tracer unpacks temporarily to see
  the layers, the plan lists the unpacked modules, and the rewriter unpacks them for good.

Names follow timm's and torchvision's conventions; the stacked layout is read from the
traced reshape that follows the layer (``Candidate.out_layout``).
"""
from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Iterator, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.fx._symbolic_trace import is_fx_symbolic_tracing

if TYPE_CHECKING:
    from .trace import Candidate

__all__ = ["ProjectionRole", "projection_role", "PartlyDynamicLinear", "linear_rows",
           "UnpackedMultiheadAttention", "unpack_reason", "unpacked_attention", "unpack_attention"]

#: Last name component of a separate query or key projection.
QUERY_KEY_NAMES = frozenset({"q", "k", "q_proj", "k_proj", "query", "key", "to_q", "to_k", "wq", "wk"})
#: Last name component of a fused projection -> how many projections it stacks.
FUSED_NAMES = {"qkv": 3, "to_qkv": 3, "qkv_proj": 3, "wqkv": 3, "kv": 2, "to_kv": 2, "kv_proj": 2}


@dataclass(frozen=True)
class ProjectionRole:
    """What the ViT rule does with a Linear: keep it static (why), or convert ``value_rows``."""
    static_reason: str | None = None
    value_rows: tuple[int, int] | None = None


def projection_role(cand: Candidate) -> ProjectionRole | None:
    """The role of an attention projection, or None for any other layer."""
    if cand.kind != "linear":
        return None
    last = cand.name.rsplit(".", 1)[-1].lower()
    if last in QUERY_KEY_NAMES:
        return ProjectionRole(static_reason="query/key projection (static in ViTs, as in the paper)")
    parts = FUSED_NAMES.get(last)
    if parts is None or cand.out_channels % parts:
        return None
    what = "query/key/value" if parts == 3 else "key/value"
    if _stacked(cand.out_layout, parts, cand.out_channels):
        value = cand.out_channels // parts
        return ProjectionRole(value_rows=(cand.out_channels - value, cand.out_channels))
    layout = "x".join(map(str, cand.out_layout)) if cand.out_layout else "unknown"
    return ProjectionRole(static_reason=(
        f"fused {what} projection whose output layout ({layout}) is not (..., {parts}, heads, head_dim): "
        "its value rows cannot be told from query and key, so it stays static"))


def _stacked(layout: tuple[int, ...] | None, parts: int, out: int) -> bool:
    """True when ``layout`` has an axis of size ``parts`` with one projection after it."""
    if not layout:
        return False
    return any(size == parts and math.prod(layout[i + 1:]) * parts == out
               for i, size in enumerate(layout[:-1]))


def linear_rows(linear: nn.Linear, rows: tuple[int, int]) -> nn.Linear:
    """A new Linear computing output rows ``[start, stop)`` of ``linear`` (weights copied)."""
    start, stop = rows
    weight = linear.weight
    part = nn.Linear(linear.in_features, stop - start, bias=linear.bias is not None,
                     device=weight.device, dtype=weight.dtype)
    with torch.no_grad():
        part.weight.copy_(weight[start:stop])
        if linear.bias is not None:
            part.bias.copy_(linear.bias[start:stop])
    return part


class PartlyDynamicLinear(nn.Module):
    """A Linear whose output rows ``[start, stop)`` come from a KernelWarehouse layer.

    The other rows (a fused qkv's query and key) stay a static Linear; the outputs are
    concatenated back in the original row order, so the module is a drop-in for the
    Linear it replaces.
    """

    def __init__(self, linear: nn.Linear, dynamic: nn.Module, rows: tuple[int, int]) -> None:
        super().__init__()
        start, stop = rows
        if not 0 <= start < stop <= linear.out_features:
            raise ValueError(f"rows {start}:{stop} are not inside the {linear.out_features} outputs")
        if getattr(dynamic, "out_features", stop - start) != stop - start:
            raise ValueError(f"the dynamic part has {dynamic.out_features} outputs, rows {start}:{stop} need "
                             f"{stop - start}")
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.rows = (start, stop)
        weight = linear.weight
        self.static = nn.Linear(linear.in_features, linear.out_features - (stop - start),
                                bias=linear.bias is not None, device=weight.device, dtype=weight.dtype)
        with torch.no_grad():
            self.static.weight.copy_(torch.cat([weight[:start], weight[stop:]]))
            if linear.bias is not None:
                self.static.bias.copy_(torch.cat([linear.bias[:start], linear.bias[stop:]]))
        self.dynamic = dynamic

    def forward(self, x: Tensor) -> Tensor:
        start, _ = self.rows
        static = self.static(x)
        return torch.cat([static[..., :start], self.dynamic(x), static[..., start:]], dim=-1)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"dynamic rows {self.rows[0]}:{self.rows[1]}")


# --- nn.MultiheadAttention ----------------------------------------------------------------


def unpack_reason(module: nn.Module) -> str | None:
    """Why an ``nn.MultiheadAttention`` cannot be unpacked, or None when it can."""
    if module.bias_k is not None or module.bias_v is not None:
        return "it adds bias_k / bias_v to the keys and values"
    if module.add_zero_attn:
        return "it uses add_zero_attn"
    return None


class UnpackedMultiheadAttention(nn.Module):
    """``nn.MultiheadAttention`` with its projections as four Linear layers.

    Same arguments, same outputs (to float rounding), same masks, dropout and attention
    weights; the projections are ``q_proj``, ``k_proj``, ``v_proj`` and the original
    ``out_proj``, so KernelWarehouse can convert the value and output projections while
    query and key stay static.  Built from an ``nn.MultiheadAttention`` (weights copied,
    or shared with ``share=True`` for the tracer's temporary view).
    """

    def __init__(self, mha: nn.MultiheadAttention, share: bool = False) -> None:
        super().__init__()
        reason = unpack_reason(mha)
        if reason is not None:
            raise ValueError(f"cannot unpack this nn.MultiheadAttention: {reason}")
        self.embed_dim, self.num_heads, self.head_dim = mha.embed_dim, mha.num_heads, mha.head_dim
        self.dropout, self.batch_first = mha.dropout, mha.batch_first
        e = mha.embed_dim
        if mha._qkv_same_embed_dim:
            weights = (mha.in_proj_weight[:e], mha.in_proj_weight[e:2 * e], mha.in_proj_weight[2 * e:])
        else:
            weights = (mha.q_proj_weight, mha.k_proj_weight, mha.v_proj_weight)
        biases = ((mha.in_proj_bias[:e], mha.in_proj_bias[e:2 * e], mha.in_proj_bias[2 * e:])
                  if mha.in_proj_bias is not None else (None, None, None))
        self.q_proj, self.k_proj, self.v_proj = (_linear(w, b, share) for w, b in zip(weights, biases))
        self.out_proj = mha.out_proj

    def forward(self, query: Tensor, key: Tensor, value: Tensor, key_padding_mask: Tensor | None = None,
                need_weights: bool = True, attn_mask: Tensor | None = None, average_attn_weights: bool = True,
                is_causal: bool = False) -> tuple[Tensor, Tensor | None]:
        # fx cannot branch on a traced tensor's rank; the tracer's example input is batched.
        unbatched = not is_fx_symbolic_tracing() and query.dim() == 2
        if unbatched:
            query, key, value = query.unsqueeze(1), key.unsqueeze(1), value.unsqueeze(1)
            key_padding_mask = key_padding_mask.unsqueeze(0) if key_padding_mask is not None else None
        elif self.batch_first:  # the projections see (batch, tokens, dim): attention pools per sample
            query, key, value = query.transpose(0, 1), key.transpose(0, 1), value.transpose(0, 1)
        # from here on (tokens, batch, dim), as in torch's multi_head_attention_forward
        q = self._heads(self.q_proj(query.transpose(0, 1)))
        k = self._heads(self.k_proj(key.transpose(0, 1)))
        v = self._heads(self.v_proj(value.transpose(0, 1)))
        mask = _additive_mask(attn_mask, key_padding_mask, q, k.shape[2])
        dropout = self.dropout if self.training else 0.0
        if need_weights:
            scores = q @ k.transpose(-2, -1) / math.sqrt(self.head_dim)
            if mask is not None:
                scores = scores + mask
            elif is_causal:
                scores = scores + _causal_mask(scores)
            weights = scores.softmax(dim=-1)
            out = F.dropout(weights, p=dropout) @ v if dropout else weights @ v
        else:
            weights = None
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout,
                                                 is_causal=is_causal and mask is None)
        out = self.out_proj(out.transpose(1, 2).flatten(2))          # (batch, tokens, dim)
        if unbatched:
            out = out.squeeze(0)
        elif not self.batch_first:
            out = out.transpose(0, 1)
        if weights is not None:
            weights = weights.mean(dim=1) if average_attn_weights else weights
            weights = weights.squeeze(0) if unbatched else weights
        return out, weights

    def _heads(self, x: Tensor) -> Tensor:
        """(batch, tokens, dim) -> (batch, heads, tokens, head_dim)."""
        return x.unflatten(-1, (self.num_heads, self.head_dim)).transpose(1, 2)

    def extra_repr(self) -> str:
        return f"embed_dim={self.embed_dim}, num_heads={self.num_heads}, batch_first={self.batch_first}"


def _linear(weight: Tensor, bias: Tensor | None, share: bool) -> nn.Linear:
    layer = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None, device="meta")
    data = (lambda t: t.detach()) if share else (lambda t: t.detach().clone())
    layer.weight = nn.Parameter(data(weight), requires_grad=weight.requires_grad)
    if bias is not None:
        layer.bias = nn.Parameter(data(bias), requires_grad=bias.requires_grad)
    return layer


def _additive_mask(attn_mask: Tensor | None, key_padding_mask: Tensor | None, q: Tensor,
                   source: int) -> Tensor | None:
    """nn.MultiheadAttention's masks as one float mask broadcastable to (B, H, L, S).

    Boolean masks mark positions *not* to attend (True), as nn.MultiheadAttention reads
    them; float masks are added to the scores.
    """
    def additive(mask: Tensor) -> Tensor:
        if mask.dtype == torch.bool:
            return torch.zeros_like(mask, dtype=q.dtype).masked_fill(mask, float("-inf"))
        return mask.to(q.dtype)

    merged = None
    if attn_mask is not None:
        merged = additive(attn_mask)
        if merged.dim() == 3:  # (B * H, L, S)
            merged = merged.view(-1, q.shape[1], q.shape[2], source)
    if key_padding_mask is not None:
        padding = additive(key_padding_mask).view(-1, 1, 1, source)
        merged = padding if merged is None else merged + padding
    return merged


def _causal_mask(scores: Tensor) -> Tensor:
    length, source = scores.shape[-2:]
    upper = torch.ones(length, source, dtype=torch.bool, device=scores.device).triu(1)
    return torch.zeros(length, source, dtype=scores.dtype, device=scores.device).masked_fill(upper, float("-inf"))


def _multihead_paths(model: nn.Module, paths: Sequence[str] | None) -> dict[str, nn.Module]:
    """The nn.MultiheadAttention modules to unpack: ``paths``, or every one that can be."""
    if paths is None:
        return {name: m for name, m in model.named_modules(remove_duplicate=False)
                if type(m) is nn.MultiheadAttention and unpack_reason(m) is None}
    found = {}
    for path in paths:
        module = model.get_submodule(path) if path else model
        if type(module) is not nn.MultiheadAttention:
            raise ValueError(f"the plan unpacks {path} as nn.MultiheadAttention, but the model has "
                             f"{type(module).__name__} there")
        reason = unpack_reason(module)
        if reason is not None:
            raise ValueError(f"the plan unpacks {path}, which cannot be unpacked: {reason}")
        found[path] = module
    return found


def _swap(model: nn.Module, path: str, module: nn.Module) -> None:
    parent_name, _, child = path.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, module)


@contextlib.contextmanager
def unpacked_attention(model: nn.Module, paths: Sequence[str] | None = None) -> Iterator[tuple[str, ...]]:
    """Temporarily unpack the model's nn.MultiheadAttention modules (weights shared).

    Yields the unpacked paths; the originals are back in place on exit, whatever happens.
    """
    originals = _multihead_paths(model, paths)
    unpacked = {}
    for path, module in originals.items():
        unpacked.setdefault(id(module), UnpackedMultiheadAttention(module, share=True))
    try:
        for path, module in originals.items():
            _swap(model, path, unpacked[id(module)])
        yield tuple(originals)
    finally:
        for path, module in originals.items():
            _swap(model, path, module)


def unpack_attention(model: nn.Module, paths: Sequence[str]) -> None:
    """Replace the nn.MultiheadAttention modules at ``paths`` for good (weights copied)."""
    originals = _multihead_paths(model, paths)
    unpacked = {}
    for path, module in originals.items():
        unpacked.setdefault(id(module), UnpackedMultiheadAttention(module))
        _swap(model, path, unpacked[id(module)])
