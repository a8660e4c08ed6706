"""Statistics of z: moments, Kolmogorov-Smirnov, and correlations between elements, lanes, seeds, streams.

The inputs are fixed seeds, so these tests are deterministic; the bounds are several standard errors wide.
"""
import math

import numpy as np
import pytest
from scipy import stats

import kseed_kernels

N = 1 << 20


def _z(seed, stream=0, n=N, offset=0):
    return kseed_kernels.gaussian(seed, n, stream=stream, offset=offset).double().numpy()


@pytest.mark.parametrize("seed,stream", [(0, 0), (123456789, 7), ((1 << 64) - 1, (1 << 32) - 1)])
def test_moments(seed, stream):
    z = _z(seed, stream)
    se = 1 / math.sqrt(N)
    assert abs(z.mean()) < 5 * se
    assert abs(z.var() - 1) < 5 * math.sqrt(2) * se
    assert abs(stats.skew(z)) < 5 * math.sqrt(6) * se
    assert abs(stats.kurtosis(z)) < 5 * math.sqrt(24) * se
    assert np.abs(z).max() < 5.78


@pytest.mark.parametrize("seed", [1, 2 ** 40 + 5])
def test_ks_whole_and_per_lane(seed):
    z = _z(seed, 3)
    assert stats.kstest(z, "norm").pvalue > 1e-4
    for lane in range(4):
        assert stats.kstest(z[lane::4], "norm").pvalue > 1e-4, lane


def _corr(a, b):
    return float(np.corrcoef(a, b)[0, 1])


def test_adjacent_elements_and_lanes_uncorrelated():
    z = _z(99, 1)
    lim = 5 / math.sqrt(N // 4)
    assert abs(_corr(z[:-1], z[1:])) < 5 / math.sqrt(N)
    lanes = z.reshape(-1, 4)
    for a in range(4):
        for b in range(a + 1, 4):
            assert abs(_corr(lanes[:, a], lanes[:, b])) < lim, (a, b)
    # lanes of one Box-Muller pair are uncorrelated in their squares too (independent normals)
    assert abs(_corr(lanes[:, 0] ** 2, lanes[:, 2] ** 2)) < lim
    # consecutive blocks
    assert abs(_corr(lanes[:-1, 3], lanes[1:, 0])) < lim


def test_seeds_and_streams_uncorrelated():
    lim = 5 / math.sqrt(N)
    base = _z(1000, 0)
    for other in (_z(1001, 0), _z(1000 + (1 << 32), 0), _z(1000, 1), _z(1000, 1 << 31),
                  _z(1000, 0, offset=4)):
        assert abs(_corr(base, other)) < lim


def test_offset_into_another_block_is_not_a_copy():
    a = _z(5, 0, n=4096)
    b = _z(5, 0, n=4096, offset=1 << 32)  # block index past 2^30: high counter word used
    assert not np.array_equal(a, b)
