"""The method interface: what every federated method supplies, and the parts they share.

A method is one module of this package plus one line of its registry (``kseed.methods.REGISTRY``).
The module defines a ``METHOD = Method(...)``: its name, its server and client classes, and the
FedConfig fields it uses (its own options; kseed-fed refuses the options of other methods).

Server side (a plain object over bytes; any engine drives it the same way, round r = 1, 2, ...)::

    server = METHOD.server(config, base_identity=..., workdir=run_dir)
    ids = server.sample_clients(r)
    downs = {c: server.make_down(r, c) for c in ids}         # bytes to send
    stats = server.aggregate(r, {c: upload_bytes, ...}, weights={c: examples})   # the round's stats
    server.load_global(workspace)                             # the global model, for evaluation
    server.state_dict() / load_state_dict(...)                # checkpoints

Client side: ``METHOD.client(config, model_loader, partition, client_id=c, shared=server or None,
cache_dir=None, memory_budget_mib=None)`` with ``fit(down bytes) -> up bytes`` and
``evaluate(down bytes, examples)``.  ``shared``: the in-process engine's clients share the server's
workspace, and through it its global model; ``cache_dir``: a Flower SuperNode's model cache (node
config ``cache-dir``), for the methods that use one; ``memory_budget_mib``: the memory a SuperNode
gives its client (node config ``memory-budget-mib``), for the methods that size themselves to it.

The shared parts below: the threat model's bounds on one round's uploads (bound_uploads), client
sampling and the client-wise learning rates (SeedServer), the checkpoint helpers, and the local
zeroth-order loop (SeedClient.local_steps).
"""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from typing import (Callable, Dict, FrozenSet, List, Mapping, Optional, Sequence, Tuple)

import numpy as np

from .. import protocol as P
from ..config import RATIO_CLIP, FedConfig
from ..modeling import (Workspace, batch_loss, collate, eval_loss, loss_sum,
                        tokenize_examples)

log = logging.getLogger("kseed.server")


FIVE = 5  # losses kept per client: the 'five-round' signal of the client-wise lr


class NotEnoughReplies(RuntimeError):
    """Fewer valid uploads than the minimum: the round was not applied (state unchanged)."""


def lower_median(values) -> float:
    """The ((n-1)//2)-th smallest value: the median for odd n, the smaller middle value for even n.

    The round's bounds scale with it, so with at most (n-1)//2 outliers among n values (one of 2, one
    of 3 or 4, two of 5 or 6) it lies between two honest values: an outlier can lower it but not
    raise it above every honest value."""
    v = np.sort(np.asarray(values, dtype=np.float64))
    return float(v[(len(v) - 1) // 2])


@dataclass
class Bounded:
    """What bound_uploads made of a round's accepted uploads (in their order)."""
    grads: List[np.ndarray]  # float64 g per client, after the |g| clip and the norm bound
    weights: np.ndarray  # aggregation weights (unnormalised)
    losses: List[float]  # reported training losses after the loss bound (NaN: none)
    clipped: Dict[int, str] = field(default_factory=dict)  # client -> what was bounded and how
    limits: Dict[str, Optional[float]] = field(default_factory=dict)  # the round's limits


def bound_uploads(c: FedConfig, ups: Sequence[P.UpMessage],
                  known_examples: Optional[Mapping[int, float]] = None) -> Bounded:
    """Bound each client's influence on the round (a pure function of the config and the uploads, so
    deterministic and resumable).  Limits are multiples of the round's lower median (lower_median), so
    a minority of clients cannot raise them; 0 in the config turns a bound off.

    1. |g| <= g_clip x (lower median over the clients of each one's median nonzero |g|), and
       <= g_clip_abs when set: caps single absurd values (one pair with g = 1e4); the same limit
       holds for the sum of a client's g on one seed index (one index repeated tau times with
       g = 1e6 counts as one clipped pair, not tau of them: repeated on every round, one direction
       would otherwise grow linearly while honest noise grows as a square root).
    2. The client's update in coefficient space, u_c = sum of its g per seed index (so a seed index
       repeated tau times counts tau times), has ||u_c|| <= norm_bound x (lower median of the
       nonzero norms): norm bounding (Sun et al., 2019); a longer u_c is scaled down.
    3. Weights: ``known_examples`` (the true sizes, when the engine knows them; a claim that differs is
       reported) or the claimed example counts capped at weight_cap x their lower median; ones with
       equal_weights.
    4. Reported losses (they drive the client-wise lr and the train_loss metric) clipped to
       [0, loss_cap x their lower median].
    A bound that does not bind leaves the values untouched (bitwise), so an honest round is unchanged.
    """
    notes: Dict[int, List[str]] = {m.client_id: [] for m in ups}
    grads = [m.grads.astype(np.float64) for m in ups]
    limits: Dict[str, Optional[float]] = {"g": None, "norm": None, "examples": None, "loss": None}
    # 1. per-pair |g|
    lim = c.g_clip_abs if c.g_clip_abs > 0 else math.inf
    if c.g_clip > 0:
        scales = [float(np.median(np.abs(g[g != 0]))) for g in grads if np.any(g != 0)]
        if scales:
            lim = min(lim, c.g_clip * lower_median(scales))
    if math.isfinite(lim):
        limits["g"] = lim
        for i, m in enumerate(ups):
            n = int(np.count_nonzero(np.abs(grads[i]) > lim))
            if n:
                grads[i] = np.clip(grads[i], -lim, lim)
                notes[m.client_id].append(f"{n} of {m.tau} |g| clipped to {lim:.4g}")
            # the same bound on the sum of g per seed index: a seed index repeated tau times counts
            # as one pair (scaled pairs of that index; an honest client rarely repeats an index)
            idx = m.indices.astype(np.int64)
            u = np.bincount(idx, weights=grads[i], minlength=c.num_seeds)
            over = np.abs(u) > lim
            if over.any():
                f = np.ones_like(u)
                f[over] = lim / np.abs(u[over])
                grads[i] = grads[i] * f[idx]
                notes[m.client_id].append(f"the sum of g on {int(over.sum())} seed indices "
                                          f"clipped to {lim:.4g}")
    # 2. update norm
    if c.norm_bound > 0:
        norms = [float(np.linalg.norm(np.bincount(m.indices.astype(np.int64), weights=g,
                                                  minlength=c.num_seeds)))
                 for m, g in zip(ups, grads)]
        pos = [n for n in norms if n > 0]
        if pos:
            bound = c.norm_bound * lower_median(pos)
            limits["norm"] = bound
            for i, m in enumerate(ups):
                if norms[i] > bound:
                    grads[i] = grads[i] * (bound / norms[i])
                    notes[m.client_id].append(f"update norm {norms[i]:.4g} scaled to {bound:.4g}")
    # 3. weights
    claims = np.array([float(m.num_examples) for m in ups], dtype=np.float64)
    if c.equal_weights:
        w = np.ones(len(ups))
    elif known_examples is not None:
        w = np.array([float(known_examples[m.client_id]) for m in ups], dtype=np.float64)
        if not (np.isfinite(w).all() and (w >= 0).all() and w.sum() > 0):
            raise ValueError("aggregation weights must be finite, >= 0 and not all 0")
        for m, wc in zip(ups, w):
            if m.num_examples != wc:
                notes[m.client_id].append(f"claimed {m.num_examples} examples, weighted by the "
                                          f"known {wc:g}")
    else:
        w = claims
        if c.weight_cap > 0:
            cap = c.weight_cap * lower_median(claims)
            limits["examples"] = cap
            if (claims > cap).any():
                w = np.minimum(claims, cap)
                for m in ups:
                    if m.num_examples > cap:
                        notes[m.client_id].append(f"claimed {m.num_examples} examples, capped to "
                                                  f"{cap:g}")
    # 4. reported losses
    losses = [float(m.train_loss) for m in ups]
    if c.loss_cap > 0:
        ok = [l for l in losses if math.isfinite(l)]
        if ok:
            top = c.loss_cap * max(0.0, lower_median(ok))
            limits["loss"] = top
            for i, m in enumerate(ups):
                l = losses[i]
                if math.isfinite(l) and not 0 <= l <= top:
                    losses[i] = min(max(l, 0.0), top)
                    notes[m.client_id].append(f"loss {l:.4g} clipped to {losses[i]:.4g}")
    return Bounded(grads=grads, weights=w, losses=losses,
                   clipped={cid: "; ".join(v) for cid, v in notes.items() if v}, limits=limits)


def _typed(state: dict, key: str, kind: type):
    v = state[key]
    if isinstance(v, bool) or not isinstance(v, kind):
        raise TypeError(f"field {key!r} must be {kind.__name__}, got {type(v).__name__}")
    return v


def _number(key: str, v) -> float:
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
        raise TypeError(f"field {key!r} holds {v!r}, not a finite number")
    return float(v)


def _losses(v) -> List[float]:
    if not isinstance(v, list) or not 1 <= len(v) <= FIVE:
        raise TypeError(f"field 'client_loss_hist' holds {v!r}, not a list of 1 to {FIVE} losses")
    return [_number("client_loss_hist", x) for x in v]


def _client_map(state: dict, key: str, conv, optional: bool = False) -> dict:
    """{client id: conv(value)} from a checkpoint's {"id": value} object, in client order."""
    if optional and key not in state:
        return {}
    d = _typed(state, key, dict)
    out = {}
    for a in sorted(d, key=lambda x: int(x) if str(x).isdigit() else -1):
        if not isinstance(a, str) or not a.isdigit():
            raise TypeError(f"field {key!r} has the key {a!r}, not a client id")
        out[int(a)] = conv(d[a])
    return out




# ------------------------------------------------------------------------------------ methods
@dataclass(frozen=True)
class Method:
    """A registry entry: the method's name, its server and client classes, and its options.

    ``options``: the FedConfig fields of the method groups (``METHOD_FIELDS``) this method uses;
    the others are refused when given.  ``ignores``: fields of the shared groups it has no use for
    (refused too).  ``fixed``: fields the method sets itself (e.g. MeZO's one client).
    ``model_facts``: see the field."""
    name: str
    summary: str
    server: type
    client: type
    options: FrozenSet[str]
    ignores: FrozenSet[str] = frozenset()
    fixed: Mapping[str, object] = field(default_factory=dict)
    defaults: Mapping[str, object] = field(default_factory=dict)  # its own defaults of shared fields
    # model_facts(config, workspace) -> dict: what the method's server needs to know of the model
    # (it has no model of its own), added to the base identity by kseed.task.load_workspace
    model_facts: Optional[Callable] = None

    def configure(self, values: dict) -> dict:
        """``values`` (the FedConfig fields given) over the method's defaults, with its fixed fields
        set."""
        return {**self.defaults, **values, **self.fixed, "method": self.name}


# The fields of the method groups of kseed-fed's options: each group is the options of the methods
# that use them (a method's own options sit in its group).
METHOD_GROUPS = {
    "zeroth-order local training (fedkseed, fedmezo, mezo)": (
        "local_steps", "lr", "eps", "batch_size", "noise", "clientwise_lr", "lr_rule", "lr_signal",
        "lr_delta"),
    "fedkseed: the K-seed pool": ("num_seeds", "sampling", "pro_clip"),
    "ferret: first-order local steps projected onto the K-seed pool (with --local-steps, --lr, "
    "--batch-size, --noise, -K)": (
        "optimizer", "n_accum", "grad_clip", "grad_checkpointing", "server_lr", "seed_clip"),
    "fedit, fedpipe: LoRA adapters (peft, kseed[lora]) trained by local AdamW steps (with "
    "--local-steps, --lr, --batch-size, --n-accum, --grad-clip)": (
        "lora_rank", "lora_alpha", "lora_dropout", "lora_targets"),
    "fedpipe: weight selection on a calibration set, per-client ranks and quantized frozen models "
    "from memory budgets (with the LoRA options; --lora-rank is the largest rank)": (
        "select_fraction", "calib_size", "client_budgets"),
}
METHOD_FIELDS = frozenset(f for fs in METHOD_GROUPS.values() for f in fs)


def lr_range(cfg: FedConfig):
    """(lowest, highest) lr the server may send under ``cfg`` (client-wise lr widens the range)."""
    if not cfg.clientwise_lr:
        return cfg.lr, cfg.lr
    if cfg.lr_rule == "ratio":
        return RATIO_CLIP[0] * cfg.lr, RATIO_CLIP[1] * cfg.lr
    return cfg.lr * (1 - cfg.lr_delta), cfg.lr * (1 + cfg.lr_delta)


def check_local(cfg: FedConfig, *, noise: str, local_steps: int, batch_size: int, eps: float,
                lr: float, rnd: int, client_id: int, client_seed: int,
                also: Optional[Callable] = None) -> None:
    """Refuse a down message whose local settings are not what this client's own config says
    (ProtocolError naming the field): a server, or whoever speaks for it, cannot make the client run
    2^32 steps, use batch 2^32, a perturbation other than --eps, another noise family than --noise,
    an lr outside the configured rule's range, or another RNG seed than the one derived from (seed,
    round, client).  ``also(bad)``: the method's own checks, after the lr's."""
    def bad(name, got, want):
        raise P.ProtocolError(f"down message field {name} = {got!r} does not match this client's "
                              f"config ({want})")
    if noise != cfg.noise:
        raise P.ProtocolError(f"down message noise {noise!r} does not match this client's "
                              f"--noise {cfg.noise!r}: the server's global model is built along "
                              f"{noise} directions, this client's along {cfg.noise} ones")
    if local_steps != cfg.local_steps:
        bad("local_steps", local_steps, f"--local-steps {cfg.local_steps}")
    if batch_size != cfg.batch_size:
        bad("batch_size", batch_size, f"--batch-size {cfg.batch_size}")
    if eps != cfg.eps:
        bad("eps", eps, f"--eps {cfg.eps}")
    lo, hi = lr_range(cfg)
    tol = 1e-9 * cfg.lr
    if not lo - tol <= lr <= hi + tol:
        bad("lr", lr, f"--lr {cfg.lr}: between {lo:g} and {hi:g}")
    if also is not None:
        also(bad)
    if rnd < 1:
        bad("round", rnd, "rounds count from 1")
    want_seed = P.client_rng_seed(cfg.seed, rnd, client_id)
    if client_seed != want_seed:
        bad("client_seed", client_seed, f"derived from --seed {cfg.seed}, the round and the client")


# ------------------------------------------------------------------------------------- server
class SeedServer:
    """What the servers of the zeroth-order methods share: client sampling and RNG seeds derived
    statelessly from (run seed, round, client), the client-wise learning rates (FedMeZO's rule or
    kseed's ratio rule) from the clients' last losses or updates, the validation and bounding of a
    round's uploads, and the checkpoint fields of that state.  A subclass supplies make_down,
    aggregate (through collect and record_clients), load_global and its own state."""

    method = ""
    files: Tuple[str, ...] = ()  # the files it keeps in the run directory (workdir)
    shares_model = False  # the in-process engine sets it: its clients share the server's workspace

    def __init__(self, config: FedConfig, *, base_identity: Optional[dict] = None,
                 workdir: Optional[str] = None, readonly: bool = False):
        self.config = config
        self.workdir = workdir  # the run directory (None: nothing on disk)
        self.readonly = readonly  # read the run directory's files, never write them (export)
        self.client_loss_hist: Dict[int, List[float]] = {}  # last FIVE reported (bounded) losses
        self.client_diff: Dict[int, float] = {}  # |last update - the round's mean update|
        self.round = 0  # rounds completed
        self.base_identity = dict(base_identity or {})
        self._lrs_cache = None  # (round, {client: lr})

    def close(self) -> None:
        """Release what the server holds open (files)."""

    def export_info(self) -> dict:
        """What kseed-fed export records about the exported global model (kseed_export.json)."""
        return {}

    @property
    def client_loss(self) -> Dict[int, float]:
        """Each known client's last reported training loss (after the loss bound)."""
        return {c: h[-1] for c, h in self.client_loss_hist.items()}

    # ----------------------------------------------------------------------------- sampling
    def sample_clients(self, rnd: int) -> List[int]:
        """The clients of round ``rnd`` (sorted ids in [0, num_clients)), a pure function of
        (run seed, round)."""
        c = self.config
        rng = np.random.Generator(np.random.PCG64(P.derive_seed(c.seed, 1, rnd)))
        pick = rng.choice(c.num_clients, size=c.clients_per_round, replace=False)
        return sorted(int(x) for x in pick)

    def client_seed(self, rnd: int, client_id: int) -> int:
        return P.client_rng_seed(self.config.seed, rnd, client_id)

    def _signal(self, client_id: int) -> Optional[float]:
        """s_i of the FedMeZO rule for a client, None when the client has none yet."""
        kind = self.config.lr_signal
        if kind == "model-diff":
            return self.client_diff.get(client_id)
        hist = self.client_loss_hist.get(client_id)
        if not hist:
            return None
        return float(hist[-1]) if kind == "round-wise" else float(np.mean(hist[-FIVE:]))

    def round_lrs(self, rnd: int) -> Dict[int, float]:
        """{client: lr} for the clients of round ``rnd``: the base lr, or with --clientwise-lr

        - ``fedmezo`` (FedMeZO's set_dynamic_lr): lr_i = lr0 + delta (s_i - mean s) / max_j |s_j -
          mean s| over the round's clients that have a signal s (delta = lr_delta x lr0; a client
          without a signal, or a round where all s are equal, gets lr0), so lr_i lies in
          [lr0 - delta, lr0 + delta] whatever the clients report;
        - ``ratio`` (kseed's earlier rule): lr0 times the client's last loss over the mean of the known
          clients' last losses, clipped to [0.5, 2].
        """
        if self._lrs_cache is not None and self._lrs_cache[0] == rnd:
            return self._lrs_cache[1]
        c = self.config
        ids = self.sample_clients(rnd)
        out = {cid: c.lr for cid in ids}
        if c.clientwise_lr and c.lr_rule == "ratio":
            known = self.client_loss
            mean = float(np.mean([known[k] for k in sorted(known)])) if known else 0.0
            if mean > 0 and math.isfinite(mean):
                for cid in ids:
                    if cid in known:
                        out[cid] = c.lr * float(np.clip(known[cid] / mean, *RATIO_CLIP))
        elif c.clientwise_lr:
            sig = {cid: self._signal(cid) for cid in ids}
            sig = {cid: v for cid, v in sig.items() if v is not None and math.isfinite(v)}
            if sig:
                vals = np.array([sig[cid] for cid in sorted(sig)], dtype=np.float64)
                dev = vals - vals.mean()
                top = float(np.abs(dev).max())
                if top > 0 and math.isfinite(top):
                    delta = c.lr_delta * c.lr
                    for cid, d in zip(sorted(sig), dev):
                        out[cid] = c.lr + delta * float(d) / top
        self._lrs_cache = (rnd, out)
        return out

    def client_lr(self, client_id: int, rnd: Optional[int] = None) -> float:
        """The lr client ``client_id`` gets in round ``rnd`` (default: the next round)."""
        rnd = self.round + 1 if rnd is None else rnd
        return self.round_lrs(rnd).get(client_id, self.config.lr)

    # ------------------------------------------------------------------------------ messages
    def _check_round(self, rnd: int) -> None:
        if rnd != self.round + 1:
            raise ValueError(f"round {rnd} is not the next round (completed: {self.round})")

    def _check_client(self, client_id: int) -> None:
        if not 0 <= client_id < self.config.num_clients:
            raise ValueError(f"client id {client_id} out of range [0, {self.config.num_clients})")

    def collect(self, rnd: int, uploads: Mapping[int, bytes], decode: Callable[[bytes, int], object]
                ) -> Tuple[list, Dict[int, str], int]:
        """(accepted uploads decoded by ``decode(data, client)`` in client order, {client: why
        rejected}, bytes received).  Malformed or unexpected uploads are rejected and logged;
        NotEnoughReplies when fewer than ``min_replies`` remain (nothing changes)."""
        c = self.config
        expected = set(self.sample_clients(rnd))
        accepted: list = []
        rejected: Dict[int, str] = {}
        bytes_up = 0
        for cid in sorted(uploads):
            data = uploads[cid]
            try:
                bytes_up += len(data)
            except TypeError:
                pass
            if cid not in expected:
                rejected[cid] = f"client {cid} was not sampled in round {rnd}"
            else:
                try:
                    accepted.append(decode(data, cid))
                    continue
                except P.ProtocolError as exc:
                    rejected[cid] = str(exc)
            log.warning("round %d: rejected upload of client %s: %s", rnd, cid, rejected[cid])
        if len(accepted) < max(1, c.min_replies):
            raise NotEnoughReplies(f"round {rnd}: {len(accepted)} valid uploads, need "
                                   f"{max(1, c.min_replies)}; rejected: {rejected}")
        return accepted, rejected, bytes_up

    def record_clients(self, rnd: int, accepted: Sequence, b: "Bounded", w: np.ndarray,
                       deltas: Sequence[np.ndarray], rejected: Dict[int, str], bytes_up: int
                       ) -> dict:
        """Keep each accepted client's distance from the round's mean update (``deltas``: each
        client's update as one vector of a common space; ``w``: the normalised weights) and its last
        losses; complete the round; return its statistics."""
        mean_delta = np.sum([wc * d for wc, d in zip(w, deltas)], axis=0)
        for m, d, loss in zip(accepted, deltas, b.losses):
            self.client_diff[m.client_id] = float(np.linalg.norm(d - mean_delta))
            if math.isfinite(loss):
                hist = self.client_loss_hist.setdefault(m.client_id, [])
                hist.append(float(loss))
                del hist[:-FIVE]
        losses = [(l, wc) for l, wc in zip(b.losses, w) if math.isfinite(l)]
        train_loss = (sum(l * wc for l, wc in losses) / sum(wc for _, wc in losses)
                      if losses else float("nan"))
        for cid, why in sorted(b.clipped.items()):
            log.warning("round %d: bounded upload of client %s: %s", rnd, cid, why)
        self.round = rnd
        self._lrs_cache = None
        return {"round": rnd, "accepted": [m.client_id for m in accepted], "rejected": rejected,
                "clipped": b.clipped, "bounds": b.limits,
                "train_loss": float(train_loss), "num_examples": int(sum(m.num_examples
                                                                         for m in accepted)),
                "steps": int(sum(m.tau for m in accepted)), "bytes_up": int(bytes_up)}

    # ---------------------------------------------------------------------------- checkpoints
    def client_state(self) -> dict:
        """The checkpoint fields of the shared state (JSON-able)."""
        return {
            "client_loss": {str(k): v for k, v in sorted(self.client_loss.items())},
            "client_loss_hist": {str(k): list(v) for k, v in sorted(self.client_loss_hist.items())},
            "client_diff": {str(k): v for k, v in sorted(self.client_diff.items())},
        }

    def read_client_state(self, state: dict) -> Tuple[dict, dict]:
        """(client_loss_hist, client_diff) from a checkpoint (KeyError / ValueError / TypeError on
        a bad one, for the caller to name)."""
        last = _client_map(state, "client_loss", lambda v: [_number("client_loss", v)])
        hist = _client_map(state, "client_loss_hist", lambda v: _losses(v), optional=True)
        diff = _client_map(state, "client_diff", lambda v: _number("client_diff", v), optional=True)
        if not hist:  # an older checkpoint: the last loss only
            hist = last
        elif {c: h[-1] for c, h in hist.items()} != {c: h[-1] for c, h in last.items()}:
            raise ValueError("client_loss and client_loss_hist differ")
        return hist, diff

    def read_checkpoint(self, state: dict, fmt: str, own: Callable[[dict], object]):
        """The opening every server checkpoint is read with: its format ``fmt``, this method, the
        run fingerprint, the round and the client state, then ``own(state)``, the method's own
        fields; a missing or mistyped field is a ValueError naming it.  Returns (fingerprint bytes,
        round, client_loss_hist, client_diff, own(state))."""
        if not isinstance(state, dict) or state.get("format") != fmt:
            raise ValueError(f"not a {self.method} server checkpoint (format field missing or "
                             "unknown)")
        try:
            if _typed(state, "method", str) != self.method:
                raise ValueError(f"it is a {state['method']} checkpoint, this run is {self.method}")
            fp = bytes.fromhex(_typed(state, "fingerprint", str))
            rnd = _typed(state, "round", int)
            mine = own(state)
            hist, diff = self.read_client_state(state)
        except KeyError as exc:
            raise ValueError(f"corrupt server checkpoint: field {exc} missing") from None
        except (ValueError, TypeError) as exc:
            raise ValueError(f"corrupt server checkpoint: {exc}") from None
        return fp, rnd, hist, diff, mine

    def check_base_identity(self, state: dict) -> None:
        ident = state.get("base_identity") or {}
        if not isinstance(ident, dict):
            raise ValueError("corrupt server checkpoint: field 'base_identity' is not an object")
        if self.base_identity and ident and ident.get("hash") != self.base_identity.get("hash"):
            raise ValueError(f"checkpoint was made with another base model (hash "
                             f"{str(ident.get('hash'))[:12]}..., this model "
                             f"{str(self.base_identity.get('hash'))[:12]}...)")

    def parameters_trained(self, ws: Workspace) -> int:
        """The number of trained parameters (the summary's): every trainable tensor of ``ws``."""
        return int(ws.ms.numel)

    def load_global(self, ws: Workspace) -> None:  # pragma: no cover - every method defines it
        """Set ``ws``'s weights to the current global model."""
        raise NotImplementedError


# ------------------------------------------------------------------------------ first order
def first_order_steps(model, params: Sequence, items: Sequence[tuple], rng: np.random.Generator, *,
                      pad_id: int, device, lr: float, steps: int, batch_size: int,
                      optimizer: str = "sgd", n_accum: int = 1, grad_clip: float = 0.0,
                      checkpointing: bool = False) -> Tuple[float, int]:
    """``steps`` first-order steps on ``params`` (tensors of ``model``) with a fresh optimizer (SGD
    with momentum 0, or AdamW with weight decay 0), each on ``n_accum`` batches of ``batch_size``
    examples drawn by ``rng`` without replacement, its gradient norm clipped to ``grad_clip`` (0:
    off); optional activation checkpointing.  A step where a micro-batch has no response token or a
    non-finite loss is skipped (no update).  Returns (the mean loss of the micro-batches, NaN when
    none had a finite one; the steps skipped).  The parameters' requires_grad flags are restored."""
    import torch
    params = list(params)
    bs = min(batch_size, len(items))
    opt = (torch.optim.SGD(params, lr=lr, momentum=0.0, weight_decay=0.0)
           if optimizer == "sgd" else torch.optim.AdamW(params, lr=lr, weight_decay=0.0))
    was = [p.requires_grad for p in params]
    training = model.training
    if checkpointing:
        model.gradient_checkpointing_enable()
        model.train()
    losses, skipped = [], 0
    try:
        for p in params:
            p.requires_grad_(True)
        for _ in range(steps):
            ok = True
            for _ in range(n_accum):
                batch = collate([items[i] for i in rng.choice(len(items), size=bs, replace=False)],
                                pad_id, device)
                total, n = loss_sum(model, batch)
                loss = total / max(n, 1)
                if n == 0 or not torch.isfinite(loss):
                    ok = False
                    continue
                (loss / n_accum).backward()
                losses.append(loss.item())
            if ok and grad_clip > 0:
                torch.nn.utils.clip_grad_norm_(params, grad_clip)
            if ok:
                opt.step()
            else:
                skipped += 1
            opt.zero_grad(set_to_none=True)
    finally:
        for p, r in zip(params, was):
            p.requires_grad_(r)
            p.grad = None
        if checkpointing:
            model.gradient_checkpointing_disable()
            model.train(training)
    return (float(np.mean(losses)) if losses else float("nan")), skipped


# ------------------------------------------------------------------------------------- client
def positive_mib(value, what: str) -> float:
    """A memory size in MiB from a config or a node config (a number or a numeric string): finite
    and > 0, else ValueError naming ``what``."""
    if isinstance(value, bool):
        raise ValueError(f"{what} must be a number of MiB, not {value!r}")
    try:
        v = float(value.strip() if isinstance(value, str) else value)
    except (TypeError, ValueError):
        raise ValueError(f"{what} must be a number of MiB, not {value!r}") from None
    if not (math.isfinite(v) and v > 0):
        raise ValueError(f"{what} must be finite and > 0 MiB, not {value!r}")
    return v


class SeedClient:
    """What the clients of the zeroth-order methods share: ``config`` (the run's FedConfig),
    ``model_loader`` (a callable returning a ``kseed.modeling.Workspace``; it is called once,
    lazily), ``partition`` (this client's examples: dicts with instruction / input / output), the
    tokenised data, the local zeroth-order loop and the evaluation.  ``memory_budget_mib``: the
    memory this client's node gives it (a Flower SuperNode's node config ``memory-budget-mib``; None:
    not given), for the methods that size themselves to it (FedPipe)."""

    def __init__(self, config: FedConfig, model_loader: Callable[[], Workspace],
                 partition: Sequence[dict], *, client_id: Optional[int] = None,
                 memory_budget_mib: Optional[float] = None):
        if not partition:
            raise ValueError("a client needs at least one example")
        if memory_budget_mib is not None:
            memory_budget_mib = positive_mib(memory_budget_mib, "memory-budget-mib")
        self.config = config
        self.client_id = client_id
        self.memory_budget_mib = memory_budget_mib
        self._loader = model_loader
        self.partition = list(partition)
        self._ws: Optional[Workspace] = None
        self._items = None
        self.last_stats: dict = {}

    @property
    def workspace(self) -> Workspace:
        if self._ws is None:
            self._ws = self._loader()
        return self._ws

    def tokenizer(self):
        """The base model's tokenizer (the workspace's)."""
        return self.workspace.tok

    @property
    def rebuild_seconds(self) -> float:
        """Seconds this client's workspace spent rebuilding models (0 when it loaded none)."""
        return self._ws.rebuild_seconds if self._ws is not None else 0.0

    def base_model_hash(self) -> Optional[str]:
        """model_hash of the base model this client loaded (its workspace's; None: none loaded)."""
        return self._ws.identity.get("hash") if self._ws is not None else None

    def _tokenized(self):
        if self._items is None:
            self._items = tokenize_examples(self.tokenizer(), self.partition, self.config.max_length,
                                            self.config.prompt_template())
        return self._items

    def _check_for_me(self, client_id: int) -> None:
        if self.client_id is not None and client_id != self.client_id:
            raise P.ProtocolError(f"down message is for client {client_id}, this is client "
                                  f"{self.client_id}")

    def local_steps(self, seeds: Sequence[int], rng: np.random.Generator, *, eps: float, lr: float,
                    batch_size: int, rnd: int) -> Tuple[List[int], List[float], float]:
        """tau = len(seeds) two-point zeroth-order steps from the workspace's current weights, step t
        along z(seeds[t]) on a batch drawn by ``rng`` (two passes over the weights per step; the weights
        end at the local model).  Returns (the steps taken, their g, the mean training loss); a step
        whose g is not finite is skipped (the weights only restored)."""
        ws = self.workspace
        items = self._tokenized()
        tau = len(seeds)
        bs = min(batch_size, len(items))
        order = [rng.choice(len(items), size=bs, replace=False) for _ in range(tau)]
        kept: List[int] = []
        kept_g: List[float] = []
        losses: List[float] = []
        skipped = 0
        for t in range(tau):
            batch = collate([items[i] for i in order[t]], ws.pad_id, ws.device)
            nxt = int(seeds[t + 1]) if t + 1 < tau else None
            res = ws.ms.zo_step(int(seeds[t]), lambda: batch_loss(ws.model, batch),
                                eps=eps, lr=lr, next_seed=nxt)
            if res.skipped:
                skipped += 1
                continue
            kept.append(t)
            kept_g.append(res.g)
            losses.append(0.5 * (res.loss_plus + res.loss_minus))
        ws.ms.restore_pending()
        train_loss = float(np.mean(losses)) if losses else float("nan")
        self.last_stats = {"round": rnd, "steps": tau, "skipped": skipped, "train_loss": train_loss}
        return kept, kept_g, train_loss

    def load(self, down_bytes) -> None:  # pragma: no cover - every method defines it
        """Decode ``down_bytes`` and set the workspace's weights to the global model it names."""
        raise NotImplementedError

    def evaluate(self, down_bytes: Optional[bytes] = None, examples: Optional[Sequence[dict]] = None,
                 batch_size: int = 16) -> dict:
        """Response loss of the global model (loaded from ``down_bytes`` if given) on ``examples``
        (default: this client's partition)."""
        if down_bytes is not None:
            self.load(down_bytes)
        items = (self._tokenized() if examples is None else
                 tokenize_examples(self.workspace.tok, examples, self.config.max_length,
                                   self.config.prompt_template()))
        loss = eval_loss(self.workspace.model, items, self.workspace.pad_id, self.workspace.device,
                         batch_size)
        return {"loss": loss, "num_examples": len(items)}
