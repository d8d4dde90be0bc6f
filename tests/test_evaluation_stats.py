"""paired_bootstrap: known answers (identical arrays, constant shift), an exactly enumerable
bootstrap distribution, the normal approximation, reproducibility and errors."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from contrastkit.evaluation import paired_bootstrap


def test_identical_arrays():
    a = np.random.default_rng(0).random(40)
    r = paired_bootstrap(a, a.copy(), n_resamples=500)
    assert r["mean_diff"] == 0.0 and r["low"] == 0.0 and r["high"] == 0.0 and r["p_value"] == 1.0


def test_constant_shift():
    a = np.random.default_rng(1).random(30)
    r = paired_bootstrap(a, a + 0.1, n_resamples=999)
    assert r["mean_diff"] == pytest.approx(0.1, abs=1e-12)
    assert r["low"] == pytest.approx(0.1, abs=1e-12) and r["high"] == pytest.approx(0.1, abs=1e-12)
    assert r["p_value"] == pytest.approx(1 / 1000)  # the smallest a finite resample can give
    r = paired_bootstrap(a + 0.1, a, n_resamples=999)
    assert r["mean_diff"] == pytest.approx(-0.1, abs=1e-12) and r["p_value"] == pytest.approx(1 / 1000)


def test_matches_enumerated_bootstrap_distribution():
    # d = (0, 0, 3): all 27 equally likely resamples enumerated exactly
    a, b = np.zeros(3), np.array([0.0, 0.0, 3.0])
    d = b - a
    sums = np.array([sum(c) for c in itertools.product(d, repeat=3)])
    means = sums / 3
    centred = d - d.mean()
    null = np.array([sum(c) for c in itertools.product(centred, repeat=3)]) / 3
    p_exact = np.mean(np.abs(null) >= abs(d.mean()) - 1e-12)
    r = paired_bootstrap(a, b, n_resamples=200_000, confidence=0.9, seed=3)
    assert r["mean_diff"] == pytest.approx(1.0)
    assert r["p_value"] == pytest.approx(p_exact, abs=0.005)
    # percentile interval: the 5% / 95% quantiles of the 27-point distribution
    assert r["low"] == pytest.approx(np.quantile(means, 0.05), abs=1e-9)
    assert r["high"] == pytest.approx(np.quantile(means, 0.95), abs=1e-9)


def test_normal_approximation_width():
    rng = np.random.default_rng(4)
    a = rng.random(400)
    b = a + rng.normal(0.02, 0.2, size=400)
    d = b - a
    r = paired_bootstrap(a, b, n_resamples=20_000, seed=5)
    se = d.std() / np.sqrt(d.size)  # the bootstrap standard error of the mean (population sd)
    assert r["high"] - r["low"] == pytest.approx(2 * 1.959964 * se, rel=0.05)
    assert r["low"] < r["mean_diff"] < r["high"]


def test_reproducible_and_chunk_independent(monkeypatch):
    rng = np.random.default_rng(6)
    a, b = rng.random(50), rng.random(50)
    r1 = paired_bootstrap(a, b, n_resamples=3000, seed=11)
    assert paired_bootstrap(a, b, n_resamples=3000, seed=11) == r1
    assert paired_bootstrap(a, b, n_resamples=3000, seed=12) != r1
    import contrastkit.evaluation.stats as stats

    monkeypatch.setattr(stats, "_CHUNK_ENTRIES", 7 * 50)  # 7 resamples per chunk: same stream
    assert paired_bootstrap(a, b, n_resamples=3000, seed=11) == r1


def test_errors():
    with pytest.raises(ValueError, match="same length"):
        paired_bootstrap(np.zeros(3), np.zeros(4))
    with pytest.raises(ValueError, match="empty"):
        paired_bootstrap(np.zeros(0), np.zeros(0))
    with pytest.raises(ValueError, match="entry 1"):
        paired_bootstrap(np.array([0.0, np.nan]), np.zeros(2))
    with pytest.raises(ValueError, match="confidence"):
        paired_bootstrap(np.zeros(2), np.ones(2), confidence=95)
    with pytest.raises(ValueError, match="n_resamples"):
        paired_bootstrap(np.zeros(2), np.ones(2), n_resamples=0)
