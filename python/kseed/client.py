"""FedKSeedClient: one federated client as a plain object over bytes (no engine inside).

``fit(down_bytes) -> up_bytes``: decode and check the server's message (round, seed-pool fingerprint,
K), rebuild the global model w0 + sum_k A_k z_k from a pristine copy of w0 with ONE fused pass, run tau
zeroth-order steps (seed index uniform or by the FedKSeed-Pro probabilities; two passes over the
weights per step), and return the (index, g) list with the example count.  ``evaluate(down_bytes)``
rebuilds and returns the response loss on the client's data.
"""
from __future__ import annotations

from typing import Callable, List, Optional, Sequence

import numpy as np

from . import protocol as P
from .config import RATIO_CLIP, FedConfig
from .modeling import Workspace, batch_loss, collate, eval_loss, tokenize_examples


def lr_range(cfg: FedConfig):
    """(lowest, highest) lr the server may send under ``cfg`` (client-wise lr widens the range)."""
    if not cfg.clientwise_lr:
        return cfg.lr, cfg.lr
    if cfg.lr_rule == "ratio":
        return RATIO_CLIP[0] * cfg.lr, RATIO_CLIP[1] * cfg.lr
    return cfg.lr * (1 - cfg.lr_delta), cfg.lr * (1 + cfg.lr_delta)


def check_down(cfg: FedConfig, m: P.DownMessage) -> None:
    """Refuse a down message whose local settings are not what this client's own config says
    (ProtocolError naming the field): a server, or whoever speaks for it, cannot make the client run
    2^32 steps, use batch 2^32, a perturbation other than --eps, another noise family than --noise,
    an lr outside the configured rule's range, another sampling, or another RNG seed than the one
    derived from (seed, round, client)."""
    def bad(name, got, want):
        raise P.ProtocolError(f"down message field {name} = {got!r} does not match this client's "
                              f"config ({want})")
    if m.noise != cfg.noise:
        raise P.ProtocolError(f"down message noise {m.noise!r} does not match this client's "
                              f"--noise {cfg.noise!r}: the server's global model is built along "
                              f"{m.noise} directions, this client's along {cfg.noise} ones")
    if m.local_steps != cfg.local_steps:
        bad("local_steps", m.local_steps, f"--local-steps {cfg.local_steps}")
    if m.batch_size != cfg.batch_size:
        bad("batch_size", m.batch_size, f"--batch-size {cfg.batch_size}")
    if m.eps != cfg.eps:
        bad("eps", m.eps, f"--eps {cfg.eps}")
    lo, hi = lr_range(cfg)
    tol = 1e-9 * cfg.lr
    if not lo - tol <= m.lr <= hi + tol:
        bad("lr", m.lr, f"--lr {cfg.lr}: between {lo:g} and {hi:g}")
    if (m.probs is not None) != (cfg.sampling == "pro"):
        bad("probs", "present" if m.probs is not None else "absent", f"--sampling {cfg.sampling}")
    if m.round < 1:
        bad("round", m.round, "rounds count from 1")
    want_seed = P.client_rng_seed(cfg.seed, m.round, m.client_id)
    if m.client_seed != want_seed:
        bad("client_seed", m.client_seed, f"derived from --seed {cfg.seed}, the round and the client")


class FedKSeedClient:
    """A client: ``config`` (the run's FedConfig: seed and K give the seed pool), ``model_loader`` (a
    callable returning a ``kseed.modeling.Workspace``; it is called once, lazily), ``partition`` (this
    client's examples: dicts with instruction / input / output)."""

    def __init__(self, config: FedConfig, model_loader: Callable[[], Workspace],
                 partition: Sequence[dict], *, client_id: Optional[int] = None):
        if not partition:
            raise ValueError("a client needs at least one example")
        self.config = config
        self.client_id = client_id
        self._loader = model_loader
        self.partition = list(partition)
        self.seeds = P.seed_pool(config.seed, config.num_seeds)
        self.fingerprint = P.fingerprint(self.seeds)
        self._ws: Optional[Workspace] = None
        self._items = None
        self.last_stats: dict = {}

    @property
    def workspace(self) -> Workspace:
        if self._ws is None:
            self._ws = self._loader()
        return self._ws

    def _tokenized(self):
        if self._items is None:
            self._items = tokenize_examples(self.workspace.tok, self.partition, self.config.max_length,
                                            self.config.prompt_template())
        return self._items

    def _decode(self, down_bytes) -> P.DownMessage:
        m = P.decode_down(down_bytes, expected_k=self.config.num_seeds,
                          expected_fingerprint=self.fingerprint)
        if self.client_id is not None and m.client_id != self.client_id:
            raise P.ProtocolError(f"down message is for client {m.client_id}, this is client "
                                  f"{self.client_id}")
        check_down(self.config, m)
        return m

    def rebuild(self, coefs: np.ndarray) -> None:
        self.workspace.rebuild(self.seeds, coefs)

    def fit(self, down_bytes: bytes) -> bytes:
        m = self._decode(down_bytes)
        ws = self.workspace
        if ws.ms.noise != m.noise:
            raise P.ProtocolError(f"down message noise {m.noise!r} does not match this client's "
                                  f"workspace (built with noise {ws.ms.noise!r})")
        ws.rebuild(self.seeds, m.coefs)
        items = self._tokenized()
        k, tau = m.k, m.local_steps
        rng = np.random.Generator(np.random.PCG64(m.client_seed))
        if m.probs is not None:
            p = m.probs.astype(np.float64)
            idx = rng.choice(k, size=tau, p=p / p.sum())
        else:
            idx = rng.integers(0, k, size=tau)
        bs = min(m.batch_size, len(items))
        order = [rng.choice(len(items), size=bs, replace=False) for _ in range(tau)]
        kept_idx: List[int] = []
        kept_g: List[float] = []
        losses: List[float] = []
        skipped = 0
        for t in range(tau):
            batch = collate([items[i] for i in order[t]], ws.pad_id, ws.device)
            nxt = int(self.seeds[idx[t + 1]]) if t + 1 < tau else None
            res = ws.ms.zo_step(int(self.seeds[idx[t]]), lambda: batch_loss(ws.model, batch),
                                eps=m.eps, lr=m.lr, next_seed=nxt)
            if res.skipped:
                skipped += 1
                continue
            kept_idx.append(int(idx[t]))
            kept_g.append(res.g)
            losses.append(0.5 * (res.loss_plus + res.loss_minus))
        ws.ms.restore_pending()
        train_loss = float(np.mean(losses)) if losses else float("nan")
        self.last_stats = {"round": m.round, "steps": tau, "skipped": skipped,
                           "train_loss": train_loss}
        up = P.UpMessage(round=m.round, client_id=m.client_id, num_examples=len(self.partition),
                         indices=np.array(kept_idx, dtype=np.uint32),
                         grads=np.array(kept_g, dtype=np.float32), train_loss=train_loss)
        return P.encode_up(up, k=k)

    def evaluate(self, down_bytes: Optional[bytes] = None, examples: Optional[Sequence[dict]] = None,
                 batch_size: int = 16) -> dict:
        """Response loss of the global model (rebuilt from ``down_bytes`` if given) on ``examples``
        (default: this client's partition)."""
        if down_bytes is not None:
            self.rebuild(self._decode(down_bytes).coefs)
        items = (self._tokenized() if examples is None else
                 tokenize_examples(self.workspace.tok, examples, self.config.max_length,
                                   self.config.prompt_template()))
        loss = eval_loss(self.workspace.model, items, self.workspace.pad_id, self.workspace.device,
                         batch_size)
        return {"loss": loss, "num_examples": len(items)}
