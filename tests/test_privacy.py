"""Nearest-neighbour privacy checks: vectorised distances = a brute-force double loop (across
chunk boundaries), copies are flagged, independent smooth images are not, NNDR of duplicates,
a seeded copy threshold and bad input."""
from __future__ import annotations

import math

import numpy as np
import pytest
from scipy.ndimage import gaussian_filter

from nnunet_sddm.evaluation.privacy import (Neighbours, copy_threshold, nearest_neighbours, nndr,
                                            privacy_flags)
from nnunet_sddm.utilities.errors import SDDMError


def smooth_images(n: int, seed: int, size: int = 64) -> np.ndarray:
    """``n`` Gaussian-filtered white-noise images (sigma 3 px), each min-max scaled to [0, 1],
    flattened: ``(n, size * size)``."""
    rng = np.random.default_rng(seed)
    out = np.empty((n, size * size))
    for i in range(n):
        img = gaussian_filter(rng.normal(size=(size, size)), sigma=3.0, mode="wrap")
        out[i] = ((img - img.min()) / (img.max() - img.min())).ravel()
    return out


def brute_force(q: np.ndarray, r: np.ndarray, k: int):
    d = np.empty((q.shape[0], r.shape[0]))
    for i in range(q.shape[0]):
        for j in range(r.shape[0]):
            d[i, j] = math.sqrt(sum((a - b) ** 2 for a, b in zip(q[i], r[j])))
    order = np.argsort(d, axis=1)[:, :k]
    return np.take_along_axis(d, order, axis=1), order


@pytest.mark.parametrize("k,chunk", [(1, 1024), (2, 3), (3, 7), (5, 1)])
def test_distances_equal_brute_force(k, chunk):
    rng = np.random.default_rng(3)
    q, r = rng.normal(size=(17, 6)), rng.normal(size=(11, 6))
    dist, idx = brute_force(q, r, k)
    nb = nearest_neighbours(q, r, k=k, chunk=chunk)
    assert nb.distance.shape == nb.index.shape == (17, k)
    assert nb.distance.dtype == np.float64 and nb.index.dtype == np.int64
    np.testing.assert_allclose(nb.distance, dist, rtol=0, atol=1e-10)
    np.testing.assert_array_equal(nb.index, idx)
    assert (np.diff(nb.distance, axis=1) >= 0).all()


def test_k_equal_to_reference_rows_and_rms_scale():
    rng = np.random.default_rng(4)
    q, r = rng.uniform(size=(5, 9)), rng.uniform(size=(3, 9))
    dist, idx = brute_force(q, r, 3)
    nb = nearest_neighbours(q, r, k=3, rms=True)
    np.testing.assert_allclose(nb.distance, dist / 3.0, rtol=0, atol=1e-12)
    np.testing.assert_array_equal(nb.index, idx)
    assert nb.rms


def test_reference_as_queries_are_all_copies():
    ref = smooth_images(40, seed=0)
    nb = nearest_neighbours(ref, ref, k=2, chunk=16, rms=True)
    assert (nb.distance[:, 0] == 0).all()
    np.testing.assert_array_equal(nb.index[:, 0], np.arange(40))
    flags = privacy_flags(nb, copy_threshold(ref))
    assert flags.likely_copy.all() and flags.copy_fraction == 1.0
    assert flags.memorised.all() and flags.memorised_fraction == 1.0


def test_noisy_copy_flagged_independent_draw_not():
    ref = smooth_images(60, seed=1)
    tau = copy_threshold(ref)
    assert 0.015 < tau < 0.025
    rng = np.random.default_rng(9)
    noisy = np.clip(ref[:20] + rng.normal(0, 0.01, size=ref[:20].shape), 0, 1)
    copies = privacy_flags(nearest_neighbours(noisy, ref, rms=True), tau)
    assert copies.likely_copy.all()
    np.testing.assert_array_equal(nearest_neighbours(noisy, ref).index[:, 0], np.arange(20))
    fresh = smooth_images(60, seed=2)
    flags = privacy_flags(nearest_neighbours(fresh, ref, rms=True), tau)
    assert flags.copy_fraction < 0.05
    assert flags.memorised_fraction < 0.05


def test_nndr_of_exact_duplicates_is_zero():
    ref = smooth_images(10, seed=5)
    ref = np.vstack([ref, ref[3]])  # row 3 twice
    queries = ref[[3, 0]]
    nb = nearest_neighbours(queries, ref, rms=True)
    assert nb.distance[0, 0] == 0 and nb.distance[0, 1] == 0
    assert set(nb.index[0]) == {3, 10}
    np.testing.assert_array_equal(nndr(nb), [0.0, 0.0])
    np.testing.assert_array_equal(nb.nndr, [0.0, 0.0])
    assert privacy_flags(nb, 0.0).memorised.all()
    half = Neighbours(distance=np.array([[1.0, 2.0], [3.0, 3.0]]), index=np.zeros((2, 2), np.int64))
    np.testing.assert_array_equal(nndr(half), [0.5, 1.0])
    flags = privacy_flags(half, 1.0, nndr_limit=0.6)
    np.testing.assert_array_equal(flags.likely_copy, [True, False])  # d1 <= tau, inclusive
    np.testing.assert_array_equal(flags.memorised, [True, False])


def test_copy_threshold_seeded():
    ref = smooth_images(30, seed=6)
    assert copy_threshold(ref, seed=4) == copy_threshold(ref, seed=4)
    assert copy_threshold(ref, seed=4) != copy_threshold(ref, seed=5)
    assert copy_threshold(ref, noise_sd=0.05, n_pairs=8) > copy_threshold(ref, noise_sd=0.02, n_pairs=8)


@pytest.mark.parametrize("call,match", [
    (lambda: nearest_neighbours(np.zeros(4), np.zeros((3, 4))), "queries"),
    (lambda: nearest_neighbours(np.zeros((2, 4)), np.zeros((3, 5))), "features"),
    (lambda: nearest_neighbours(np.zeros((2, 4)), np.zeros((1, 4)), k=2), "reference: has 1 rows"),
    (lambda: nearest_neighbours(np.zeros((2, 4)), np.zeros((3, 4)), k=0), "k:"),
    (lambda: nearest_neighbours(np.zeros((2, 4)), np.zeros((3, 4)), chunk=0), "chunk:"),
    (lambda: nearest_neighbours(np.full((2, 4), np.nan), np.zeros((3, 4))), "NaN"),
    (lambda: copy_threshold(np.full((3, 4), 2.0)), r"\[0, 1\]"),
    (lambda: copy_threshold(np.zeros((3, 4)), noise_sd=0), "noise_sd"),
    (lambda: copy_threshold(np.zeros((3, 4)), n_pairs=0), "n_pairs"),
    (lambda: nndr(nearest_neighbours(np.zeros((2, 4)), np.zeros((3, 4)), k=1)), "k >= 2"),
    (lambda: privacy_flags(nearest_neighbours(np.zeros((2, 4)), np.zeros((3, 4))), -1.0), "copy_threshold"),
    (lambda: privacy_flags(nearest_neighbours(np.zeros((2, 4)), np.zeros((3, 4))), 0.1, nndr_limit=0), "nndr_limit"),
])
def test_bad_input(call, match):
    with pytest.raises(SDDMError, match=match):
        call()
