"""FedIT (Zhang et al., ICASSP 2024, "Towards Building the Federated GPT"; JayZhang42/FederatedGPT-
Shepherd): every client fine-tunes LoRA adapters (peft) on its frozen base model with local AdamW
steps, the server averages the adapters' weights by the clients' examples (FedAvg).

The global model is the base model w0 plus the global adapter, merged: W = W0 + (alpha / r) B A for
every target module (kseed.lora.merge_into); evaluation and export use the merged, plain model, so an
exported directory is an ordinary Hugging Face model that loads without peft.

Round r, client c (``FedITClient.fit``): the down message carries the global adapter; the client
injects peft's LoRA into its base model (kseed.lora.LoraModel), loads the adapter, runs tau =
--local-steps AdamW steps (a FRESH optimizer every round: no optimizer state is kept across rounds, so
none is in the checkpoint) with weight decay 0 on batches of --batch-size drawn by the client RNG (the
down message's client seed, as every method's batches; LoRA dropout draws from a torch generator seeded
from it too), --n-accum micro-batches per step and gradient-norm clip --grad-clip; it uploads its
adapter.

Server (``FedITServer.aggregate``): a client's update is u_c = a_c - a_global (float64), bounded by
the threat model's norm bound (base.bound_uploads: ||u_c|| <= --norm-bound x the round's lower median
of the nonzero norms; the loss and example bounds as for every method); the new global adapter is the
FedAvg sum_c w_c a'_c (float64 sums in client order, stored float32) with a'_c = a_c, or a_global +
the scaled u_c for a bounded client.  The first global adapter is peft's default initialisation drawn
from the run seed: A ~ U(-1/sqrt(in), 1/sqrt(in)), B = 0 (kseed.lora.init_adapter), so round 0 is the
base model.  The per-element |g| clip of the zeroth-order methods (--g-clip, --g-clip-abs) has no
meaning for adapter weights: FedIT fixes them at 0 and refuses them.

Wire format (kseed.lora's; little-endian; every field checked, ProtocolError naming it).

Down, magic b"KLD1", version 1, 56 + 4 N bytes for an adapter of N = rank x sum(in + out) floats::

    0      4   magic
    4      2   version (uint16) = 1
    6      2   flags (uint16) = 0
    8      4   round (uint32, >= 1)
    12     4   client id (uint32)
    16     8   layout fingerprint (SHA-256 prefix of the targets, their shapes, alpha and dropout)
    24     4   local steps (uint32)
    28     4   batch size (uint32, >= 1)
    32     8   lr (float64)
    40     8   client RNG seed (uint64)
    48     4   rank (uint32)
    52     4   N (uint32)
    56   4 N   the global adapter (float32, finite): per target A (rank x in) then B (out x rank)

Up, magic b"KLU1", version 1, 36 + 4 N bytes::

    0      4   magic
    4      2   version (uint16) = 1
    6      2   flags (uint16) = 0
    8      4   round (uint32)
    12     4   client id (uint32)
    16     4   example count (uint32, >= 1)
    20     4   local steps taken (uint32, <= the run's)
    24     4   train loss (float32; NaN when no step was taken)
    28     4   rank (uint32; the client's)
    32     4   N (uint32)
    36   4 N   the client's adapter (float32, finite)

The embedded default (3 layers, q/k/v/o of 96 x 96, rank 8): N = 18,432, so 73,784 bytes down and
73,764 up per client per round.

The checkpoint holds the global adapter itself (base64 of its float32 bytes, with its SHA-256), so the
checkpoint file is the run's whole state, replaced atomically each round, and a resumed run ends bitwise
equal to an uninterrupted one.
"""
from __future__ import annotations

import base64
import hashlib
import time
from dataclasses import dataclass
from typing import List, Mapping, Optional, Sequence, Tuple

import numpy as np
import torch

from .. import lora as L
from .. import protocol as P
from ..config import FedConfig
from ..modeling import pad_id
from .base import (Method, SeedClient, SeedServer, _typed, bound_uploads, check_local,
                   first_order_steps)

DOWN_MAGIC = b"KLD1"
UP_MAGIC = b"KLU1"
FORMAT = "kseed-lora/1"
DROPOUT_TAG = 6  # derive_seed(client seed, DROPOUT_TAG): the LoRA dropout's torch generator


def spec_of(config: FedConfig) -> L.LoraSpec:
    return L.LoraSpec(targets=config.lora_targets, alpha=config.lora_alpha,
                      dropout=config.lora_dropout)


def model_facts(config: FedConfig, ws) -> dict:
    """The adapter layout (Method.model_facts): the server has no model.  Fails here, before the
    run starts, without peft (naming the extra) or when no module matches --lora-targets."""
    L.require_peft()
    layout = L.find_targets(ws.model, L.parse_targets(config.lora_targets))
    return {"lora_layout": [[t.name, t.in_features, t.out_features] for t in layout]}


# --------------------------------------------------------------------------- the global model
def set_base(ws) -> None:
    """The workspace's weights back to w0 (a no-op when they are w0 already)."""
    if getattr(ws, "lora_loaded", "base") == "base":  # a workspace no LoRA code wrote holds w0
        return
    ws.lora_loaded = None
    ws.rebuild(np.zeros(0, np.uint64), np.zeros(0, np.float32))  # w0 + nothing
    ws.lora_loaded = "base"


def set_merged(ws, layout, adapter: np.ndarray, rank: int, scale: float) -> None:
    """The workspace's weights := w0 with the adapter merged in (W0 + scale B A per target)."""
    key = hashlib.sha256(np.ascontiguousarray(adapter, np.float32).tobytes()
                         + f"{rank}/{scale!r}".encode()).hexdigest()
    if getattr(ws, "lora_loaded", None) == key:
        return
    set_base(ws)
    ws.lora_loaded = None
    t0 = time.perf_counter()
    L.merge_into(L.target_weights(ws.model, layout), layout, adapter, rank, scale)
    ws.rebuild_seconds += time.perf_counter() - t0
    ws.lora_loaded = key


@dataclass
class _Upload:
    """An accepted upload as base.bound_uploads reads it: the update u = a_c - a_global as ``grads``
    over its own ``indices`` 0..N-1; ``tau`` = the local steps taken."""
    client_id: int
    num_examples: int
    train_loss: float
    tau: int
    adapter: np.ndarray  # float32, the client's
    grads: np.ndarray  # float64, the update
    rank: int

    @property
    def indices(self) -> np.ndarray:
        return np.arange(self.grads.shape[0], dtype=np.int64)


# ---------------------------------------------------------------------------------- server
class FedITServer(SeedServer):
    method = "fedit"
    down_magic, up_magic = DOWN_MAGIC, UP_MAGIC

    def __init__(self, config: FedConfig, *, base_identity: Optional[dict] = None,
                 workdir: Optional[str] = None, readonly: bool = False):
        super().__init__(config, base_identity=base_identity, workdir=workdir, readonly=readonly)
        if "lora_layout" not in self.base_identity:
            raise ValueError(f"the {self.method} server needs the adapter layout (base_identity "
                             "'lora_layout', set by kseed.task.load_workspace)")
        self.layout = L.layout_from(self.base_identity["lora_layout"])
        self.spec = spec_of(config)
        self.rank = config.lora_rank  # the global adapter's
        self.fingerprint = L.layout_fingerprint(self.layout, self.spec)
        self.adapter = L.init_adapter(self.layout, self.rank, config.seed)

    # ------------------------------------------------------------------------------- ranks
    def upload_ranks(self) -> Sequence[int]:
        """The ranks a client's upload may have (FedIT: --lora-rank)."""
        return (self.rank,)

    def adapter_at(self, rank: int) -> np.ndarray:
        """The global adapter as the rank-``rank`` adapter a client of that rank started from
        (FedIT: the global adapter itself; every client has rank R)."""
        return self.adapter

    def combine(self, ups: List[_Upload], adapters: List[np.ndarray], w: np.ndarray) -> np.ndarray:
        """The new global adapter from the bounded client adapters and the normalised weights:
        FedAvg, sum_c w_c a_c in float64 in client order, stored float32."""
        acc = np.zeros(self.adapter.shape[0], dtype=np.float64)
        for a, wc in zip(adapters, w):
            acc += wc * a.astype(np.float64)
        return acc.astype(np.float32)

    def norm_factor(self, rank: int) -> float:
        """What a rank-``rank`` client's update is multiplied by before the norm bound compares it
        with the others' (FedIT: 1; every client has the same rank)."""
        return 1.0

    def common(self, up: _Upload, update: np.ndarray) -> np.ndarray:
        """A client's update in the space every client's shares (record_clients' distances)."""
        return update

    # ------------------------------------------------------------------------------ messages
    def load_global(self, ws) -> None:
        set_merged(ws, self.layout, self.adapter, self.rank, self.spec.scale(self.rank))

    def make_down(self, rnd: int, client_id: int) -> bytes:
        self._check_round(rnd)
        self._check_client(client_id)
        c = self.config
        return L.encode_down(L.AdapterDown(
            round=rnd, client_id=client_id, fingerprint=self.fingerprint,
            local_steps=c.local_steps, batch_size=c.batch_size, lr=c.lr,
            client_seed=self.client_seed(rnd, client_id), rank=self.rank,
            adapter=self.adapter), self.down_magic, self.down_tail())

    def down_tail(self) -> bytes:
        """The method's own bytes after the adapter in a down message (FedIT: none)."""
        return b""

    def aggregate(self, rnd: int, uploads: Mapping[int, bytes],
                  weights: Optional[Mapping[int, float]] = None) -> dict:
        """Validate the round's uploads, bound them (base.bound_uploads on the updates a_c - a_global)
        and set the global adapter to their FedAvg (``combine``)."""
        self._check_round(rnd)
        c = self.config

        def decode(data, cid):
            m = L.decode_up(data, self.up_magic, size_of=lambda r: L.adapter_size(self.layout, r),
                            ranks=self.upload_ranks(), expected_round=rnd, expected_client=cid,
                            max_steps=c.local_steps)
            r = m.rank
            u = m.adapter.astype(np.float64) - self.adapter_at(r).astype(np.float64)
            f = self.norm_factor(r)
            return _Upload(client_id=cid, num_examples=m.num_examples, train_loss=m.train_loss,
                           tau=m.steps, adapter=m.adapter, rank=r, grads=u if f == 1 else u * f)

        accepted, rejected, bytes_up = self.collect(rnd, uploads, decode)
        b = bound_uploads(c, accepted, weights)
        w = b.weights / b.weights.sum()
        adapters = []
        for m, u in zip(accepted, b.grads):
            if m.client_id in b.clipped and "norm" in b.clipped[m.client_id]:
                f = self.norm_factor(m.rank)
                adapters.append(self.adapter_at(m.rank).astype(np.float64)
                                + (u if f == 1 else u / f))
            else:  # unbounded: the upload itself, bitwise
                adapters.append(m.adapter)
        new = self.combine(accepted, adapters, w)
        deltas = [self.common(m, u) for m, u in zip(accepted, b.grads)]
        self.adapter = new
        stats = self.record_clients(rnd, accepted, b, w, deltas, rejected, bytes_up)
        stats["adapter_floats"] = int(new.shape[0])
        return stats

    # ---------------------------------------------------------------------------- checkpoints
    def state_dict(self) -> dict:
        a = np.ascontiguousarray(self.adapter, dtype="<f4").tobytes()
        return {
            "format": FORMAT,
            "method": self.method,
            "round": self.round,
            "config": self.config.to_dict(),
            "fingerprint": self.fingerprint.hex(),
            "adapter": {"rank": self.rank, "floats": len(a) // 4,
                        "sha256": hashlib.sha256(a).hexdigest(),
                        "float32_le_base64": base64.b64encode(a).decode("ascii")},
            **self.client_state(),
            "rng": "stateless: derived from (seed, round, client) by SHA-256",
            "optimizer": "none kept: a fresh AdamW per client and round",
            "base_identity": self.base_identity,
        }

    def load_state_dict(self, state: dict) -> None:
        """Restore from state_dict(); ValueError naming what does not match this run."""
        def adapter(state):
            ad = _typed(state, "adapter", dict)
            return (_typed(ad, "rank", int), _typed(ad, "floats", int),
                    base64.b64decode(_typed(ad, "float32_le_base64", str), validate=True),
                    _typed(ad, "sha256", str))

        fp, rnd, hist, diff, (rank, n, raw, digest) = self.read_checkpoint(state, FORMAT, adapter)
        if fp != self.fingerprint:
            raise ValueError("checkpoint adapter layout differs from this run's (another model, "
                             "--lora-targets, --lora-alpha or --lora-dropout)")
        want = L.adapter_size(self.layout, self.rank)
        if rnd < 0 or rank != self.rank or n != want or len(raw) != 4 * want:
            raise ValueError(f"corrupt server checkpoint: round {rnd}, a rank-{rank} adapter of "
                             f"{n} floats ({len(raw)} bytes); this run's is rank {self.rank}, "
                             f"{want} floats")
        if hashlib.sha256(raw).hexdigest() != digest:
            raise ValueError("corrupt server checkpoint: the adapter's sha256 does not match")
        a = np.frombuffer(raw, dtype="<f4").astype(np.float32)
        if not np.isfinite(a).all():
            raise ValueError("corrupt server checkpoint: the adapter holds NaN or inf")
        self.check_base_identity(state)
        self.adapter = a
        self.client_loss_hist = hist
        self.client_diff = diff
        self.round = rnd
        self._lrs_cache = None

    def parameters_trained(self, ws) -> int:
        return int(self.adapter.shape[0])

    def export_info(self) -> dict:
        return {"lora_rank": self.rank, "lora_targets": len(self.layout),
                "lora_alpha": self.spec.alpha, "adapter_floats": int(self.adapter.shape[0]),
                "merged": "W0 + alpha / rank x B A per target module"}


# ---------------------------------------------------------------------------------- client
class FedITClient(SeedClient):
    """A FedIT client: peft LoRA on its workspace's base model for the round's local steps.
    ``shared`` / ``cache_dir`` / ``memory_budget_mib``: accepted for the engines' uniform call,
    unused (the down message carries the whole global adapter; FedPipe sizes itself to a budget)."""
    down_magic, up_magic = DOWN_MAGIC, UP_MAGIC

    def __init__(self, config: FedConfig, model_loader, partition, *,
                 client_id: Optional[int] = None, shared=None, cache_dir: Optional[str] = None,
                 memory_budget_mib: Optional[float] = None):
        super().__init__(config, model_loader, partition, client_id=client_id,
                         memory_budget_mib=memory_budget_mib)
        self.spec = spec_of(config)
        self._candidates: Optional[List[L.Target]] = None
        self.layout: Optional[List[L.Target]] = None  # the last down message's

    @property
    def candidates(self) -> List[L.Target]:
        """The model's modules that --lora-targets names."""
        if self._candidates is None:
            self._candidates = L.find_targets(self.structure(), self.spec.patterns())
        return self._candidates

    def structure(self):
        """The full-precision base model's modules, for their names and shapes (FedIT: the
        workspace's model)."""
        return self.workspace.model

    def tail_size(self) -> int:
        """Bytes of the method's own after the adapter in a down message (FedIT: none)."""
        return 0

    def layout_of(self, tail: bytes) -> List[L.Target]:
        """The adapter layout a down message names (FedIT: every candidate)."""
        return self.candidates

    def expected_rank(self, client_id: int) -> int:
        """The rank of the down message's adapter: the global adapter's, --lora-rank."""
        return self.config.lora_rank

    def start(self, m: L.AdapterDown) -> Tuple[np.ndarray, int]:
        """(the adapter this client trains from, its rank) given the down message (FedIT: the
        global adapter)."""
        return m.adapter, m.rank

    def spec_for(self, rank: int) -> L.LoraSpec:
        """The LoRA settings of this client's peft adapter at ``rank`` (FedIT: the run's)."""
        return self.spec

    def train_model(self):
        """The model the adapter is trained on (FedIT: the workspace's)."""
        return self.workspace.model

    def _decode(self, down_bytes) -> L.AdapterDown:
        data, t = P._check_bytes(down_bytes), self.tail_size()
        if len(data) < L.DOWN_HEADER_SIZE + t:
            raise P.ProtocolError(f"adapter down message truncated: {len(data)} bytes")
        layout = self.layout_of(data[len(data) - t:] if t else b"")
        m = L.decode_down(data, self.down_magic, tail=t,
                          size_of=lambda r: L.adapter_size(layout, r))
        self._check_for_me(m.client_id)
        if m.fingerprint != L.layout_fingerprint(layout, self.spec):
            raise P.ProtocolError("the down message's adapter layout is not this client's (another "
                                  "base model or LoRA settings)")
        self.layout = layout

        def also(bad):
            if m.rank != self.expected_rank(m.client_id):
                bad("rank", m.rank, f"this client's rank {self.expected_rank(m.client_id)}")
        cfg = self.config
        check_local(cfg, noise=cfg.noise, local_steps=m.local_steps, batch_size=m.batch_size,
                    eps=cfg.eps, lr=m.lr, rnd=m.round, client_id=m.client_id,
                    client_seed=m.client_seed, also=also)
        return m

    def load(self, down_bytes) -> None:
        """The global model (merged) into the workspace, for evaluation."""
        m = self._decode(down_bytes)
        set_merged(self.workspace, self.layout, m.adapter, m.rank, self.spec.scale(m.rank))

    def train_adapter(self, m: L.AdapterDown, adapter: np.ndarray, rank: int) -> tuple:
        """(the rank-``rank`` adapter after the local steps from ``adapter``, their mean loss, steps
        skipped)."""
        cfg = self.config
        model = self.train_model()
        if self._ws is not None and model is self._ws.model:
            set_base(self._ws)
        device = next(model.parameters()).device
        rng = np.random.Generator(np.random.PCG64(m.client_seed))
        dev = [device] if device.type == "cuda" else []
        with torch.random.fork_rng(devices=dev), L.LoraModel(model, self.layout,
                                                            self.spec_for(rank), rank) as lm:
            torch.manual_seed(P.derive_seed(m.client_seed, DROPOUT_TAG) >> 1)
            lm.load(adapter)
            lm.train()
            loss, skipped = first_order_steps(
                lm.peft, lm.parameters, self._tokenized(), rng, pad_id=pad_id(self.tokenizer()),
                device=device, lr=m.lr, steps=m.local_steps, batch_size=m.batch_size,
                optimizer="adamw", n_accum=cfg.n_accum, grad_clip=cfg.grad_clip)
            vec = lm.vector()
        return vec, loss, skipped

    def fit(self, down_bytes: bytes) -> bytes:
        m = self._decode(down_bytes)
        t0 = time.perf_counter()
        start, rank = self.start(m)
        vec, loss, skipped = self.train_adapter(m, start, rank)
        if not np.isfinite(vec).all():  # a diverged client sends the adapter it was given
            vec, skipped = start, m.local_steps
        self.last_stats = {"round": m.round, "steps": m.local_steps, "skipped": skipped,
                           "train_loss": loss, "local_seconds": time.perf_counter() - t0}
        return L.encode_up(L.AdapterUp(round=m.round, client_id=m.client_id,
                                       num_examples=len(self.partition),
                                       steps=m.local_steps - skipped, train_loss=loss, rank=rank,
                                       adapter=vec), self.up_magic)


LORA_OPTIONS = frozenset({"local_steps", "lr", "batch_size", "n_accum", "grad_clip", "lora_rank",
                          "lora_alpha", "lora_dropout", "lora_targets"})
METHOD = Method(
    name="fedit",
    summary="FedIT: LoRA adapters (peft) trained by local AdamW steps, FedAvg of the adapters by "
            "examples; the global model is w0 with the global adapter merged in",
    server=FedITServer, client=FedITClient, options=LORA_OPTIONS,
    ignores=frozenset({"g_clip", "g_clip_abs"}), fixed={"g_clip": 0.0, "g_clip_abs": 0.0},
    defaults={"lr": 3e-3, "local_steps": 10}, model_facts=model_facts)
