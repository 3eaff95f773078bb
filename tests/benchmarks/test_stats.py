"""benchmarks/stats.py against hand-worked cases and a known distribution."""
from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
from stats import paired_diff_ci, pope_metrics  # noqa: E402


def test_identical_methods_have_a_zero_width_ci():
    a = [1, 0, 1, 1, 0]
    ci = paired_diff_ci(a, a)
    assert ci["diff"] == ci["low"] == ci["high"] == 0 and not ci["excludes_zero"]


def test_constant_difference_is_exact():
    # a right everywhere b is wrong: every resample's difference is 1.
    ci = paired_diff_ci([1] * 8, [0] * 8)
    assert ci["diff"] == ci["low"] == ci["high"] == 1 and ci["excludes_zero"]


def test_hand_worked_diff_and_sign():
    ci = paired_diff_ci([1, 1, 1, 0], [1, 0, 0, 0])
    assert ci["diff"] == pytest.approx(0.5) and ci["low"] <= 0.5 <= ci["high"]
    flipped = paired_diff_ci([1, 0, 0, 0], [1, 1, 1, 0])
    assert flipped["diff"] == pytest.approx(-0.5)


def test_ci_matches_the_normal_width_of_a_known_distribution():
    # Per-question differences +1 / 0 / -1 with p = 0.3 / 0.5 / 0.2: mean 0.1, sd sqrt(0.49) = 0.7.
    rng = np.random.default_rng(1)
    d = rng.choice([1, 0, -1], size=4000, p=[0.3, 0.5, 0.2])
    a, b = (d == 1).astype(int), (d == -1).astype(int)
    ci = paired_diff_ci(a, b)
    half = 1.96 * 0.7 / np.sqrt(4000)
    assert ci["high"] - ci["low"] == pytest.approx(2 * half, rel=0.1)
    assert ci["low"] < 0.1 < ci["high"] and ci["excludes_zero"]


def test_pairing_makes_the_ci_narrower_than_independent_errors():
    rng = np.random.default_rng(2)
    shared = rng.random(1000) < 0.6  # both right on the same easy questions
    a = shared | (rng.random(1000) < 0.05)
    ci = paired_diff_ci(a.astype(int), shared.astype(int))
    independent = 1.96 * np.sqrt(2 * 0.6 * 0.4 / 1000)
    assert ci["high"] - ci["low"] < independent


def test_ci_is_reproducible_and_rejects_unpaired_input():
    a, b = [1, 0, 1, 0, 1, 1], [0, 0, 1, 1, 0, 1]
    assert paired_diff_ci(a, b) == paired_diff_ci(a, b)
    with pytest.raises(ValueError):
        paired_diff_ci([1, 0], [1])


def test_pope_metrics_hand_worked():
    # truth:  Y Y Y N N N ; answer: Y Y N Y N N -> tp 2, fn 1, fp 1, tn 2
    m = pope_metrics([1, 1, 0, 1, 0, 0], [1, 1, 1, 0, 0, 0])
    assert m["accuracy"] == pytest.approx(4 / 6) and m["precision"] == pytest.approx(2 / 3)
    assert m["recall"] == pytest.approx(2 / 3) and m["f1"] == pytest.approx(2 / 3)
    assert m["yes_ratio"] == pytest.approx(0.5)
    always_yes = pope_metrics([1] * 4, [1, 1, 0, 0])
    assert always_yes["recall"] == 1 and always_yes["precision"] == 0.5 and always_yes["yes_ratio"] == 1
    never = pope_metrics([0] * 4, [1, 1, 0, 0])
    assert never["precision"] == 0 and never["f1"] == 0 and never["accuracy"] == 0.5
