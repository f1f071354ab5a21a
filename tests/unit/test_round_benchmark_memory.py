"""The round benchmark's memory slope: a least-squares line, or a stated absence."""

from __future__ import annotations

import math

import pandas as pd
import pytest

from benchmarks.round.memory import slope_per_round
from benchmarks.round.report import format_slope


def test_slope_is_the_least_squares_line_through_the_rounds():
    per_round = pd.DataFrame({"rounds_done": [2, 3, 4, 5], "pss_mb": [100.0, 103.0, 106.0, 109.0]})
    assert slope_per_round(per_round, "pss_mb") == pytest.approx(3.0, abs=1e-9)
    assert format_slope(slope_per_round(per_round, "pss_mb")) == "+3.00 MB/round"


def test_two_rounds_give_no_slope_and_say_so_instead_of_nan():
    per_round = pd.DataFrame({"rounds_done": [2, 3], "pss_mb": [100.0, 120.0]})
    assert math.isnan(slope_per_round(per_round, "pss_mb"))
    assert format_slope(slope_per_round(per_round, "pss_mb")) == "n/a (needs 3 measured rounds)"
