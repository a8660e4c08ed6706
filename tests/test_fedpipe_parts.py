"""FedPipe's parts (kseed.fedpipe_parts): the quantized frozen base (bitsandbytes, LoRA from peft on
top), the |grad x weight| weight selection, per-client ranks and the SVD re-projection of adapters of
unequal ranks."""
import copy
import math
import sys

import pytest
import torch
from torch import nn

from kseed import fedpipe_parts as FP


@pytest.fixture(scope="module")
def embedded():
    from kseed.modeling import EMBEDDED_DIR, load_model
    model, _ = load_model(EMBEDDED_DIR)
    return model.eval()


def _ids(gen, vocab=512, n=2, t=12):
    return torch.randint(3, vocab, (n, t), generator=gen)


# ---------------------------------------------------------------------------------------------------
# Quantized frozen base

def test_default_modules_skip_the_tied_head(embedded):
    names = FP.linear_modules(embedded)
    assert "lm_head" not in names  # tied to the embedding: stays in full precision
    assert len(names) == 3 * 7 and "model.layers.0.self_attn.q_proj" in names
    with pytest.raises(ValueError, match="not an nn.Linear"):
        FP.linear_modules(embedded, ["model.norm"])
    with pytest.raises(ValueError, match="no module named"):
        FP.linear_modules(embedded, ["nope"])
    with pytest.raises(TypeError):
        FP.linear_modules(embedded, "model.layers.0.mlp.up_proj")


@pytest.mark.parametrize("bits", [0, 2, 16, 8.5, True, "8"])
def test_unsupported_bits_are_refused(bits):
    with pytest.raises(ValueError, match="bits must be 8, 4 or None"):
        FP.quantize_frozen(nn.Sequential(nn.Linear(4, 4)), bits)


def test_refused_inputs(monkeypatch):
    with pytest.raises(ValueError, match="float32 or bfloat16"):
        FP.quantize_frozen(nn.Sequential(nn.Linear(4, 4).double()), 8)
    with pytest.raises(ValueError, match="no nn.Linear"):
        FP.quantize_frozen(nn.Sequential(nn.ReLU()), 4)
    with monkeypatch.context() as mp:  # without the kseed[lora] extra
        mp.setitem(sys.modules, "bitsandbytes", None)
        mp.setattr(FP, "_INT8_CLASS", None)
        with pytest.raises(ImportError, match=r"kseed\[lora\]"):
            FP.quantize_frozen(nn.Sequential(nn.Linear(4, 4)), 4)
    pytest.importorskip("bitsandbytes")
    m = FP.quantize_frozen(nn.Sequential(nn.Linear(64, 64)), 8)
    with pytest.raises(ValueError, match="already quantized"):
        FP.quantize_frozen(m, 4, ["0"])


def test_none_changes_nothing(embedded):
    m = copy.deepcopy(embedded)
    assert FP.quantize_frozen(m, None) is m
    assert all(type(m.get_submodule(n)) is nn.Linear for n in FP.linear_modules(embedded))


# relative Frobenius error of the logits against fp32's on the embedded model, random tokens (measured
# 2026-12-03: int8 0.5 % to 0.9 %, NF4 8 % to 28 %: NF4 alone puts about 9 % relative error in each
# weight matrix, and three layers of width 96 compound it); the bounds leave room for fresh inputs
TOL = {8: 0.03, 4: 0.4}


@pytest.mark.parametrize("bits", [8, 4])
def test_quantized_logits_memory_and_lora_gradients(embedded, bits, gen, one_thread):
    pytest.importorskip("bitsandbytes")
    pytest.importorskip("peft")
    ids = _ids(gen)
    with torch.no_grad():
        ref = embedded(input_ids=ids).logits
    want = FP.frozen_bytes(embedded, bits)
    m = FP.quantize_frozen(copy.deepcopy(embedded), bits)
    names = FP.linear_modules(embedded)
    with torch.no_grad():
        got = m(input_ids=ids).logits
        m.train()
        got_train = m(input_ids=ids).logits
        m.eval()
        got_again = m(input_ids=ids).logits
    err = float((got - ref).norm() / ref.norm())
    assert 0 < err < TOL[bits], err
    # one weight-only path in both modes (bitsandbytes' own int8 layer quantizes the activations in eval)
    assert torch.equal(got, got_train) and torch.equal(got, got_again)

    # memory: the estimate is what the quantized model holds; the linear weights shrink ~4x / ~8x
    assert FP.stored_bytes(m) == want
    full_lin = sum(embedded.get_submodule(n).weight.numel() * 4 for n in names)  # no biases here
    q_lin = want - (FP.frozen_bytes(embedded, None) - full_lin)
    assert (3.5 if bits == 8 else 6.0) < full_lin / q_lin < (4.0 if bits == 8 else 8.0)

    # LoRA from peft on top: peft's bitsandbytes layers; gradients reach every adapter and only them
    from peft import LoraConfig, get_peft_model
    for p in m.parameters():
        p.requires_grad_(False)
    pm = get_peft_model(m, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                                      init_lora_weights=False))
    layer = pm.base_model.model.model.layers[0].self_attn.q_proj
    assert type(layer).__module__ == "peft.tuners.lora.bnb"
    pm.train()
    out = pm(input_ids=ids).logits
    out.float().pow(2).mean().backward()
    trainable = {n: p for n, p in pm.named_parameters() if p.requires_grad}
    assert len(trainable) == 2 * 2 * 3 and all("lora_" in n for n in trainable)
    for n, p in trainable.items():
        assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0, n
    assert len(names) == 21


@pytest.mark.parametrize("bits", [8, 4])
def test_quantized_model_pickles_and_runs_in_bfloat16(bits, gen):
    pytest.importorskip("bitsandbytes")
    import pickle
    x = torch.randn(3, 64, generator=gen)
    m = FP.quantize_frozen(nn.Sequential(nn.Linear(64, 48), nn.ReLU(), nn.Linear(48, 16)), bits)
    y = m(x)
    m2 = pickle.loads(pickle.dumps(m))
    assert torch.equal(m2(x), y)
    mb = nn.Sequential(nn.Linear(64, 16)).to(torch.bfloat16)
    ref = mb(x.bfloat16()).float()
    got = FP.quantize_frozen(mb, bits)(x.bfloat16())
    assert got.dtype == torch.bfloat16
    assert float((got.float() - ref).norm() / ref.norm()) < TOL[bits]


def test_budget_to_bits(embedded):
    full, i8, i4 = (FP.frozen_bytes(embedded, b) for b in (None, 8, 4))
    assert full > i8 > i4
    assert FP.budget_to_bits(full, embedded) is None
    assert FP.budget_to_bits(full - 1, embedded) == 8
    assert FP.budget_to_bits(str(i8), embedded) == 8  # a Flower node-config value
    assert FP.budget_to_bits(i8 - 1, embedded) == 4
    assert FP.budget_to_bits(i4, embedded) == 4
    with pytest.raises(ValueError, match="below the 4-bit"):
        FP.budget_to_bits(i4 - 1, embedded)
    for bad in (-1, "lots", float("nan")):
        with pytest.raises(ValueError):
            FP.budget_to_bits(bad, embedded)


# ---------------------------------------------------------------------------------------------------
# Weight selection

class _Tiny(nn.Module):
    """y = big(x) + 1e-3 small(x) + dead(x) * 0: by construction big matters most, dead not at all."""

    def __init__(self):
        super().__init__()
        self.big, self.small, self.dead = nn.Linear(8, 4), nn.Linear(8, 4), nn.Linear(8, 4)

    def forward(self, x):
        return self.big(x) + 1e-3 * self.small(x) + 0 * self.dead(x)


def test_score_and_select_find_the_layer_that_matters(gen):
    torch.manual_seed(0)
    m = _Tiny()
    m.small.weight.requires_grad_(False)
    m.train()
    batches = [(torch.randn(16, 8, generator=gen), torch.randn(16, 4, generator=gen)) for _ in range(3)]

    def loss(model, b):
        return ((model(b[0]) - b[1]) ** 2).mean()

    s = FP.score_weights(m, batches, loss_fn=loss)
    assert set(s) == {"big", "small", "dead"}
    assert s["dead"] == 0.0 and s["big"] > 100 * s["small"] > 0
    assert FP.select_top(s, 0.34) == ["big", "small"]
    assert FP.select_top(s, 0.01) == ["big"]  # at least one
    assert FP.select_top(s, 1.0) == ["big", "small", "dead"]
    # state restored: requires_grad, .grad, train mode
    assert not m.small.weight.requires_grad and m.big.weight.requires_grad and m.training
    assert all(p.grad is None for p in m.parameters())
    # the score is the definition: sum over batches of |grad x weight|
    want = 0.0
    for b in batches:
        g, = torch.autograd.grad(loss(m, b), [m.big.weight])
        want += float((g.double() * m.big.weight.detach().double()).abs().sum())
    assert s["big"] == pytest.approx(want, rel=1e-12)
    assert FP.score_weights(m, batches, ["big"], loss) == {"big": s["big"]}


def test_score_weights_default_loss_on_the_embedded_model(embedded, gen, one_thread):
    ids = _ids(gen, t=10)
    labels = ids.clone()
    labels[:, :4] = -100
    cands = ["model.layers.0.mlp.up_proj", "model.layers.2.self_attn.v_proj"]
    s = FP.score_weights(embedded, [(ids, torch.ones_like(ids), labels)], cands)
    assert sorted(s) == cands and all(v > 0 for v in s.values())


def test_select_top_ties_and_refusals():
    assert FP.select_top({"b": 1.0, "a": 1.0, "c": 2.0}, 0.5) == ["c", "a"]
    assert FP.select_top({"b": 1.0, "a": 1.0}, 0.5) == ["a"]
    for bad in (0, -0.1, 1.5, float("nan")):
        with pytest.raises(ValueError):
            FP.select_top({"a": 1.0}, bad)
    with pytest.raises(ValueError, match="not finite"):
        FP.select_top({"a": float("nan")}, 1.0)
    with pytest.raises(ValueError, match="no scores"):
        FP.select_top({}, 1.0)
    with pytest.raises(ValueError, match="at least one"):
        FP.score_weights(_Tiny(), [], loss_fn=lambda m, b: m(b).sum())


# ---------------------------------------------------------------------------------------------------
# Per-client ranks and heterogeneous aggregation

def test_rank_for_budget():
    assert FP.rank_for_budget(0, 2, 16) == 2
    assert FP.rank_for_budget(1.0, 2, 16) == 16
    assert FP.rank_for_budget(5.0, 2, 16) == 16  # more than full: the largest rank
    assert FP.rank_for_budget(0.5, 2, 16) == 9
    assert FP.rank_for_budget("0.25", 4, 8) == 5  # a Flower node-config string
    assert FP.rank_for_budget(8 << 30, 4, 64, full=16 << 30) == 34  # bytes against a full budget
    ranks = [FP.rank_for_budget(b / 10, 1, 32) for b in range(11)]
    assert ranks == sorted(ranks) and ranks[0] == 1 and ranks[-1] == 32
    for bad in (-0.1, "x", float("inf"), True, None):
        with pytest.raises((TypeError, ValueError)):
            FP.rank_for_budget(bad)
    with pytest.raises(ValueError, match="above max_rank"):
        FP.rank_for_budget(0.5, 8, 4)
    with pytest.raises(ValueError, match="min_rank"):
        FP.rank_for_budget(0.5, 0, 4)


def _adapters(gen, ranks, out_f=24, in_f=20):
    return [(torch.randn(r, in_f, generator=gen), torch.randn(out_f, r, generator=gen)) for r in ranks]


def _mean_product(adapters, w, scales=None):
    scales = scales or [1.0] * len(adapters)
    tot = sum(w)
    return sum((wi / tot * s) * (B.double() @ A.double()) for (A, B), wi, s in zip(adapters, w, scales))


def test_equal_ranks_full_target_reproduce_the_weighted_mean_of_products(gen):
    ad = _adapters(gen, [3, 3])
    w = [10, 30]
    agg = FP.aggregate_heterogeneous(ad, w, target_rank=6)
    want = _mean_product(ad, w)
    assert torch.allclose(agg.delta, want, rtol=0, atol=1e-12)
    assert torch.allclose((agg.B.double() @ agg.A.double()), want, atol=1e-4)
    assert agg.rel_error < 1e-12
    assert agg.A.shape == (6, 20) and agg.B.shape == (24, 6) and agg.A.dtype == torch.float32


def test_heterogeneous_ranks_exact_when_target_covers_the_sum(gen):
    ad = _adapters(gen, [1, 2, 4])
    w, sc = [5, 1, 2], [16.0, 8.0, 4.0]  # peft's alpha / r with alpha 16
    agg = FP.aggregate_heterogeneous(ad, w, target_rank=7, scales=sc)
    want = _mean_product(ad, w, sc)
    got = agg.B.double() @ agg.A.double()
    assert float((got - want).norm() / want.norm()) < 1e-6
    assert agg.rel_error < 1e-12 and (agg.singular[7:] < 1e-9 * agg.singular[0]).all()
    # a client's cut: the top components, rescaled for its own LoRA scale
    A2, B2 = FP.client_adapter(agg, 2, scale=8.0)
    U, S, Vh = torch.linalg.svd(want)
    best2 = (U[:, :2] * S[:2]) @ Vh[:2]
    assert torch.allclose(8.0 * B2.double() @ A2.double(), best2, atol=1e-4)
    with pytest.raises(ValueError, match="rank must be"):
        FP.client_adapter(agg, 8)


def test_truncation_error_is_the_dropped_singular_values(gen):
    ad = _adapters(gen, [2, 3, 4])
    w = [1.0, 2.0, 3.0]
    agg = FP.aggregate_heterogeneous(ad, w, target_rank=4)
    want = _mean_product(ad, w)
    S = torch.linalg.svdvals(want)
    dropped = float(S[4:].norm() / S.norm())
    assert agg.rel_error == pytest.approx(dropped, rel=1e-10)
    err = float((want - agg.B.double() @ agg.A.double()).norm() / want.norm())
    assert err == pytest.approx(dropped, rel=1e-5)
    assert 0.05 < dropped < 1  # the test truncates something


def test_zero_padding_is_biased(gen):
    """Zero-padding (pad every A_i, B_i to the largest rank, average A and B separately) gives
    mean(B) mean(A), not mean(B A): visibly off even for equal ranks. SVD re-projection is exact."""
    ad = _adapters(gen, [2, 4])
    w = [1.0, 1.0]
    r = 4
    A_pad = [torch.cat([A, A.new_zeros(r - A.shape[0], A.shape[1])]) for A, _ in ad]
    B_pad = [torch.cat([B, B.new_zeros(B.shape[0], r - B.shape[1])], dim=1) for _, B in ad]
    zp = (sum(B_pad) / 2).double() @ (sum(A_pad) / 2).double()
    want = _mean_product(ad, w)
    assert float((zp - want).norm() / want.norm()) > 0.3
    agg = FP.aggregate_heterogeneous(ad, w, target_rank=6)
    assert float((agg.B.double() @ agg.A.double() - want).norm() / want.norm()) < 1e-6


def test_aggregation_is_bitwise_repeatable_and_sign_fixed(gen):
    ad = _adapters(gen, [3, 5, 2])
    w = [3, 1, 2]
    a1 = FP.aggregate_heterogeneous(ad, w, 5)
    a2 = FP.aggregate_heterogeneous([(A.clone(), B.clone()) for A, B in ad], w, 5)
    assert torch.equal(a1.A, a2.A) and torch.equal(a1.B, a2.B)
    # the sign convention: each B column's largest-magnitude entry is positive
    col = a1.B.abs().argmax(dim=0)
    assert (a1.B[col, torch.arange(5)] > 0).all()
    # flipping a client's factors (B A unchanged) changes nothing
    flipped = [(-A, -B) for A, B in ad]
    a3 = FP.aggregate_heterogeneous(flipped, w, 5)
    assert torch.allclose(a3.A, a1.A, atol=1e-5) and torch.allclose(a3.B, a1.B, atol=1e-5)


def test_aggregation_refusals(gen):
    ad = _adapters(gen, [2, 3])
    with pytest.raises(ValueError, match="no adapters"):
        FP.aggregate_heterogeneous([], [], 2)
    with pytest.raises(ValueError, match="weights"):
        FP.aggregate_heterogeneous(ad, [1.0], 2)
    with pytest.raises(ValueError, match="positive sum"):
        FP.aggregate_heterogeneous(ad, [0, 0], 2)
    with pytest.raises(ValueError, match="positive sum"):
        FP.aggregate_heterogeneous(ad, [2, -1], 2)
    with pytest.raises(ValueError, match="target_rank"):
        FP.aggregate_heterogeneous(ad, [1, 1], 21)
    with pytest.raises(ValueError, match="target_rank"):
        FP.aggregate_heterogeneous(ad, [1, 1], 0)
    with pytest.raises(ValueError, match="adapter 1"):
        FP.aggregate_heterogeneous([ad[0], (ad[1][0], ad[1][1][:, :2])], [1, 1], 2)
    bad = (ad[1][0].clone(), ad[1][1])
    bad[0][0, 0] = math.nan
    with pytest.raises(ValueError, match="non-finite"):
        FP.aggregate_heterogeneous([ad[0], bad], [1, 1], 2)
