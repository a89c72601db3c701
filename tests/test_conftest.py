"""The comparison helpers of conftest.py themselves: what they let through and what they reject."""

from __future__ import annotations

import math
import re

import pytest
import torch
from conftest import assert_close, assert_equal

NAN, INF = math.nan, math.inf

PASSES = {
    # id: (actual, expected, atol, rtol)
    "equal": ([1.0, -2.5], [1.0, -2.5], 0.0, 0.0),
    "within-atol": ([1.0 + 1e-7], [1.0], 1e-6, 0.0),
    "within-rtol": ([1000.001], [1000.0], 0.0, 1e-5),
    "equal-infs": ([INF, -INF], [INF, -INF], 0.0, 0.0),
    "equal-infs-with-tolerance": ([INF], [INF], 1e-3, 1e-3),
    "nan-in-both-places": ([NAN, 1.0], [NAN, 1.0], 0.0, 0.0),
}

FAILS = {
    # id: (actual, expected, atol, rtol, worst index)
    "nan-vs-number": ([0.5, NAN], [0.5, 0.5], 0.0, 0.0, (1,)),
    "number-vs-nan": ([0.5, 0.5], [0.5, NAN], 0.0, 0.0, (1,)),
    "number-vs-nan-any-tolerance": ([0.5], [NAN], 1.0, 1.0, (0,)),
    "inf-vs-finite": ([1.0, INF], [1.0, 1.0], 1.0, 1.0, (1,)),
    "finite-vs-inf": ([1.0, 1.0], [1.0, INF], 1.0, 1.0, (1,)),
    "minus-inf-vs-inf": ([-INF], [INF], 0.0, 0.0, (0,)),
    "beyond-atol": ([1.0, 1.0 + 1e-5], [1.0, 1.0], 1e-6, 0.0, (1,)),
    "beyond-rtol": ([1000.1], [1000.0], 0.0, 1e-5, (0,)),
}


@pytest.mark.parametrize("actual, expected, atol, rtol", PASSES.values(), ids=PASSES.keys())
def test_assert_close_passes(actual, expected, atol, rtol):
    assert_close("x", torch.tensor(actual), torch.tensor(expected), atol=atol, rtol=rtol)


@pytest.mark.parametrize("actual, expected, atol, rtol, worst", FAILS.values(), ids=FAILS.keys())
def test_assert_close_fails(actual, expected, atol, rtol, worst):
    pattern = rf"^x: 1 of {len(actual)} elements .* worst at index {re.escape(str(worst))}"
    with pytest.raises(AssertionError, match=pattern):
        assert_close("x", torch.tensor(actual), torch.tensor(expected), atol=atol, rtol=rtol)


def test_assert_close_names_the_worst_of_several():
    actual = torch.tensor([[1.0, 2.0], [3.5, 4.01]])
    with pytest.raises(AssertionError, match=r"2 of 4 elements \(50.00%\) .* index \(1, 0\): actual 3.5, expected 3.0"):
        assert_close("grid", actual, torch.tensor([[1.0, 2.0], [3.0, 4.0]]), atol=1e-3)


def test_assert_close_rejects_shape_mismatch():
    with pytest.raises(AssertionError, match="shape"):
        assert_close("x", torch.zeros(3), torch.zeros(1, 3))


def test_assert_equal_is_bitwise_and_checks_dtype():
    assert_equal("x", torch.tensor([1.0, INF]), torch.tensor([1.0, INF]))
    with pytest.raises(AssertionError, match="exceed atol=0"):
        assert_equal("x", torch.tensor([1.0]), torch.tensor([1.0 + 2**-20]))
    with pytest.raises(AssertionError, match="dtype"):
        assert_equal("x", torch.tensor([1.0]), torch.tensor([1.0], dtype=torch.float64))
