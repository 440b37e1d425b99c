"""Pieces the dynamic layers of several methods share."""
from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn


def batch_norm_any_batch(norm: nn.BatchNorm1d, hidden: Tensor) -> Tensor:
    """``norm(hidden)``, except that a training batch of one sample, which BatchNorm refuses
    (no variance over one value; a known complaint about ODConv's code), is normalised with
    the running statistics, which it then leaves as they are."""
    if norm.training and hidden.shape[0] == 1:
        return F.batch_norm(hidden, norm.running_mean, norm.running_var, norm.weight, norm.bias,
                            training=False, eps=norm.eps)
    return norm(hidden)
