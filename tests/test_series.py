"""Tests for kdsb.io.series: the spacing rule checked where a scan enters kdsb."""

from __future__ import annotations

import numpy as np
import pytest

from kdsb.errors import KdsbError
from kdsb.io.series import CTSeries, validate_spacing

BAD_SPACINGS = [(1.0, 1.0), (1.0, 0.0, 1.0), (1.0, -2.0, 1.0), (1.0, float("nan"), 1.0), "abc"]


@pytest.mark.parametrize("spacing", BAD_SPACINGS)
def test_bad_spacing_is_a_clear_error(spacing):
    with pytest.raises(KdsbError, match="expected spacing as 3 positive finite numbers"):
        validate_spacing(spacing)
    with pytest.raises(KdsbError, match="expected spacing as 3 positive finite numbers"):
        CTSeries(np.zeros((2, 2, 2), np.int16), spacing, (0.0, 0.0, 0.0), "uid")


def test_spacing_becomes_three_floats():
    assert validate_spacing(np.array([2.5, 1, 1], dtype=np.float32)) == (2.5, 1.0, 1.0)
    series = CTSeries(np.zeros((2, 2, 2), np.int16), [3, 0.5, 0.5], (0.0, 0.0, 0.0), "uid")
    assert series.spacing == (3.0, 0.5, 0.5)
    assert all(type(s) is float for s in series.spacing)
