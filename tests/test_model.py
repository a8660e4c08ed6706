"""ModelSeeds against a plain per-parameter reference computation (bitwise)."""
import math

import pytest
import torch

import kseed_kernels as kk
from kseed_kernels import ModelSeeds
from kseed_kernels.model import ZOStepResult


class Tiny(torch.nn.Module):
    def __init__(self, dtype=torch.float32):
        super().__init__()
        self.emb = torch.nn.Embedding(13, 6)
        self.body = torch.nn.Linear(6, 6)
        self.frozen = torch.nn.Linear(6, 6)
        self.frozen.requires_grad_(False)
        self.head = torch.nn.Linear(6, 13, bias=False)
        self.head.weight = self.emb.weight  # tied
        self.norm = torch.nn.Parameter(torch.randn(6))
        self.to(dtype)

    def loss(self, x):
        h = self.emb(x).float()
        h = torch.tanh(h @ self.body.weight.float().T + self.body.bias.float()) * self.norm.float()
        h = h @ self.frozen.weight.float().T
        logits = h @ self.head.weight.float().T
        return torch.nn.functional.cross_entropy(logits.reshape(-1, 13), x.reshape(-1))


def _ref_apply(t: torch.Tensor, name: str, seeds, coefs):
    """Spec section 4 written out per parameter: acc in float32 from +0, ascending k, round once."""
    z_stream = kk.stream_id(name)
    acc = torch.zeros(t.numel(), dtype=torch.float32)
    for s, c in zip(seeds, coefs):
        c32 = torch.tensor(float(c), dtype=torch.float32)
        acc = acc + c32 * kk.gaussian(int(s), t.numel(), stream=z_stream, backend="reference")
    v = t.detach().reshape(-1).float() + acc
    return v.to(t.dtype).reshape(t.shape)


def _snapshot(model):
    return {n: p.detach().clone() for n, p in model.named_parameters(remove_duplicate=False)}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_param_list_tied_frozen_and_apply(dtype):
    torch.manual_seed(0)
    m = Tiny(dtype)
    ms = ModelSeeds(m)
    assert ms.names == ("norm", "emb.weight", "body.weight", "body.bias")
    assert ms.streams == tuple(kk.stream_id(n) for n in ms.names)
    assert ms.params[1] is m.emb.weight
    assert ms.numel == 13 * 6 + 36 + 6 + 6
    before = _snapshot(m)
    seeds = [3, 2 ** 64 - 1, 12345678901234]
    coefs = [0.01, -0.02, 0.5e-3]
    ms.apply(seeds, coefs)
    for n in ms.names:
        want = _ref_apply(before[n], n, seeds, coefs)
        got = dict(m.named_parameters(remove_duplicate=False))[n].detach()
        assert torch.equal(got.view(torch.int16 if dtype != torch.float32 else torch.int32),
                           want.view(torch.int16 if dtype != torch.float32 else torch.int32)), n
    # tied head follows the embedding, frozen layer untouched
    assert m.head.weight is m.emb.weight
    assert torch.equal(m.frozen.weight, before["frozen.weight"])
    assert torch.equal(m.frozen.bias, before["frozen.bias"])
    # perturb == apply with one seed
    snap = _snapshot(m)
    ms.perturb(77, 0.25)
    for n in ms.names:
        got = dict(m.named_parameters(remove_duplicate=False))[n].detach()
        assert torch.equal(got, _ref_apply(snap[n], n, [77], [0.25])), n


def test_named_params_input_and_errors():
    a = torch.randn(5)
    b = torch.nn.Parameter(torch.randn(3), requires_grad=False)
    ms = ModelSeeds([("a", a), ("b", b)])
    assert ms.names == ("a",)
    with pytest.raises(ValueError, match="no trainable"):
        ModelSeeds([("b", b)])
    with pytest.raises(TypeError):
        ModelSeeds([("a", torch.arange(3))])
    with pytest.raises(ValueError, match="listed twice"):
        ModelSeeds([("a", a), ("a", torch.randn(2))])
    with pytest.raises(ValueError, match="different view"):
        big = torch.randn(10)
        ModelSeeds([("x", big[:5]), ("y", big[:4])])
    with pytest.raises(TypeError):
        ModelSeeds(42)


def test_stream_collision_refused():
    seen = {}
    i = 0
    while True:
        name = f"p{i}"
        sid = kk.stream_id(name)
        if sid in seen:
            n1, n2 = seen[sid], name
            break
        seen[sid] = name
        i += 1
    with pytest.raises(ValueError, match="stream id collision"):
        ModelSeeds([(n1, torch.randn(3)), (n2, torch.randn(3))])


def _ref_zo(params: dict, names, loss_at, seed, next_seed, eps, lr):
    """MeZO step written out with the reference apply, in the pass order ModelSeeds promises."""
    w = {n: _ref_apply(params[n], n, [seed], [eps]) for n in names}
    lp = loss_at(w)
    w = {n: _ref_apply(w[n], n, [seed], [-2 * eps]) for n in names}
    lm = loss_at(w)
    g = (lp - lm) / (2 * eps)
    seeds, coefs = ([seed], [eps - lr * g]) if next_seed is None else \
        ([seed, next_seed], [eps - lr * g, eps])
    w = {n: _ref_apply(w[n], n, seeds, coefs) for n in names}
    return w, g, lp, lm


def test_zo_step_chain_matches_reference():
    torch.manual_seed(1)
    m = Tiny()
    x = torch.randint(0, 13, (4, 5))
    ms = ModelSeeds(m)
    names = ms.names

    def loss_fn():
        with torch.no_grad():
            return m.loss(x)

    def loss_at(w):
        saved = [p.detach().clone() for p in ms.params]
        with torch.no_grad():
            for p, n in zip(ms.params, names):
                p.copy_(w[n])
            out = float(m.loss(x))
            for p, s in zip(ms.params, saved):
                p.copy_(s)
        return out

    eps, lr = 1e-3, 0.05
    seeds = [11, 2 ** 63 + 5, 11, 99]
    ref = {n: p.detach().clone() for n, p in zip(names, ms.params)}
    pending = None
    for i, s in enumerate(seeds):
        nxt = seeds[i + 1] if i + 1 < len(seeds) else None
        res = ms.zo_step(s, loss_fn, eps=eps, lr=lr, next_seed=nxt)
        assert isinstance(res, ZOStepResult) and not res.skipped
        # reference: the +eps of a chained step was applied in the previous combined pass
        if pending is None:
            ref, g, lp, lm = _ref_zo(ref, names, loss_at, s, nxt, eps, lr)
        else:
            lp = loss_at(ref)
            ref = {n: _ref_apply(ref[n], n, [s], [-2 * eps]) for n in names}
            lm = loss_at(ref)
            g = (lp - lm) / (2 * eps)
            sd, cf = ([s], [eps - lr * g]) if nxt is None else ([s, nxt], [eps - lr * g, eps])
            ref = {n: _ref_apply(ref[n], n, sd, cf) for n in names}
        pending = nxt
        assert res.g == g and res.loss_plus == lp and res.loss_minus == lm
        for p, n in zip(ms.params, names):
            assert torch.equal(p.detach(), ref[n]), (i, n)
    assert ms.pending is None


def test_zo_step_nonfinite_skips_and_restores():
    torch.manual_seed(2)
    m = Tiny()
    ms = ModelSeeds(m)
    before = [p.detach().clone() for p in ms.params]
    vals = iter([float("nan"), 1.0])
    res = ms.zo_step(5, lambda: next(vals), eps=1e-3, lr=1.0)
    assert res.skipped and math.isnan(res.g)
    # restored by the same passes as the reference: +eps, -2eps, +eps
    for p, b, n in zip(ms.params, before, ms.names):
        w = _ref_apply(b, n, [5], [1e-3])
        w = _ref_apply(w, n, [5], [-2e-3])
        w = _ref_apply(w, n, [5], [1e-3])
        assert torch.equal(p.detach(), w)
        assert torch.allclose(p.detach(), b, atol=1e-6)


def test_pending_tracking_and_restore():
    torch.manual_seed(3)
    m = Tiny()
    ms = ModelSeeds(m)
    before = [p.detach().clone() for p in ms.params]
    ms.zo_step(1, lambda: 1.0, eps=1e-3, lr=0.0, next_seed=2)
    assert ms.pending == (2, 1e-3)
    with pytest.raises(RuntimeError, match="pending"):
        ms.zo_step(3, lambda: 1.0, eps=1e-3, lr=0.0)
    ms.restore_pending()
    assert ms.pending is None
    for p, b in zip(ms.params, before):
        assert torch.allclose(p.detach(), b, atol=1e-5)
    # an exception inside loss_fn leaves no perturbation behind
    snap = [p.detach().clone() for p in ms.params]

    def boom():
        raise KeyError("x")

    with pytest.raises(KeyError):
        ms.zo_step(4, boom, eps=1e-3, lr=0.0)
    assert ms.pending is None
    for p, b in zip(ms.params, snap):
        assert torch.allclose(p.detach(), b, atol=1e-5)
    with pytest.raises(ValueError, match="eps"):
        ms.zo_step(4, lambda: 0.0, eps=0.0, lr=0.1)
    with pytest.raises(ValueError, match="lr"):
        ms.zo_step(4, lambda: 0.0, eps=1e-3, lr=float("inf"))


# ------------------------------------------------------------------------------ noise families
def _ops_zo(params, streams, seed, nxt, loss_at, eps, lr, backend, noise):
    """One zo_step written with the ops themselves (in place on ``params``), for comparison."""
    def ap(seeds, coefs):
        kk.apply_seeds_multi_(params, streams, seeds, coefs, backend=backend, noise=noise)
    ap([seed], [eps])
    lp = loss_at(params)
    ap([seed], [-2 * eps])
    lm = loss_at(params)
    g = (lp - lm) / (2 * eps)
    if nxt is None:
        ap([seed], [eps - lr * g])
    else:
        ap([seed, nxt], [eps - lr * g, eps])
    return g


@pytest.mark.parametrize("backend", ["reference", "cpu"])
@pytest.mark.parametrize("noise", ["rademacher", "gaussian", None])
def test_noise_family_matches_ops(backend, noise):
    """A ModelSeeds built with ``noise=`` gives bitwise what the ops give with that noise, in every
    op (perturb, apply, apply_from both paths, zo_step chained and not, restore_pending); None: the
    default, which must be the Gaussian."""
    if backend not in kk.backends():
        pytest.skip(f"backend {backend} not built")
    op_noise = noise or "gaussian"
    torch.manual_seed(7)
    m = Tiny()
    x = torch.randint(0, 13, (4, 5))
    kw = {} if noise is None else {"noise": noise}
    ms = ModelSeeds(m, backend=backend, **kw)
    assert ms.noise == op_noise and repr(ms).endswith(f"noise={op_noise!r})")
    mirror = [p.detach().clone() for p in ms.params]
    streams = list(ms.streams)

    def check(what):
        for p, q, n in zip(ms.params, mirror, ms.names):
            assert torch.equal(p.detach(), q), (what, n)

    def ap(seeds, coefs):
        kk.apply_seeds_multi_(mirror, streams, seeds, coefs, backend=backend, noise=op_noise)

    ms.perturb(5, 0.25)
    ap([5], [0.25])
    check("perturb")
    seeds, coefs = [3, 2 ** 64 - 1, 77], [0.5, -1.25, 0.125]
    ms.apply(seeds, coefs)
    ap(seeds, coefs)
    check("apply")
    bases = [torch.randn_like(p) for p in ms.params]
    for staged in (False, True):
        ms.apply_from(bases, seeds, coefs, staged=staged)
        mirror = [b.clone() for b in bases]
        ap(seeds, coefs)
        check(f"apply_from staged={staged}")
        # the out-of-place op itself, too
        outs = kk.apply_seeds_multi(bases, streams, seeds, coefs, backend=backend, noise=op_noise)
        for p, o in zip(ms.params, outs):
            assert torch.equal(p.detach(), o)

    def loss_on(ts):
        saved = [p.detach().clone() for p in ms.params]
        with torch.no_grad():
            for p, t in zip(ms.params, ts):
                p.copy_(t)
            out = float(m.loss(x))
            for p, s in zip(ms.params, saved):
                p.copy_(s)
        return out

    def loss_fn():
        with torch.no_grad():
            return m.loss(x)

    eps, lr = 1e-2, 0.05
    chain = [11, 12, 12, 13]
    for i, s in enumerate(chain[:-1]):
        nxt = chain[i + 1] if i < 1 else None
        res = ms.zo_step(s, loss_fn, eps=eps, lr=lr, next_seed=nxt)
        g = _ops_zo(mirror, streams, s, nxt, loss_on, eps, lr, backend, op_noise) if i != 1 else None
        if i == 1:  # the +eps was applied by the previous combined pass
            lp = loss_on(mirror)
            ap([s], [-2 * eps])
            lm = loss_on(mirror)
            g = (lp - lm) / (2 * eps)
            ap([s], [eps - lr * g])
        assert res.g == g and not res.skipped
        check(f"zo_step {i}")
    res = ms.zo_step(14, loss_fn, eps=eps, lr=lr, next_seed=15)
    ms.restore_pending()
    assert ms.pending is None
    g = _ops_zo(mirror, streams, 14, 15, loss_on, eps, lr, backend, op_noise)
    ap([15], [-eps])
    assert res.g == g
    check("restore_pending")


def test_noise_families_differ_and_validate():
    """The two families give different weights (the keyword is really passed), and a bad noise is a
    ValueError naming it."""
    torch.manual_seed(3)
    a = torch.randn(300)
    b = a.clone()
    ModelSeeds([("w", a)]).apply([9], [0.5])
    ModelSeeds([("w", b)], noise="rademacher").apply([9], [0.5])
    assert not torch.equal(a, b)
    r = kk.rademacher(9, 300, stream=kk.stream_id("w"), backend="reference")
    assert set(r.unique().tolist()) == {-1.0, 1.0}
    with pytest.raises(ValueError, match="noise"):
        ModelSeeds([("w", a)], noise="uniform")
    with pytest.raises(ValueError, match="noise"):
        ModelSeeds([("w", a)], noise=None)
