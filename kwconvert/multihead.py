"""``nn.MultiheadAttention`` unpacked into four Linear layers, so that a method can convert them.

``nn.MultiheadAttention`` (torchvision's ViT) packs q, k and v in one ``in_proj_weight``
and uses it, and ``out_proj``, as tensors: no layer to swap.  It is *unpacked* into
:class:`UnpackedMultiheadAttention`, the same attention with four Linear layers
(``q_proj``, ``k_proj``, ``v_proj``, ``out_proj``).  The tracer unpacks temporarily to see
the layers (:func:`unpacked_attention`), the plan lists the unpacked modules, and the
rewriter unpacks them for good (:func:`unpack_attention`).
"""
from __future__ import annotations

import contextlib
import math
from typing import Iterator, Sequence

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["UnpackedMultiheadAttention", "unpack_reason", "unpacked_attention", "unpack_attention"]


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
        unbatched = not isinstance(query, fx.Proxy) and query.dim() == 2
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
