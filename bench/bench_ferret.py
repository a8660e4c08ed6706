"""One Ferret client round (issue #19): seconds in the local steps, in projecting the update and in
rebuilding it, kseed's fused kernels against Ferret's own per-seed loop (allen4747/Ferret,
optimizers/ferret_optimizer.py, written inline below: torch.manual_seed + trunc_normal_ per seed per
group, once to project and again to rebuild).

    python bench/bench_ferret.py                       # the 0.60B bench model (bench_memory.py builds it)
    python bench/bench_ferret.py --layers 2            # the same model cut to 2 decoder layers
    python bench/bench_ferret.py --smoke               # the embedded model: checks the plumbing

tau local SGD steps (batch 1, --seq tokens) from the model's weights, then delta = w_old - w_new is
projected with kseed.methods.ferret's client code (Ferret's groups and seeds per group, one
project_seeds_multi per group) and the round rebuilt from those coefficients (apply_grouped: one
fused apply per group).  The baseline does both the Ferret way for the same groups and seed counts;
it is timed on at most --baseline-seeds seeds per group and scaled linearly to the group's n_g (each
seed costs the same there: one generation of the group's direction), which the output says.  Where
even kseed's side does not fit the time (the full 0.60B model at K = 4096), --kseed-seeds S times
kseed's project and rebuild the same way: per group on the first min(n_g, S) of its seeds (the exact
n_g from the update's norms), scaled by n_g / min(n_g, S); the output marks it ("kseed_scaled").
The fused kernels go over a tensor once per tile of seeds, so take S a multiple of the tile (64).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

import numpy as np
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [ROOT, os.path.join(ROOT, "python")]


def ferret_project(delta_g: torch.Tensor, seeds) -> list:
    """Ferret's projection of one group's flattened delta on its seeds (per seed, as its code)."""
    d = delta_g.numel()
    bound = 1 / d ** 0.5
    out = []
    for s in seeds:
        torch.manual_seed(int(s))
        base = torch.empty(d, dtype=delta_g.dtype)
        base = torch.nn.init.trunc_normal_(base, mean=0.0, std=1.0, a=-bound, b=bound)
        out.append(float(torch.sum(delta_g * base)))
    return out


def ferret_rebuild(params, seeds, coefs, slr=1.0, max_norm=10.0) -> None:
    """Ferret's update for one group (its tensors ``params``): per seed, regenerate the base over
    the flattened group, scale, clip to max_norm, and subtract slr x it from each tensor."""
    d = sum(p.numel() for p in params)
    bound = d ** -0.5
    for s, c in zip(seeds, coefs):
        torch.manual_seed(int(s))
        base = torch.empty(d, dtype=params[0].dtype)
        base = torch.nn.init.trunc_normal_(base, mean=0.0, std=1.0, a=-bound, b=bound)
        base.mul_(float(c))
        n = torch.linalg.norm(base)
        if n > max_norm:
            base.mul_(max_norm / (n + 1e-8))
        off = 0
        for p in params:
            p.sub_(slr * base[off:off + p.numel()].view_as(p))
            off += p.numel()


def scaled_kseed(a, cl, ms, params, delta, n_params, path, model, t_local) -> int:
    """--kseed-seeds S: kseed's project and rebuild, and Ferret's loop, each timed per group on a
    prefix of the group's seeds (S for kseed, --baseline-seeds for Ferret's) and scaled to n_g."""
    import math

    from kseed.methods import ferret as FR
    import kseed_kernels as KK

    cfg = cl.config
    cl._layout([p.numel() for p in params])
    norms = [math.sqrt(sum(float(torch.sum(delta[i].double() ** 2)) for i in range(lo, hi)))
             for lo, hi in cl.groups]
    counts = FR.seeds_per_group(norms, cfg.num_seeds)
    streams = list(ms.streams)
    t_proj = t_reb = 0.0
    timed = 0
    with torch.no_grad():
        for g, ((lo, hi), n) in enumerate(zip(cl.groups, counts)):
            n = int(n)
            m = min(n, a.kseed_seeds)
            idx = FR.group_indices(cfg.seed, 1, 0, g, m, cfg.num_seeds)
            seeds = torch.tensor(cl.pool[idx].view(np.int64))
            t0 = time.perf_counter()
            c = KK.project_seeds_multi(delta[lo:hi], streams[lo:hi], seeds, noise=ms.noise,
                                       backend=ms.backend)
            t_proj += (time.perf_counter() - t0) * n / m
            pairs = (np.uint64(g) << np.uint64(32)) | idx.astype(np.uint64)
            t0 = time.perf_counter()
            FR.apply_grouped(ms, [(1, pairs, -(c.double().numpy() / n).astype(np.float32))],
                             cl.groups, cl.pool)
            t_reb += (time.perf_counter() - t0) * n / m
            timed += m
    element_seeds = int(sum(int(n) * sum(params[i].numel() for i in range(lo, hi))
                            for (lo, hi), n in zip(cl.groups, counts)))
    return report(a, path, model, cl, n_params, counts.astype(np.uint32), t_local, t_proj, t_reb,
                  ferret_baseline(cl, counts, delta, params, a.baseline_seeds),
                  element_seeds=element_seeds, kseed_scaled=True, kseed_seeds_timed=timed)


def ferret_baseline(cl, counts, delta, params, max_seeds) -> tuple:
    """Ferret's loop on the client's groups and seed counts, timed per group on its first
    min(n_g, max_seeds) seeds and scaled to n_g: (project s, rebuild s, seeds timed)."""
    tb_proj = tb_reb = 0.0
    timed = 0
    with torch.no_grad():
        for (lo, hi), n in zip(cl.groups, counts):
            m = min(int(n), max_seeds)
            seeds = [int(s) for s in cl.pool[:m]]
            flat = torch.cat([delta[i].flatten() for i in range(lo, hi)])
            t0 = time.perf_counter()
            cs = ferret_project(flat, seeds)
            tb_proj += (time.perf_counter() - t0) * int(n) / m
            t0 = time.perf_counter()
            ferret_rebuild(params[lo:hi], seeds, cs)
            tb_reb += (time.perf_counter() - t0) * int(n) / m
            timed += m
    return tb_proj, tb_reb, timed


def report(a, path, model, cl, n_params, counts, t_local, t_project, t_rebuild, baseline,
           **extra) -> int:
    """Print (and with --json write) the round's row; 0."""
    from kseed.methods import ferret as FR

    tb_proj, tb_reb, timed = baseline
    row = {"model": path, "layers": a.layers or model.config.num_hidden_layers,
           "parameters": n_params, "groups": len(cl.groups), "K": a.num_seeds, "tau": a.tau,
           "seq": a.seq, "threads": a.threads, "coefficients": int(counts.sum()),
           "up_bytes": FR.up_size(counts), **extra,
           "local_s": round(t_local, 3), "project_s": round(t_project, 3),
           "rebuild_s": round(t_rebuild, 3), "ferret_project_s": round(tb_proj, 3),
           "ferret_rebuild_s": round(tb_reb, 3), "baseline_seeds_timed": timed,
           "project_speedup": round(tb_proj / t_project, 1),
           "rebuild_speedup": round(tb_reb / t_rebuild, 1)}
    print(json.dumps(row))
    if a.json:
        with open(a.json, "w", encoding="utf-8") as f:
            json.dump(row, f, indent=1)
    return 0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default=os.path.join(os.path.expanduser("~"), ".cache", "kseed-bench",
                                                    "model"))
    ap.add_argument("--layers", type=int, default=0, help="cut the model to N decoder layers (0: all)")
    ap.add_argument("--smoke", action="store_true", help="the embedded model instead")
    ap.add_argument("--tau", type=int, default=10)
    ap.add_argument("-K", "--num-seeds", type=int, default=4096)
    ap.add_argument("--seq", type=int, default=64, help="tokens per training example")
    ap.add_argument("--lr", type=float, default=1e-4)
    ap.add_argument("--baseline-seeds", type=int, default=8,
                    help="seeds per group the baseline is timed on (then scaled to n_g)")
    ap.add_argument("--kseed-seeds", type=int, default=0,
                    help="time kseed's project / rebuild on at most S seeds per group, scaled to n_g "
                         "(0: all seeds, no scaling)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--json", default=None)
    a = ap.parse_args(argv)
    torch.set_num_threads(a.threads)

    from kseed import modeling as M
    from kseed.config import FedConfig
    from kseed.methods import ferret as FR
    from kseed_kernels import ModelSeeds

    path = M.EMBEDDED_DIR if a.smoke else a.model
    if a.layers:
        from transformers import AutoConfig, AutoModelForCausalLM
        cfg_m = AutoConfig.from_pretrained(path, local_files_only=True)
        cfg_m.num_hidden_layers = a.layers
        model = AutoModelForCausalLM.from_pretrained(path, config=cfg_m, local_files_only=True,
                                                     dtype=torch.float32)
    else:
        model, _ = M.load_model(path, "fp32")
    model.eval()
    ms = ModelSeeds(model)
    params = list(ms.params)
    n_params = sum(p.numel() for p in params)
    cfg = FedConfig(method="ferret", num_seeds=a.num_seeds, seed=1)

    class Bench(FR.FerretClient):  # the client's projection on this model, no data needed
        def __init__(self):
            self.config = cfg
            self._ws = type("WS", (), {"ms": ms})()

    cl = Bench()
    # local steps: tau SGD steps, batch 1, random tokens (the cost does not depend on the text)
    gen = torch.Generator().manual_seed(0)
    vocab = model.config.vocab_size
    old = [p.detach().clone() for p in params]
    opt = torch.optim.SGD(params, lr=a.lr, momentum=0.0)
    for p in params:
        p.requires_grad_(True)
    t0 = time.perf_counter()
    for _ in range(a.tau):
        ids = torch.randint(0, vocab, (1, a.seq), generator=gen)
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    t_local = time.perf_counter() - t0
    print(f"local steps: {t_local:.1f} s", file=sys.stderr, flush=True)
    for p in params:
        p.requires_grad_(False)
    with torch.no_grad():
        for o, p in zip(old, params):
            o.sub_(p)
    delta = old
    # kseed: project (one project_seeds_multi per group) and rebuild (one fused apply per group)
    if a.kseed_seeds > 0:
        return scaled_kseed(a, cl, ms, params, delta, n_params, path, model, t_local)
    t0 = time.perf_counter()
    counts, coefs = cl.project(delta, 1, 0)
    t_project = time.perf_counter() - t0
    print(f"project: {t_project:.1f} s, {int(counts.sum())} coefficients", file=sys.stderr,
          flush=True)
    pairs_s, pairs_c, off = [], [], 0
    for g, n in enumerate(counts):
        idx = FR.group_indices(cfg.seed, 1, 0, g, int(n), cfg.num_seeds)
        pairs_s.append((np.uint64(g) << np.uint64(32)) | idx.astype(np.uint64))
        pairs_c.append(-coefs[off:off + int(n)])
        off += int(n)
    t0 = time.perf_counter()
    FR.apply_grouped(ms, [(1, np.concatenate(pairs_s), np.concatenate(pairs_c))], cl.groups, cl.pool)
    t_rebuild = time.perf_counter() - t0
    print(f"rebuild: {t_rebuild:.1f} s", file=sys.stderr, flush=True)
    return report(a, path, model, cl, n_params, counts, t_local, t_project, t_rebuild,
                  ferret_baseline(cl, counts, delta, params, a.baseline_seeds))

if __name__ == "__main__":
    sys.exit(main())
