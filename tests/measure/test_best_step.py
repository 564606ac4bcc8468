"""The best-step rule on hand-made tables: tolerance, bound, ties, unknown drift, and every step failing the bound."""
import math

import pytest

from cat_train.measure.best_step import pick_best_step


def table(*rows):
    return [dict(zip(("step", "IS", "keep_drift"), r)) for r in rows]


ROWS = table((100, 0.50, 0.001), (200, 0.69, 0.004), (300, 0.70, 0.009), (400, 0.71, 0.020))


def test_earliest_step_near_the_best_is():
    b = pick_best_step(ROWS, is_tolerance=0.02)
    assert (b.step, b.IS, b.best_IS, b.within_bound) == (200, 0.69, 0.71, True)
    assert pick_best_step(ROWS, is_tolerance=0.0).step == 400
    assert pick_best_step(ROWS, is_tolerance=0.25).step == 100
    assert "no keep-drift bound" in b.reason


def test_drift_bound_moves_the_pick_later_never_to_a_far_is():
    assert pick_best_step(ROWS, is_tolerance=0.02, max_keep_drift=0.01).step == 200
    assert pick_best_step(ROWS, is_tolerance=0.25, max_keep_drift=0.003).step == 100
    reordered = table((100, 0.70, 0.05), (200, 0.705, 0.002), (300, 0.71, 0.03))  # drift need not grow with steps
    b = pick_best_step(reordered, is_tolerance=0.02, max_keep_drift=0.01)
    assert b.step == 200 and b.keep_drift == 0.002 and b.within_bound and "0.002 <= 0.01" in b.reason


def test_ties_in_is_go_to_the_earliest_step_and_row_order_does_not_matter():
    tied = table((300, 0.6, 0.01), (100, 0.6, 0.01), (200, 0.6, 0.01))
    assert pick_best_step(tied, is_tolerance=0.0).step == 100
    assert pick_best_step(tied, is_tolerance=0.0, max_keep_drift=0.01).step == 100  # the bound is inclusive


def test_all_steps_fail_the_bound_gives_the_least_drift_near_the_best_and_says_so():
    b = pick_best_step(ROWS, is_tolerance=0.02, max_keep_drift=0.001)
    # 100 is not near the best IS: never a fallback
    assert (b.step, b.keep_drift, b.within_bound) == (200, 0.004, False)
    assert "no step near the best IS" in b.reason and "<= 0.001" in b.reason
    tie = table((100, 0.7, 0.02), (200, 0.7, 0.01), (300, 0.7, 0.01))
    assert pick_best_step(tie, max_keep_drift=0.0).step == 200  # least drift, earliest on a tie


def test_unknown_values():
    rows = table((100, float("nan"), 0.0), (200, 0.6, float("nan")), (300, 0.59, 0.5), (400, None, 0.0))
    b = pick_best_step(rows, max_keep_drift=1.0)
    assert b.step == 300 and b.best_IS == 0.6  # 100/400: no IS; 200: drift unknown, cannot pass the bound
    assert pick_best_step(rows).step == 200  # without a bound, drift is not asked for
    only_nan = table((100, 0.6, math.nan), (200, 0.6, None))
    b = pick_best_step(only_nan, max_keep_drift=1.0)
    assert b.step == 100 and not b.within_bound and b.keep_drift is None and "no keep drift measured" in b.reason
    assert pick_best_step([{"step": 5, "IS": 0.3}]).to_dict()["step"] == 5


def test_errors_name_the_problem():
    with pytest.raises(ValueError, match="no step has a finite IS"):
        pick_best_step(table((100, math.nan, 0.0)))
    with pytest.raises(ValueError, match=r"lists a step twice \(\[100\]\)"):
        pick_best_step(table((100, 0.5, 0.0), (100, 0.6, 0.0)))
    with pytest.raises(ValueError, match="tolerance must be >= 0"):
        pick_best_step(ROWS, is_tolerance=-0.1)
    with pytest.raises(ValueError, match="keep-drift bound must be >= 0"):
        pick_best_step(ROWS, max_keep_drift=math.nan)
