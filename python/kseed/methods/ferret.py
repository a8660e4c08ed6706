"""Ferret (Shu et al., ICML 2025; allen4747/Ferret, optimizers/ferret_optimizer.py): every client runs
ordinary first-order steps, projects its update onto random directions of the shared K-seed pool, and
sends the coefficients; every party rebuilds the round's update from them.

Client (``FerretClient.fit``): from model_{r-1}, tau = --local-steps steps of SGD (momentum 0, as
Ferret; --optimizer adamw as an option), each on --n-accum batches of --batch-size drawn by the client
RNG (seeded by the down message's client seed, as FedKSeed's batches), gradient-norm clip --grad-clip,
optional activation checkpointing.  Its update delta = w_old - w_new is cut into Ferret's parameter
groups (``ferret_groups``).  Group g gets n_g = max(int(||delta_g|| / max_h ||delta_h|| x K), 2) seeds
(at most K), drawn without replacement from the pool by an RNG derived from (run seed, round, client,
group) (``group_indices``), so the server knows them from n_g alone; their coefficients come from ONE
``kseed_kernels.project_seeds_multi`` over the group's tensors: a_k = <delta_g, z_k> / n_g, so that
sum_k a_k z_k is an unbiased estimate of delta_g for z ~ N(0, I) or Rademacher (E[z z^T] = I).

Server (``FerretServer.aggregate``): bounds the uploads (base.bound_uploads: the client's coefficient
vector is its update), averages the coefficients per (group, seed) with the FedAvg weights (a client
that did not draw a seed contributes 0 to it, as in Ferret), clips each seed's rebuilt update
avg x z to norm --seed-clip (|avg| <= seed_clip / sqrt(d_g): ||z|| ~ sqrt(d_g)), and appends the round
to the seed history as pairs (g << 32 | k, -server_lr x avg).  The global model is FedMeZO's: w0 plus
the history, each round applied by ONE fused in-place apply per group (``apply_grouped``), so resume,
catch-up, the model cache and export are FedMeZO's (kseed.methods.fedmezo).

Wire format (little-endian; decoders check every field, ProtocolError naming it).

Down: FedMeZO's layout (fedmezo.encode_down, 128 + S bytes) with magic b"KFD1"; its eps field holds
the server step size (--server-lr), which the client checks against its own.

Up, ``UP_MAGIC`` b"KFU1", version 1, 36 + 4 G + 4 N bytes for G groups and N coefficients::

    0      4   magic b"KFU1"
    4      2   version (uint16) = 1
    6      2   flags (uint16) = 0
    8      4   round (uint32)
    12     4   client id (uint32)
    16     4   example count (uint32, >= 1)
    20     4   G, the group count (uint32; the model's)
    24     4   N = sum of n_g (uint32)
    28     4   train loss (float32; NaN when no step was taken)
    32     4   cached round (uint32, as FedMeZO's upload)
    36   4 G   n_g per group (uint32, min(2, K) <= n_g <= K)
    36+4G 4 N  the coefficients a, group by group, in the order of group_indices (float32, finite)
"""
from __future__ import annotations

import math
import struct
import time
from dataclasses import dataclass
from typing import List, Optional, Sequence, Tuple

import numpy as np
import torch

import kseed_kernels as K
from .. import protocol as P
from ..history import HistoryError, checked_rounds
from .base import Method, bound_uploads, first_order_steps
from .fedmezo import VERSION, FedMeZOClient, FedMeZOServer, MeZODown, up_header_fields

DOWN_MAGIC = b"KFD1"
UP_MAGIC = b"KFU1"
_UP_HDR = struct.Struct("<4sHHIIIIIfI")
UP_HEADER_SIZE = _UP_HDR.size
assert UP_HEADER_SIZE == 36
SELECT_TAG = 4  # derive_seed(run seed, SELECT_TAG, round, client, group): a group's seed choice
GROUP_SHIFT = 32  # a history pair's seed field: group << 32 | pool index


def ferret_groups(numels: Sequence[int]) -> List[Tuple[int, int]]:
    """Ferret's parameter groups over tensors of these sizes, in order: consecutive tensors packed
    until the next would pass int(0.9 x the median size); [(first, stop), ...] index ranges."""
    sizes = [int(n) for n in numels]
    if not sizes:
        return []
    target = int(0.9 * float(np.median(sizes)))
    out, start, cur = [], 0, 0
    for i, n in enumerate(sizes):
        if cur + n > target and i > start:
            out.append((start, i))
            start, cur = i, 0
        cur += n
    out.append((start, len(sizes)))
    return out


def seeds_per_group(norms: Sequence[float], k: int) -> np.ndarray:
    """Ferret's n_g = max(int(||delta_g|| / max_h ||delta_h|| x K), 2), at most K (a group whose norm
    is not finite gets 2; max_h over the finite norms, at least 1e-8 as in Ferret)."""
    v = np.asarray(norms, dtype=np.float64)
    fin = np.isfinite(v)
    top = max(1e-8, float(v[fin].max())) if fin.any() else 1e-8
    n = np.full(v.shape, 2, dtype=np.int64)
    n[fin] = np.maximum((v[fin] / top * k).astype(np.int64), 2)
    return np.minimum(n, k)


def group_indices(run_seed: int, rnd: int, client_id: int, group: int, n: int, k: int) -> np.ndarray:
    """The n pool indices (sorted, distinct, uint32) of a group's seeds: drawn without replacement by
    an RNG derived from (run seed, round, client, group), so the server recomputes them from n."""
    rng = np.random.Generator(np.random.PCG64(P.derive_seed(run_seed, SELECT_TAG, rnd, client_id,
                                                            group)))
    return np.sort(rng.choice(k, size=n, replace=False)).astype(np.uint32)


def up_size(counts: Sequence[int]) -> int:
    return UP_HEADER_SIZE + 4 * len(counts) + 4 * int(sum(counts))


# ------------------------------------------------------------------------------- messages
@dataclass
class FerretUp:
    round: int
    client_id: int
    num_examples: int
    counts: np.ndarray  # uint32 [G]: n_g
    coefs: np.ndarray  # float32 [N]
    train_loss: float = float("nan")
    cached: int = 0
    flat: Optional[np.ndarray] = None  # int64 [N]: g x K + k of each coefficient (set by the server)

    # base.bound_uploads reads an upload as (indices, grads, tau)
    @property
    def grads(self) -> np.ndarray:
        return self.coefs

    @property
    def indices(self) -> np.ndarray:
        return self.flat

    @property
    def tau(self) -> int:
        return int(self.coefs.shape[0])


def encode_up(m: FerretUp) -> bytes:
    a = P._finite_f32("coefs", m.coefs)
    n = np.asarray(m.counts)
    if n.ndim != 1 or n.dtype.kind not in "iu" or (n.size and (n.min() < 1 or n.max() >= 2 ** 32)):
        raise P.ProtocolError("counts must be a 1-d array of ints in [1, 2^32)")
    if int(n.sum()) != a.shape[0]:
        raise P.ProtocolError(f"counts sum to {int(n.sum())}, there are {a.shape[0]} coefs")
    rnd, cid, cached = up_header_fields(m)
    hdr = _UP_HDR.pack(UP_MAGIC, VERSION, 0, rnd, cid, int(m.num_examples), n.size, a.shape[0],
                       float(m.train_loss), cached)
    return hdr + n.astype("<u4").tobytes() + a.astype("<f4").tobytes()


def decode_up(data, *, groups: int, k: int, expected_round: Optional[int] = None,
              expected_client: Optional[int] = None) -> FerretUp:
    """Decode and check an upload for a model of ``groups`` groups and a pool of ``k`` seeds."""
    data = P._check_bytes(data)
    limit = UP_HEADER_SIZE + 4 * groups + 4 * groups * k
    if len(data) > limit:
        raise P.ProtocolError(f"oversized upload: {len(data)} bytes > limit {limit}")
    if len(data) < UP_HEADER_SIZE:
        raise P.ProtocolError(f"upload truncated: {len(data)} bytes, the header alone is "
                              f"{UP_HEADER_SIZE}")
    magic, ver, flags, rnd, cid, n_ex, g, n, loss, cached = _UP_HDR.unpack_from(data)
    P.check_preamble("Ferret upload", magic, UP_MAGIC, ver, VERSION, flags)
    if g != groups:
        raise P.ProtocolError(f"upload has {g} groups, the model has {groups}")
    if n > groups * k:
        raise P.ProtocolError(f"upload has {n} coefficients, at most {groups * k} (groups x K)")
    if len(data) != UP_HEADER_SIZE + 4 * g + 4 * n:
        raise P.ProtocolError(f"wrong length: upload has {len(data)} bytes, {g} groups and {n} "
                              f"coefficients need {UP_HEADER_SIZE + 4 * g + 4 * n}")
    P.check_up_header(rnd, cid, n_ex, cached, expected_round, expected_client)
    counts = np.frombuffer(data, dtype="<u4", count=g, offset=UP_HEADER_SIZE).astype(np.uint32)
    lo = min(2, k)
    bad = np.flatnonzero((counts < lo) | (counts > k))
    if bad.size:
        raise P.ProtocolError(f"group {int(bad[0])} has n_g = {int(counts[bad[0]])} seeds, not in "
                              f"[{lo}, K = {k}]")
    if int(counts.sum(dtype=np.int64)) != n:
        raise P.ProtocolError(f"the groups' n_g sum to {int(counts.sum(dtype=np.int64))}, the "
                              f"header says {n} coefficients")
    a = np.frombuffer(data, dtype="<f4", count=n, offset=UP_HEADER_SIZE + 4 * g).astype(np.float32)
    if not np.isfinite(a).all():
        i = int(np.flatnonzero(~np.isfinite(a))[0])
        raise P.ProtocolError(f"NaN/inf coefficient: coefs[{i}] = {a[i]}")
    return FerretUp(round=rnd, client_id=cid, num_examples=n_ex, counts=counts, coefs=a,
                    train_loss=float(loss), cached=cached)


# ---------------------------------------------------------------------------- the model
def apply_grouped(ms, rounds, groups: Sequence[Tuple[int, int]], pool: np.ndarray, *,
                  bases=None) -> int:
    """Apply Ferret history rounds to ``ms`` (kseed_kernels.ModelSeeds): a pair (g << 32 | k, c)
    moves group g's tensors by c x z(pool[k]); per round and group ONE fused in-place
    apply_seeds_multi_ over the group's tensors (each with its stream id), so every element is
    rounded once per round.  ``bases`` (w0): copied into the weights first (a rebuild; an empty
    ``rounds`` only copies).  HistoryError for a pair naming no group or pool seed, or out of order."""
    params, streams = list(ms.params), list(ms.streams)
    if bases is not None:
        bases = list(bases)
        if len(bases) != len(params):
            raise ValueError(f"bases must hold one tensor per parameter ({len(params)})")
        ms.discard_pending()
        with torch.no_grad():
            for p, b in zip(params, bases):
                p.copy_(b)
    done = 0
    for rnd, s, c in checked_rounds(rounds):
        if s.size:
            if np.any(s[1:] <= s[:-1]):
                raise HistoryError(f"round {rnd}: Ferret pairs must be in ascending (group, seed) "
                                   "order, each once")
            g = (s >> np.uint64(GROUP_SHIFT)).astype(np.int64)
            k = (s & np.uint64(0xFFFFFFFF)).astype(np.int64)
            if g[-1] >= len(groups) or k.max() >= len(pool):
                raise HistoryError(f"round {rnd}: a pair names group {int(g.max())} or pool seed "
                                   f"{int(k.max())}; the model has {len(groups)} groups, the pool "
                                   f"{len(pool)} seeds")
            cuts = np.flatnonzero(np.diff(g)) + 1
            for lo, hi in zip(np.r_[0, cuts], np.r_[cuts, g.size]):
                a, b = groups[int(g[lo])]
                K.apply_seeds_multi_(params[a:b], streams[a:b],
                                     torch.tensor(pool[k[lo:hi]].view(np.int64)),
                                     torch.tensor(c[lo:hi]), backend=ms.backend,
                                     rounding=ms.rounding, noise=ms.noise)
        done += int(s.size)
    return done


class _Grouped:
    """The model's groups and the seed pool, shared by Ferret's server and client."""

    def _layout(self, numels: Sequence[int]) -> None:
        self.numels = [int(n) for n in numels]
        self.groups = ferret_groups(self.numels)
        self.group_sizes = np.array([sum(self.numels[a:b]) for a, b in self.groups], np.float64)
        self.pool = P.seed_pool(self.config.seed, self.config.num_seeds)

    def apply_rounds(self, ms, rounds, *, bases=None) -> int:
        if getattr(self, "numels", None) != [int(p.numel()) for p in ms.params]:
            self._layout([p.numel() for p in ms.params])
        return apply_grouped(ms, rounds, self.groups, self.pool, bases=bases)


# ---------------------------------------------------------------------------------- server
class FerretServer(_Grouped, FedMeZOServer):
    method = "ferret"
    down_magic = DOWN_MAGIC

    def __init__(self, config, *, base_identity: Optional[dict] = None, workdir=None,
                 readonly: bool = False):
        super().__init__(config, base_identity=base_identity, workdir=workdir, readonly=readonly)
        numels = self.base_identity.get("numels")
        if not isinstance(numels, list) or not numels:
            raise ValueError("the Ferret server needs the model's tensor sizes (base_identity "
                             "'numels', set by kseed.task.load_workspace)")
        self._layout(numels)

    def down_eps(self) -> float:
        return self.config.server_lr

    def aggregate(self, rnd: int, uploads, weights=None) -> dict:
        """Validate and bound the round's uploads, average their coefficients per (group, seed) with
        the FedAvg weights, clip each seed's update to --seed-clip, and append the round's pairs
        (g << 32 | k, -server_lr x avg) in ascending order to the history."""
        self._check_round(rnd)
        c = self.config
        kk, ng = c.num_seeds, len(self.groups)

        def decode(data, cid):
            m = decode_up(data, groups=ng, k=kk, expected_round=rnd, expected_client=cid)
            m.flat = np.concatenate([g * kk + group_indices(c.seed, rnd, cid, g, int(n), kk)
                                     .astype(np.int64) for g, n in enumerate(m.counts)])
            return m

        accepted, rejected, bytes_up = self.collect(rnd, uploads, decode)
        b = bound_uploads(c, accepted, weights)
        w = b.weights / b.weights.sum()
        avg = np.zeros(ng * kk)
        deltas = []
        for m, a, wc in zip(accepted, b.grads, w):
            avg[m.flat] += wc * a
            d = np.zeros(ng * kk)
            d[m.flat] = a
            deltas.append(d)
        clipped = 0
        if c.seed_clip > 0:  # ||avg z|| = |avg| ||z||, ||z|| ~ sqrt(d_g)
            lim = np.repeat(c.seed_clip / np.sqrt(self.group_sizes), kk)
            over = np.abs(avg) > lim
            clipped = int(over.sum())
            avg[over] = np.sign(avg[over]) * lim[over]
        coefs = (-c.server_lr * avg).astype(np.float32)
        keep = np.flatnonzero(coefs != 0)
        seeds = ((keep // kk).astype(np.uint64) << np.uint64(GROUP_SHIFT)) | (keep % kk).astype(
            np.uint64)
        self.history.append(rnd, seeds, coefs[keep])
        for cid in self.sample_clients(rnd):
            self.client_cached.pop(cid, None)
        for m in accepted:
            if m.cached:
                self.client_cached[m.client_id] = m.cached
        stats = self.record_clients(rnd, accepted, b, w, deltas, rejected, bytes_up)
        stats["steps"] = c.local_steps * len(accepted)  # local steps (the upload carries coefs)
        stats["pairs"] = int(keep.size)
        stats["seed_clipped"] = clipped
        return stats


# ---------------------------------------------------------------------------------- client
class FerretClient(_Grouped, FedMeZOClient):
    down_magic = DOWN_MAGIC

    def check_down(self, m: MeZODown) -> None:
        from .base import check_local

        def also(bad):
            if m.eps != self.config.server_lr:
                bad("server_lr", m.eps, f"--server-lr {self.config.server_lr}")
        check_local(self.config, noise=m.noise, local_steps=m.local_steps, batch_size=m.batch_size,
                    eps=self.config.eps, lr=m.lr, rnd=m.round, client_id=m.client_id,
                    client_seed=m.client_seed, also=also)

    def local_train(self, rng: np.random.Generator, *, lr: float, steps: int, batch_size: int
                    ) -> float:
        """``steps`` first-order steps on the workspace's weights (base.first_order_steps, with
        --optimizer, --n-accum, --grad-clip and --grad-checkpointing); the mean training loss."""
        cfg, ws = self.config, self.workspace
        loss, skipped = first_order_steps(
            ws.model, list(ws.ms.params), self._tokenized(), rng, pad_id=ws.pad_id, device=ws.device,
            lr=lr, steps=steps, batch_size=batch_size, optimizer=cfg.optimizer,
            n_accum=cfg.n_accum, grad_clip=cfg.grad_clip, checkpointing=cfg.grad_checkpointing)
        self.last_stats["skipped"] = skipped
        return loss

    def project(self, delta: Sequence[torch.Tensor], rnd: int, client_id: int
                ) -> Tuple[np.ndarray, np.ndarray]:
        """(n_g per group, the coefficients a = <delta_g, z_k> / n_g group by group) of an update:
        one project_seeds_multi per group over its seeds (group_indices)."""
        ms, kk = self.workspace.ms, self.config.num_seeds
        if getattr(self, "numels", None) != [int(p.numel()) for p in ms.params]:
            self._layout([p.numel() for p in ms.params])
        norms = [math.sqrt(sum(float(torch.sum(delta[i].double() ** 2)) for i in range(a, b)))
                 for a, b in self.groups]
        counts = seeds_per_group(norms, kk)
        out = []
        streams = list(ms.streams)
        for g, ((a, b), n) in enumerate(zip(self.groups, counts)):
            idx = group_indices(self.config.seed, rnd, client_id, g, int(n), kk)
            if not math.isfinite(norms[g]):  # a diverged group: nothing to send
                out.append(np.zeros(int(n), np.float32))
                continue
            c = K.project_seeds_multi(delta[a:b], streams[a:b],
                                      torch.tensor(self.pool[idx].view(np.int64)),
                                      noise=ms.noise, backend=ms.backend)
            out.append((c.double().cpu().numpy() / float(n)).astype(np.float32))
        return counts.astype(np.uint32), (np.concatenate(out) if out else np.zeros(0, np.float32))

    def fit(self, down_bytes: bytes) -> bytes:
        m = self._decode(down_bytes)
        self.load_model(m)
        ws = self.workspace
        t0 = time.perf_counter()
        old = [p.detach().clone() for p in ws.ms.params]
        rng = np.random.Generator(np.random.PCG64(m.client_seed))
        self.last_stats = {"round": m.round, "steps": m.local_steps}
        loss = self.local_train(rng, lr=m.lr, steps=m.local_steps, batch_size=m.batch_size)
        t1 = time.perf_counter()
        with torch.no_grad():
            for o, p in zip(old, ws.ms.params):
                o.sub_(p.detach())  # delta = w_old - w_new
        counts, coefs = self.project(old, m.round, m.client_id)
        del old
        self.last_stats.update(train_loss=loss, local_seconds=t1 - t0,
                               project_seconds=time.perf_counter() - t1, coefficients=int(coefs.size))
        return encode_up(FerretUp(round=m.round, client_id=m.client_id,
                                  num_examples=len(self.partition), counts=counts, coefs=coefs,
                                  train_loss=loss, cached=self.cached))


def model_facts(config, ws) -> dict:
    """The server groups the trained tensors by their sizes (Method.model_facts)."""
    return {"numels": [int(p.numel()) for p in ws.ms.params]}


METHOD = Method(
    name="ferret",
    summary="Ferret: first-order local steps, the update projected onto the K-seed pool per "
            "parameter group; the global model is the seed history",
    server=FerretServer, client=FerretClient,
    options=frozenset({"local_steps", "lr", "batch_size", "noise", "num_seeds", "optimizer",
                       "n_accum", "grad_clip", "grad_checkpointing", "server_lr", "seed_clip"}),
    defaults={"lr": 0.03, "local_steps": 10}, model_facts=model_facts)
