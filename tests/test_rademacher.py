"""The Rademacher family (docs/SPEC.md section 8) in the reference: the spec vectors, an independent
per-element oracle built on the Philox op, the apply rule, and the statistics of the signs.

The statistics use fixed seeds, so they are deterministic; the bounds are several standard errors wide.
"""
import json
import math
import os

import numpy as np
import pytest
import torch

import kseed_kernels as kk
from kseed_kernels import _spec as S
from kseed_kernels import torch_reference as R

DATA = os.path.join(os.path.dirname(__file__), "data")
N = 1 << 20


def _oracle(seed, stream, i):
    """r(seed, stream, i) element by element from the spec's words: an implementation independent of
    the reference's vectorised bit unpacking."""
    b, p = i >> 7, i & 127
    counter = torch.tensor([[b & S.MASK32, b >> 32, stream, S.COUNTER_RADEMACHER]])
    key = torch.tensor([[seed & S.MASK32, seed >> 32]])
    word = int(kk.philox4x32_10(counter, key)[0, p >> 5])
    return -1.0 if (word >> (p & 31)) & 1 else 1.0


def test_spec_vectors():
    with open(os.path.join(DATA, "spec_vectors_rademacher.json")) as fh:
        doc = json.load(fh)
    assert doc["spec_version"] == 2 and len(doc["vectors"]) == 240
    for row in doc["vectors"]:
        r = R.rademacher(int(row["seed"]), len(row["signs"]), row["stream"], row["offset"])
        want = torch.tensor([1.0 if c == "+" else -1.0 for c in row["signs"]])
        assert torch.equal(r, want), row


def test_text_form_matches_json():
    with open(os.path.join(DATA, "spec_vectors_rademacher.json")) as fh:
        rows = json.load(fh)["vectors"]
    with open(os.path.join(DATA, "spec_vectors_rademacher.txt")) as fh:
        lines = [ln.split() for ln in fh if not ln.startswith("#")]
    assert [[r["seed"], str(r["stream"]), str(r["offset"]), r["signs"]] for r in rows] == lines


@pytest.mark.parametrize("trial", range(3))
def test_reference_matches_element_oracle(trial):
    g = np.random.default_rng(1000 + trial)
    seed = int(g.integers(0, 1 << 64, dtype=np.uint64))
    stream = int(g.integers(0, 1 << 32))
    offset = int(g.integers(0, 1 << 62)) if trial else int(g.integers(0, 1 << 10))
    n = int(g.integers(200, 400))
    r = R.rademacher(seed, n, stream, offset)
    idx = sorted(set([0, n - 1] + g.integers(0, n, 40).tolist()))
    for j in idx:
        assert r[j].item() == _oracle(seed, stream, offset + j), (seed, stream, offset, j)


def test_offsets_are_consistent_and_signbits_match():
    whole = R.rademacher(77, 1000, 3, 0)
    for off in (1, 31, 32, 127, 128, 129, 500):
        assert torch.equal(R.rademacher(77, 1000 - off, 3, off), whole[off:])
    bits = R.rademacher_signbits(77, 1000, 3, 0)
    assert torch.equal(whole, (1 - 2 * bits).float())


def test_values_and_balance():
    for seed, stream in ((0, 0), (123456789, 7), ((1 << 64) - 1, (1 << 32) - 1)):
        r = R.rademacher(seed, N, stream).numpy()
        assert set(np.unique(r).tolist()) == {-1.0, 1.0}
        # the mean of N fair signs has standard error 1/sqrt(N)
        assert abs(r.mean()) < 5 / math.sqrt(N), (seed, stream)


def _corr(a, b):
    return float(np.corrcoef(a, b)[0, 1])


def test_no_correlation_across_elements_bits_blocks():
    r = R.rademacher(99, N, 1).numpy()
    lim = 5 / math.sqrt(N)
    assert abs(_corr(r[:-1], r[1:])) < lim                   # adjacent elements
    blocks = r.reshape(-1, 128)
    lim_b = 5 / math.sqrt(blocks.shape[0])
    # every bit position is balanced, and neighbouring positions (within a word and across the
    # word boundaries 31|32, 63|64, 95|96) are uncorrelated
    assert np.abs(blocks.mean(axis=0)).max() < lim_b
    for p in (0, 30, 31, 63, 95, 126):
        assert abs(_corr(blocks[:, p], blocks[:, p + 1])) < lim_b, p
    for p in (0, 5, 77):                                    # the same position in consecutive blocks
        assert abs(_corr(blocks[:-1, p], blocks[1:, p])) < lim_b, p
    # the four words of a block: a whole word's popcount behaves like 32 fair coins
    words = blocks.reshape(-1, 4, 32).sum(axis=-1)
    assert abs(words.var() - 32) < 5 * 32 * math.sqrt(2 / words.size)


def test_no_correlation_across_seeds_streams_and_families():
    lim = 5 / math.sqrt(N)
    base = R.rademacher(1000, N, 0).numpy()
    for other in (R.rademacher(1001, N, 0), R.rademacher(1000 + (1 << 32), N, 0),
                  R.rademacher(1000, N, 1), R.rademacher(1000, N, 1 << 31)):
        assert abs(_corr(base, other.numpy())) < lim
    # a domain of its own: not the sign of the Gaussian of the same (seed, stream)
    z = R.gaussian(1000, N, 0).numpy()
    assert abs(_corr(base, np.sign(z))) < lim


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("rounding", ["nearest", "stochastic"])
def test_apply_rule(dtype, rounding):
    g = torch.Generator().manual_seed(5)
    n, K, stream = 777, 9, 0xDEADBEEF
    w = torch.randn(n, generator=g).to(dtype)
    seeds = [int(x) for x in torch.randint(0, 1 << 62, (K,), generator=g)] + [(1 << 64) - 3]
    coefs = torch.randn(K + 1, generator=g) * 1e-2
    key = 0x1234567890ABCDEF if rounding == "stochastic" else 0
    got = R.apply_seeds_(w.clone(), seeds, coefs, stream, rounding, key, noise="rademacher")
    # the rule written out: exact sign flips summed in float32 in ascending k, one rounding
    acc = torch.zeros(n, dtype=torch.float32)
    for s, c in zip(seeds, coefs.tolist()):
        r = R.rademacher(s, n, stream)
        acc = acc + torch.where(r < 0, -torch.tensor(c, dtype=torch.float32),
                                torch.tensor(c, dtype=torch.float32))
    v = w.float() + acc
    if dtype == torch.float32:
        want = v
    elif rounding == "stochastic":
        want = R.round_stochastic(v, R.random_bits(key, n, stream), dtype)
    else:
        want = v.to(dtype)
    assert torch.equal(got.view(torch.int16 if dtype != torch.float32 else torch.int32),
                       want.view(torch.int16 if dtype != torch.float32 else torch.int32))
    assert not torch.equal(got.float(), w.float())  # the update is not a no-op
    # the Gaussian family is untouched by the new keyword
    gz = R.apply_seeds_(w.clone(), seeds, coefs, stream, rounding, key)
    assert torch.equal(gz, R.apply_seeds_(w.clone(), seeds, coefs, stream, rounding, key,
                                          noise="gaussian"))
    assert not torch.equal(gz, got)
