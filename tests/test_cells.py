"""The arithmetic of kwconvert.methods.kernelwarehouse.cells: cells are common dimension divisors of the kernels they tile."""
import math
from functools import reduce

import pytest
from hypothesis import given
from hypothesis import strategies as st

from kwconvert.methods.kernelwarehouse import cells

BUDGETS = (0.25, 0.5, 0.75, 1.0, 2.0, 4.0)


@st.composite
def kernels(draw):
    """1..5 kernel shapes of one rank (Linear, Conv1d/2d/3d), channels of every parity."""
    spatial = draw(st.integers(0, 3))
    channels = st.integers(1, 512)
    sizes = st.integers(1, 7)
    return [(draw(channels), draw(channels), *(draw(sizes) for _ in range(spatial)))
            for _ in range(draw(st.integers(1, 5)))]


@given(shapes=kernels(), budget=st.sampled_from(BUDGETS))
def test_cells_always_divide_every_kernel_they_share(shapes, budget):
    cell = cells.cell_shape(shapes, budget)
    assert len(cell) == len(shapes[0]) and cell[2:] == (1,) * (len(cell) - 2)
    for shape in shapes:
        assert all(size % part == 0 for size, part in zip(shape, cell)), (shape, cell)
        assert cells.cells_in(shape, cell) * math.prod(cell) == math.prod(shape)


@given(shapes=kernels(), budget=st.sampled_from(BUDGETS))
def test_small_budgets_take_the_largest_common_divisor_up_to_half_the_gcd(shapes, budget):
    """Paper: c_e and f_e are the GCDs, halved for b < 1; an odd GCD has no exact half."""
    full = cells.cell_shape(shapes, 1.0)
    assert full[:2] == (reduce(math.gcd, (s[0] for s in shapes)), reduce(math.gcd, (s[1] for s in shapes)))
    if budget >= 1:
        assert cells.cell_shape(shapes, budget) == full
        return
    for gcd, part in zip(full[:2], cells.cell_shape(shapes, budget)[:2]):
        divisors_up_to_half = [d for d in range(1, gcd // 2 + 1) if gcd % d == 0] or [1]
        assert part == max(divisors_up_to_half)
        if gcd % 2 == 0:
            assert part == gcd // 2  # the paper's halving, exactly


@pytest.mark.parametrize("gcd, expected", [(1, 1), (2, 1), (3, 1), (9, 3), (45, 15), (49, 7), (64, 32), (96, 48),
                                           (97, 1), (105, 35)])
def test_half_divisor(gcd, expected):
    assert cells.half_divisor(gcd) == expected


def test_r2plus1d_input_channels_at_half_budget():
    """r2plus1d_18's 45 input channels: half would be 22, which divides no kernel; 15 does."""
    assert cells.cell_shape([(144, 45, 1, 3, 3), (64, 45, 3, 1, 1)], 0.5) == (8, 15, 1, 1, 1)


# --- the one-to-one walk: every budget fits its warehouse -----------------------------------
budgets = st.floats(min_value=0, max_value=4, exclude_min=True, allow_nan=False, allow_infinity=False)


@given(mixtures=st.lists(st.integers(1, 300), min_size=1, max_size=8), budget=budgets | st.sampled_from(BUDGETS))
def test_the_walk_fits_the_warehouse_at_every_budget(mixtures, budget):
    """Layer shares floor(b * m) never add up to more than n = floor(b * m_t) (floors add up)."""
    n = cells.warehouse_size(sum(mixtures), budget)
    offset = 0
    for m in mixtures:
        share = cells.cells_handed_out(m, budget)
        assert share == cells.local_cells(m, budget)  # the saver's local range is the layer's share
        started = [c for c in cells.one_to_one_cells(m, offset, budget) if c is not None]
        assert len(started) == len(set(started)) == (m if budget >= 1 else share)
        assert all(offset <= c < offset + share for c in started)
        offset += share
    assert offset <= n and cells.cells_for(sum(mixtures), budget) - offset < len(mixtures)  # spares < layers


@pytest.mark.parametrize("k", [1, 2, 3, 4, 5, 8])
@pytest.mark.parametrize("runs", [1, 7, 18])
@pytest.mark.parametrize("offset", [0, 5])
def test_small_budget_walk_is_the_references_for_b_1_over_k(k, runs, offset):
    """b = 1/k, m a multiple of k: mixture i starts on the next cell iff i mod k == (i div k) mod k."""
    m, expected, next_cell = k * runs, [], offset
    for i in range(k * runs):
        expected.append(next_cell if i % k == (i // k) % k else None)
        next_cell += expected[-1] is not None
    assert cells.one_to_one_cells(m, offset, 1 / k) == expected
    assert cells.cells_handed_out(m, 1 / k) == runs


@pytest.mark.parametrize("budget", [1, 2, 3, 4])
def test_integer_budget_walk_steps_b_cells_per_mixture(budget):
    assert cells.one_to_one_cells(9, 7, budget) == [7 + budget * i for i in range(9)]
    assert cells.cells_handed_out(9, budget) == 9 * budget


def test_fractional_budget_above_one_deals_every_cell_to_a_mixture():
    """b = 1.5: mixtures start 1 or 2 cells apart, and the share is all of floor(1.5 m)."""
    assert cells.one_to_one_cells(4, 0, 1.5) == [0, 1, 3, 4]
    assert cells.cells_handed_out(4, 1.5) == 6


@pytest.mark.parametrize("m, budget, share", [(81, 0.5, 40), (9, 0.5, 4), (56, 0.4, 22), (10, 0.75, 7),
                                              (3, 0.25, 0)])
def test_shares_where_the_references_walk_outgrows_n(m, budget, share):
    """The reference's walk (one cell per int(1/b) mixtures) would hand out 41 of n = 40 cells
    at m = 81, b = 1/2 (r2plus1d's odd GCD 45 gives such m), 28 of 22 at b = 0.4, 10 of 7 at 3/4."""
    assert cells.cells_handed_out(m, budget) == share == cells.cells_for(m, budget)
    started = cells.one_to_one_cells(m, 0, budget)
    assert [c for c in started if c is not None] == list(range(share))


@pytest.mark.parametrize("m_t, budget, n", [(49, 1 / 49, 1), (100, 0.29, 29), (224, 0.4, 89), (30, 0.1, 3),
                                            (3, 1 / 3, 1), (224, 0.25, 56), (188, 0.5, 94), (27, 4, 108)])
def test_budget_is_read_as_the_fraction_it_spells(m_t, budget, n):
    """Floats would give int(49 * (1/49)) = 0 and int(100 * 0.29) = 28; the paper's budgets are exact."""
    assert cells.warehouse_size(m_t, budget) == n
