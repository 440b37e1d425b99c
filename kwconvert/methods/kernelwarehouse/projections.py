"""Vision transformers: which projections KernelWarehouse converts.

KernelWarehouse (Li & Yao, ICML 2024, arXiv 2308.08361) applies to ViTs too (DeiT): "each
partitioned weight of the value projection and of the MLP layers is a mixture from a
warehouse shared across several blocks; query and key projections stay static".  The
planner groups the blocks (option ``blocks_per_warehouse``); this module knows which
projections are queries and keys, and how a *fused* projection is split:

* separate ``q`` / ``k`` Linears (``q_proj``, ``to_k``, ...) stay static;
* a fused ``qkv`` (timm's ``Attention``, Swin, ...) or ``kv`` (PVT) Linear whose output is
  stacked as ``(..., 3 or 2, heads, head_dim)`` converts only its value rows, the last
  third (half), which the rewriter builds as a
  :class:`~kwconvert.methods.kernelwarehouse.layers.PartlyDynamicLinear`;
* a fused projection whose layout kwconvert cannot read (per-head interleaved, or traced
  without fx) stays static, with that reason;
* ``nn.MultiheadAttention`` is unpacked into four Linear layers first
  (:mod:`kwconvert.multihead`), which the rules above then treat like timm's.

Names follow timm's and torchvision's conventions; the stacked layout is read from the
traced reshape that follows the layer (``Candidate.out_layout``).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from ...trace import Candidate

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
