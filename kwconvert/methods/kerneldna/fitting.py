"""Least-squares fits of KernelDNA kernels to a trained model's: a child's scalings from a
fixed parent (:func:`fit_scalings`), or a parent fitted with all its children (:func:`fit_family`).

A child's kernel is ``P * s * f``: ``s`` one factor per kernel position (``1 + S_j``), ``f``
one per filter (``1 + F_j``), the same for every input channel.  So every quantity a fit
needs is a sum over the input channels of products of two kernels, taken at one (filter,
position) pair: the joint fit computes those inner products once (a Gram tensor of the
family's kernels) and then iterates on arrays of C_out x k values, not on the kernels.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

#: Rounds of alternating least squares for S_j and F_j (the error settles within a few).
FIT_ROUNDS = 20
#: Most rounds of the joint fit (the parent, then every child's scalings); it stops sooner
#: when a round lowers the family's error by less than FAMILY_TOLERANCE of it.
FAMILY_ROUNDS = 1000
FAMILY_TOLERANCE = 1e-7
#: ALS rounds of a child's scalings within one round of the joint fit (warm-started).
FAMILY_ALS_ROUNDS = 2
_TINY = 1e-300


def fit_scalings(parent: Tensor, target: Tensor, rounds: int = FIT_ROUNDS) -> tuple[Tensor, Tensor, float]:
    """Position and filter scalings ``s`` (k points) and ``f`` (C_out) minimising
    ``|| parent * s * f - target ||``, and the relative error left.

    Alternating least squares in float64: with ``s`` fixed each ``f_o`` has a closed form,
    and the other way round; every round lowers the error.  Starts from ``s = 1``.  The
    rounds run on the kernels' inner products over the input channels (:func:`_als`), so
    they cost C_out x k operations each, not the kernel's size.
    """
    p, t = _rows(parent), _rows(target)
    ones = torch.ones(p.shape[2], dtype=torch.float64, device=p.device)
    s, f = _als((p * t).sum(dim=1), (p * p).sum(dim=1), ones, rounds)
    return s, f, relative_error(p * _scale(s, f), t)


def relative_error(fitted: Tensor, target: Tensor) -> float:
    """``||fitted - target|| / ||target||`` in float64: a fit error as the plan reports it."""
    target = target.detach().double()
    return float((fitted.detach().double() - target).norm() / target.norm().clamp_min(_TINY))


def _rows(kernel: Tensor) -> Tensor:
    """A kernel as float64 (C_out, C_in/g, points): the layout the scalings act on."""
    return kernel.detach().double().reshape(kernel.shape[0], kernel.shape[1], -1)


def _scale(s: Tensor, f: Tensor) -> Tensor:
    """``s * f`` as one (C_out, 1, points) factor."""
    return f.view(-1, 1, 1) * s.view(1, 1, -1)


@dataclass(frozen=True)
class FamilyFit:
    """A parent kernel fitted jointly with its children's scalings (:func:`fit_family`).

    ``parent`` is the new parent kernel (float64, the parent's shape); ``scalings`` holds
    each child's ``(s, f)`` = ``(1 + S_j, 1 + F_j)``; the errors are relative, each to its
    own layer's kernel (the parent's trained one, a child's target).
    """
    parent: Tensor
    scalings: tuple[tuple[Tensor, Tensor], ...]
    parent_error: float
    child_errors: tuple[float, ...]

    @property
    def objective(self) -> float:
        """What the fit minimises: the family's squared relative errors, summed."""
        return self.parent_error ** 2 + sum(error ** 2 for error in self.child_errors)


def fit_family(parent: Tensor, targets: list[Tensor], rounds: int = FAMILY_ROUNDS) -> FamilyFit:
    """The parent kernel and every child's scalings minimising the family's summed squared
    relative errors, ``||P - W_p||^2 / ||W_p||^2 + sum_j ||P * A_j - T_j||^2 / ||T_j||^2``
    (``W_p`` the parent's trained kernel, ``A_j = s_j f_j``, ``T_j`` child j's target).

    Relative errors, because each layer's output has its own scale (a BatchNorm follows):
    weighted by its norm, a child with a large kernel would pull the parent away from the
    others; here the parent counts as one layer of the family, like each child.  The fit
    alternates exact minimisations, so its error never rises: it starts from the fixed
    parent's fit (``P = W_p``, :func:`fit_scalings` per child), then each round sets P per
    element in closed form, ``P = (w_p W_p + sum_j w_j A_j T_j) / (w_p + sum_j w_j A_j^2)``
    with ``w = 1 / ||kernel||^2``, and refits each child's scalings from where they were.
    """
    kernels = [_rows(parent)] + [_rows(target) for target in targets]
    gram = _gram(kernels)
    weights = 1 / torch.stack([gram[a, a].sum() for a in range(len(kernels))]).clamp_min(_TINY)
    coefficients = torch.zeros_like(gram[0])  # P = sum_a coefficients[a] * kernels[a], per (filter, position)
    coefficients[0] = 1
    inner = _inner(gram, coefficients)
    ones = torch.ones(gram.shape[3], dtype=torch.float64, device=gram.device)
    scalings = [_gram_scalings(inner, j, ones, FIT_ROUNDS) for j in range(1, len(kernels))]
    objective = _objective(gram, weights, inner, scalings)
    for _ in range(rounds):
        coefficients = _parent_coefficients(weights, scalings)
        inner = _inner(gram, coefficients)
        scalings = [_gram_scalings(inner, j, s, FAMILY_ALS_ROUNDS) for j, (s, _) in enumerate(scalings, start=1)]
        previous, objective = objective, _objective(gram, weights, inner, scalings)
        if previous - objective <= FAMILY_TOLERANCE * previous:
            break
    fitted = sum(c.unsqueeze(1) * kernel for c, kernel in zip(coefficients, kernels))
    errors = tuple(relative_error(fitted * _scale(s, f), target) for target, (s, f) in zip(kernels[1:], scalings))
    return FamilyFit(fitted.reshape(parent.shape), tuple(scalings), relative_error(fitted, kernels[0]), errors)


def parent_ranking(kernels: list[Tensor], rounds: int) -> list[float]:
    """For each member of a family as the parent, the others' relative fit errors summed
    (:func:`fit_scalings` with ``rounds`` ALS rounds), all from one Gram tensor of the family:
    a child's fit needs only inner products, so ranking n parents costs about one pass over
    the kernels instead of ``rounds`` passes per (parent, child) pair."""
    gram = _gram([_rows(kernel) for kernel in kernels])
    ones = torch.ones(gram.shape[3], dtype=torch.float64, device=gram.device)
    totals = []
    for parent in range(len(kernels)):
        inner = (gram[parent], gram[parent, parent])  # <P, kernel_b> and <P, P> for P = kernel_parent
        total = 0.0
        for child in range(len(kernels)):
            if child != parent:
                s, f = _gram_scalings(inner, child, ones, rounds)
                squared = _squared_error(_scale(s, f).squeeze(1), gram[parent, parent], gram[parent, child],
                                         gram[child, child])
                total += float((squared / gram[child, child].sum().clamp_min(_TINY)).sqrt())
        totals.append(total)
    return totals


def _gram(kernels: list[Tensor]) -> Tensor:
    """``gram[a, b, o, k]``: the inner product of kernels a and b over the input channels at
    filter o and position k (symmetric in a, b): all the joint fit needs of the kernels."""
    n = len(kernels)
    gram = kernels[0].new_zeros(n, n, kernels[0].shape[0], kernels[0].shape[2])
    for a in range(n):
        for b in range(a, n):
            gram[a, b] = gram[b, a] = (kernels[a] * kernels[b]).sum(dim=1)
    return gram


def _inner(gram: Tensor, coefficients: Tensor) -> tuple[Tensor, Tensor]:
    """For ``P = sum_a c_a kernel_a`` per (filter, position): ``<P, kernel_b>`` for every b
    (shape (n, C_out, k)), and ``<P, P>``."""
    with_kernels = (coefficients.unsqueeze(1) * gram).sum(dim=0)
    return with_kernels, (coefficients * with_kernels).sum(dim=0)


def _gram_scalings(inner: tuple[Tensor, Tensor], j: int, s: Tensor, rounds: int) -> tuple[Tensor, Tensor]:
    """:func:`fit_scalings` of child j from the parent's inner products (:func:`_inner`),
    starting from the positions' ``s`` (a previous fit's: the error then never rises above it)."""
    with_kernels, with_itself = inner
    return _als(with_kernels[j], with_itself, s, rounds)


def _als(with_target: Tensor, with_itself: Tensor, s: Tensor, rounds: int) -> tuple[Tensor, Tensor]:
    """Alternating least squares for ``P * s * f ~ T`` from ``<P, T>`` and ``<P, P>`` per
    (filter, position), summed over the input channels: ``f`` then ``s`` in closed form."""
    f = torch.ones(with_target.shape[0], dtype=torch.float64, device=with_target.device)
    for _ in range(rounds):
        f = (with_target * s).sum(dim=1) / (with_itself * s * s).sum(dim=1).clamp_min(_TINY)
        s = (with_target * f.view(-1, 1)).sum(dim=0) / (with_itself * (f * f).view(-1, 1)).sum(dim=0).clamp_min(_TINY)
    return s, f


def _parent_coefficients(weights: Tensor, scalings: list[tuple[Tensor, Tensor]]) -> Tensor:
    """The parent minimising the family's weighted error with every child's scalings fixed,
    as coefficients of the kernels: per element one weighted mean (each term of the error
    is a quadratic in that element alone)."""
    factors = [f.view(-1, 1) * s.view(1, -1) for s, f in scalings]   # A_j per (filter, position)
    denominator = weights[0] + sum(w * a * a for w, a in zip(weights[1:], factors))
    return torch.stack([weights[0] / denominator] + [w * a / denominator for w, a in zip(weights[1:], factors)])


def _objective(gram: Tensor, weights: Tensor, inner: tuple[Tensor, Tensor],
               scalings: list[tuple[Tensor, Tensor]]) -> float:
    """The family's summed squared relative error, from inner products (no kernel is built)."""
    with_kernels, with_itself = inner
    total = weights[0] * _squared_error(1.0, with_itself, with_kernels[0], gram[0, 0])
    for j, (s, f) in enumerate(scalings, start=1):
        a = f.view(-1, 1) * s.view(1, -1)
        total = total + weights[j] * _squared_error(a, with_itself, with_kernels[j], gram[j, j])
    return float(total)


def _squared_error(a, with_itself: Tensor, with_target: Tensor, target_squared: Tensor) -> Tensor:
    """``||P * a - T||^2`` from inner products per (filter, position): ``<P, P>``, ``<P, T>``
    and ``<T, T>`` (``a`` the scalings there, or 1); never below 0 from rounding."""
    return (a * a * with_itself - 2 * a * with_target + target_squared).sum().clamp_min(0)
