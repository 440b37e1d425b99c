"""The arithmetic of KernelWarehouse, shared by the planner and the layers.

KernelWarehouse (Li & Yao, ICML 2024, arXiv 2308.08361) cuts every static kernel into
``m`` cells of one shape, lets the layers of a stage share a warehouse of ``n`` cells,
and rebuilds each cell per input as a linear mixture of the warehouse.  The planner
needs these numbers to *predict* a converted model and the layers need them to *build*
one; keeping the formulas here means the prediction and the module cannot drift apart.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from fractions import Fraction
from functools import lru_cache, reduce
from typing import Sequence

#: Layer kinds the method converts (paper Sec. 3: "convolutional and linear layers").
KINDS = ("conv1d", "conv2d", "conv3d", "linear")


def cell_shape(weight_shapes: Sequence[Sequence[int]], budget: float,
               ratio: tuple[float, float] | None = None) -> tuple[int, ...]:
    """Cell shape ``(f_e, c_e, 1, ...)`` for the layers sharing one warehouse.

    Paper Sec. 3.2 / App. "common dimension divisors": ``c_e`` is the GCD of the
    layers' input channels per group, ``f_e`` the GCD of their output channels, cells are
    1 x 1 spatially.  For b < 1 both are halved (at least 1), so m quadruples and the
    warehouse can hold fewer cells than there are mixtures; an odd GCD, which has no exact
    half, goes to its largest divisor below the half (:func:`half_divisor`), so the cells
    still tile every kernel.

    ``ratio = (out, in)`` sets the cell as fractions of the GCDs instead, as the reference's
    ``cell_outplane_ratio`` / ``cell_inplane_ratio`` do (its MobileNetV2 1/2x classifier:
    ``(1, 0.025)`` cuts a 1000 x 1280 kernel into 1000 x 32 cells); each side is the
    largest divisor of its GCD within that fraction (:func:`divisor_at_most`).
    """
    if not weight_shapes:
        raise ValueError("a warehouse needs at least one layer")
    f_e = reduce(math.gcd, (int(s[0]) for s in weight_shapes))
    c_e = reduce(math.gcd, (int(s[1]) for s in weight_shapes))
    if ratio is not None:
        f_e, c_e = divisor_at_most(f_e, f_e * ratio[0]), divisor_at_most(c_e, c_e * ratio[1])
    elif budget < 1:
        f_e, c_e = half_divisor(f_e), half_divisor(c_e)
    spatial = max(len(s) for s in weight_shapes) - 2
    return (f_e, c_e) + (1,) * spatial


def half_divisor(gcd: int) -> int:
    """The largest divisor of ``gcd`` that is at most half of it (1 stays 1).

    A cell dimension must stay a common dimension divisor of every sharing layer, so
    the b < 1 halving can only pick among the divisors of the GCD: an even GCD is halved
    exactly as the paper does (64 -> 32), an odd one is divided by its smallest prime
    factor (r2plus1d_18's 45 input channels -> 15, where 45 // 2 = 22 divides nothing).
    """
    if gcd < 1:
        raise ValueError(f"a channel GCD must be a positive integer, got {gcd}")
    smallest_factor = next((p for p in range(2, math.isqrt(gcd) + 1) if gcd % p == 0), gcd)
    return gcd // smallest_factor


def divisor_at_most(value: int, bound: float) -> int:
    """The largest divisor of ``value`` that is at most ``bound`` (at least 1).

    The reference takes ``int(gcd * ratio)`` and trusts it to divide; a divisor keeps the
    cells tiling every kernel for any ratio.  A tolerance absorbs float error
    (``1280 * 0.025`` must give 32, not 31.999...).
    """
    limit = max(int(bound + 1e-9), 1)
    small = [d for d in range(1, math.isqrt(value) + 1) if value % d == 0]
    return max(d for d in small + [value // d for d in small] if d <= limit)


def cells_in(weight_shape: Sequence[int], cell: Sequence[int]) -> int:
    """Number of cells ``m`` that tile one kernel ``(C_out, C_in/groups, *k)`` exactly.

    Raises ValueError when the cell does not divide the kernel: a tiling that leaves a
    remainder cannot be rebuilt from the warehouse.
    """
    if len(weight_shape) != len(cell):
        raise ValueError(f"kernel {tuple(weight_shape)} and cell {tuple(cell)} have different ranks")
    count = 1
    for size, part in zip(weight_shape, cell):
        if part < 1 or size % part:
            raise ValueError(f"cell {'x'.join(map(str, cell))} does not divide kernel "
                             f"{'x'.join(map(str, weight_shape))}")
        count *= size // part
    return count


#: A budget is read as the fraction it spells, with a denominator up to this (0.4 is 2/5).
BUDGET_DENOMINATOR = 10**6


@lru_cache(maxsize=256)
def budget_fraction(budget: float) -> Fraction:
    """The budget as the fraction it stands for: 0.5 -> 1/2, 0.4 -> 2/5, 1/3 -> 1/3.

    Cell counts are ``floor(b * mixtures)``; in floats ``49 * (1/49)`` is 0.999..., and
    ``0.29 * 100`` is 28.999..., so each would lose a cell.  Exact fractions also make the
    shares add up: ``floor(b * x) + floor(b * y) <= floor(b * (x + y))`` always holds, so
    the layers' shares of a warehouse never exceed its n (:func:`cells_handed_out`).  The
    published budgets (1/4, 1/2, 1, 2, 4) are exact binary fractions: nothing changes for them.
    """
    if not (budget > 0 and math.isfinite(budget)):
        raise ValueError(f"budget must be a positive finite number, got {budget}")
    return Fraction(budget).limit_denominator(BUDGET_DENOMINATOR)


def cells_for(mixtures: int, budget: float) -> int:
    """``floor(b * mixtures)`` in exact arithmetic: the one rounding rule of n, shares and saver."""
    return math.floor(budget_fraction(budget) * mixtures)


def warehouse_size(total_cells: int, budget: float) -> int:
    """``n = max(floor(b * m_t), 1)``: the budget is the ratio of warehouse cells to mixtures."""
    return max(cells_for(total_cells, budget), 1)


def cells_handed_out(cells: int, budget: float) -> int:
    """A layer's share of its warehouse in the one-to-one walk: ``floor(b * m)`` cells.

    The walk (paper Sec. 3.3) hands each layer the cells from its offset on, the offset
    being the shares of the layers before it.  A share of ``floor(b * m)`` is what the
    reference hands out in every published configuration (integer b: ``b`` cells per
    mixture; b = 1/k with k dividing m: one cell per k mixtures), and it is the
    reference's count of a layer's local cells (:func:`local_cells`).  Floors add up to
    at most the floor of the sum, so the shares of a warehouse's layers never exceed
    ``n = floor(b * m_t)``, at every budget; the cells left over (fewer than the layers)
    start no mixture and are learnt like the others.  (The reference's own b < 1 walk,
    one cell per ``int(1/b)`` mixtures, outgrows n at any other budget, b = 0.4 or 3/4,
    and where m is not a multiple of ``int(1/b)``.)
    """
    return cells_for(cells, budget)


def hidden_size(in_channels: int, reduction: float = 1 / 16, min_hidden: int = 16) -> int:
    """Attention hidden width: ``max(int(c_in * reduction), min_hidden)`` as in the reference."""
    return max(int(in_channels * reduction), min_hidden)


def local_cells(cells: int, budget: float) -> int:
    """Cells a layer calls its own under the parameter saver: ``floor(b * m)`` from its offset.

    The reference's ``num_local_cell = int(b * m)``: the same range the one-to-one walk
    hands the layer (:func:`cells_handed_out`), so the saver's local logits are exactly
    those of the cells the layer's mixtures start on.
    """
    return cells_handed_out(cells, budget)


def saver_basis(cells: int, n: int, budget: float, basis_ratio: float) -> int:
    """Basis size of the parameter saver: ``max(int((n - local) * r), 16)``."""
    return max(int((n - local_cells(cells, budget)) * basis_ratio), 16)


def attention_params(in_channels: int, hidden: int, cells: int, n: int, *, norm: str = "batchnorm",
                     budget: float = 1.0, basis_ratio: float | None = None) -> int:
    """Parameters of one layer's attention module (fc1, norm, fc2, and fc3 with the saver).

    fc1 ``c_in x hidden`` (a bias only when the norm is not BatchNorm1d), norm ``2 x hidden``,
    fc2 ``(hidden + 1) x m x (n + 1)``; with the parameter saver (b < 1) fc2 is
    ``hidden x (local + basis + 1) x m`` without bias, fc3 ``basis x nonlocal`` and a bias of
    ``m x (n + 1)``.
    """
    fc1 = in_channels * hidden + (hidden if norm != "batchnorm" else 0)
    norm_params = 2 * hidden
    if basis_ratio is None:
        fc2 = (hidden + 1) * cells * (n + 1)
    else:
        local = local_cells(cells, budget)
        basis = saver_basis(cells, n, budget, basis_ratio)
        fc2 = hidden * (local + basis + 1) * cells + basis * (n - local) + cells * (n + 1)
    return fc1 + norm_params + fc2


def attention_macs(in_channels: int, hidden: int, cells: int, n: int, *, budget: float = 1.0,
                   basis_ratio: float | None = None) -> int:
    """Multiply-adds of one layer's attention per sample: its fully connected layers.

    fc1 ``c_in x hidden``, fc2 ``hidden x m x (n + 1)``; with the parameter saver fc2 is
    ``hidden x (local + basis + 1) x m`` and fc3 maps each mixture's basis to its nonlocal
    logits, ``m x basis x (n - local)``.  The global pooling's additions are not
    multiply-adds (torch's FlopCounterMode does not count them either).
    """
    if basis_ratio is None:
        return hidden * (in_channels + cells * (n + 1))
    local = local_cells(cells, budget)
    basis = saver_basis(cells, n, budget, basis_ratio)
    return hidden * (in_channels + (local + basis + 1) * cells) + cells * basis * (n - local)


def one_to_one_cells(cells: int, offset: int, budget: float) -> list[int | None]:
    """The cell each mixture of a layer starts on (beta, paper Sec. 3.3), ``None`` for e_z.

    The layer's share (:func:`cells_handed_out`), cells ``offset .. offset + share - 1``,
    is dealt out in mixture order.  For b >= 1 mixture i owns cells ``floor(b * i)`` to
    ``floor(b * (i + 1)) - 1`` of the share and starts on the first: ``b`` cells apart for
    integer b, as in the reference.  For b < 1 the m mixtures are cut into ``share``
    consecutive runs of near-equal length (about 1/b) and run q gives its cell to its
    mixture ``q mod length``; the others start on e_z.  For b = 1/k with k dividing m
    every run has length k and the chosen mixtures are those with
    ``i mod k == (i div k) mod k``, the reference's rule.
    """
    if budget >= 1:
        ratio = budget_fraction(budget)
        return [offset + i * ratio.numerator // ratio.denominator for i in range(cells)]
    share = cells_handed_out(cells, budget)
    assigned: list[int | None] = [None] * cells
    for run in range(share):
        start, stop = run * cells // share, (run + 1) * cells // share
        assigned[start + run % (stop - start)] = offset + run
    return assigned


@dataclass(frozen=True)
class Tiling:
    """How a kernel ``(C_out, C_in/g, *k)`` is cut into cells ``(f_e, c_e, 1, ...)``.

    Mixture index order follows the reference implementation: the spatial position is
    the slowest index, then the output block, then the input block
    (``i = (s * blocks_out + o) * blocks_in + c``).  Cells are 1 x 1 spatially in every
    published configuration; whole kernels (vanilla dynamic convolution) give m = 1.
    """
    weight_shape: tuple[int, ...]
    cell: tuple[int, ...]

    @property
    def blocks_out(self) -> int:
        return self.weight_shape[0] // self.cell[0]

    @property
    def blocks_in(self) -> int:
        return self.weight_shape[1] // self.cell[1]

    @property
    def spatial(self) -> int:
        return math.prod([w // c for w, c in zip(self.weight_shape[2:], self.cell[2:])])  # a list, for torch.compile

    @property
    def cells(self) -> int:
        return cells_in(self.weight_shape, self.cell)
