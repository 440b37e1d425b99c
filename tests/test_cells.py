"""The arithmetic of kwconvert.cells: cells are common dimension divisors of the kernels they tile."""
import math
from functools import reduce

import pytest
from hypothesis import given
from hypothesis import strategies as st

from kwconvert import cells

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
