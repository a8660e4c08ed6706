"""FedPipe (Fang et al. 2024, "Automated Federated Pipeline for Parameter-Efficient Fine-Tuning of
Large Language Models", arXiv 2404.06448) on FedIT's plumbing (kseed.methods.fedit, kseed.lora):

1. **Weight selection.**  The candidates are the linear modules --lora-targets names.  The server scores
   each on a calibration set (--calib-size training examples drawn by the run seed from the union of
   the partitions, which kseed's server builds anyway) by the mean first-order contribution
   |dL/dW x W| over its elements (a documented stand-in for the paper's importance score), and adapts
   the top --select-fraction of them (at least one, in module order): ``select_targets``.  The
   selection rides in every down message as a bitmask over the candidates (ceil(C / 8) bytes), so a
   client never recomputes it; the layout fingerprint covers it.
2. **Per-client ranks and quantized frozen bases from budgets.**  --client-budgets gives each client a
   memory budget in MiB (comma-separated, cycled over the client ids; empty: every client at
   --lora-rank on the run-dtype base).  ``client_plan`` turns it into (bits of the frozen base, rank):
   the frozen base is the model's linear weights at 32 (the run dtype), 8 or 4 bits (the first that
   leaves room for a rank-1 adapter) plus the rest in the run dtype; the adapter's training state is 16
   bytes a float (weights, gradients, AdamW's two moments); the rank is the largest power of two
   <= --lora-rank that fits.  Every client's peft adapter has alpha_c = alpha x r_c / R (R =
   --lora-rank), so every rank has the same scale alpha / R and a rank-r_c adapter is the first r_c
   components of a rank-R one.
3. **Aggregation of heterogeneous ranks: stacking + SVD re-projection** (``aggregate_products``).  The
   server forms, per target, the examples-weighted mean of the clients' products, D = sum_c w_c B_c A_c
   (exact FedAvg of the clients' models in weight space: no cross-term bias from averaging A and B
   apart, which zero-padding has), through thin QRs of the stacked factors (never the dense out x in
   matrix), and keeps its best rank-R approximation (Eckart-Young): B = U S, A = V^T over the top R
   singular triplets (A's rows stay orthonormal, so a zero singular value leaves a trainable
   component; components beyond the stack's rank take the first global adapter's rows of A and
   B = 0).  A client of rank r_c receives the top r_c components: its best rank-r_c approximation of
   the global adapter.  Bias: the truncation drops the mean's components beyond R (the global model
   is the best rank-R approximation of the FedAvg model, not the FedAvg model), and a low-rank client
   trains from its truncation, not from the global model itself.
4. **Quantized frozen base** (``quantized_model``): optimum-quanto (qint8 / qint4 weights, pure PyTorch
   on CPU, kept by Hugging Face) quantizes a client's frozen linear weights (lm_head excepted); peft's
   LoRA sits on quanto's QLinear (an nn.Linear) as on any linear layer.  The server's model, the
   evaluation and the export stay full precision: export merges the global adapter into the
   full-precision base (an ordinary Hugging Face directory, as FedIT's).

Wire format: FedIT's (kseed.lora) with magics b"KPD1" / b"KPU1", the down message followed by the
selection mask: 56 + 4 N_c + ceil(C / 8) bytes down, 36 + 4 N_c up, N_c = r_c x sum(in + out) over
the selected targets.  The threat model: FedIT's norm bound on each client's update in its own rank's
factor space.  The checkpoint: FedIT's (the rank-R global adapter).
"""
from __future__ import annotations

import math
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch

from .. import lora as L
from .. import protocol as P
from ..config import FedConfig
from .base import Method
from .fedit import LORA_OPTIONS, FedITClient, FedITServer, model_facts as fedit_facts

DOWN_MAGIC = b"KPD1"
UP_MAGIC = b"KPU1"
CALIB_TAG = 7  # derive_seed(run seed, CALIB_TAG): the calibration examples
BITS = (32, 8, 4)  # frozen-base precisions a budget chooses from (32: the run dtype)
TRAIN_BYTES_PER_FLOAT = 16  # adapter weight + gradient + AdamW's two moments, float32


# ------------------------------------------------------------------------------ pure parts
def select_targets(scores: Sequence[float], fraction: float) -> np.ndarray:
    """bool mask: the top max(1, ceil(fraction x C)) of C candidates by score (ties: the earlier);
    a non-finite score counts as the lowest."""
    s = np.asarray(scores, dtype=np.float64)
    if s.ndim != 1 or s.size == 0:
        raise ValueError("select_targets needs at least one score")
    if not 0 < fraction <= 1:
        raise ValueError(f"--select-fraction must be in (0, 1], got {fraction}")
    k = max(1, math.ceil(fraction * s.size - 1e-9))
    s = np.where(np.isfinite(s), s, -np.inf)
    order = sorted(range(s.size), key=lambda i: (-s[i], i))
    mask = np.zeros(s.size, dtype=bool)
    mask[order[:k]] = True
    return mask


def parse_budgets(text: str) -> List[float]:
    """--client-budgets: comma-separated MiB (> 0); empty: none."""
    if not text.strip():
        return []
    try:
        out = [float(x) for x in text.split(",")]
    except ValueError:
        raise ValueError(f"--client-budgets must be comma-separated MiB, got {text!r}") from None
    if any(not (math.isfinite(b) and b > 0) for b in out):
        raise ValueError(f"--client-budgets must be finite and > 0, got {text!r}")
    return out


def client_plan(budget_mib: Optional[float], *, linear: int, other: int, elem: int,
                floats_per_rank: int, max_rank: int) -> Tuple[int, int]:
    """(bits of the frozen base, adapter rank) for a client's memory budget (None: (32, max_rank)).
    ``linear``: the quantizable parameters (the linear weights but lm_head), ``other``: the rest,
    ``elem``: the run dtype's bytes, ``floats_per_rank``: the adapter floats per unit of rank."""
    if budget_mib is None:
        return 32, max_rank
    budget = budget_mib * (1 << 20)
    for bits in BITS:
        base = other * elem + (linear * elem if bits == 32 else linear * bits / 8)
        room = budget - base
        if room >= TRAIN_BYTES_PER_FLOAT * floats_per_rank:
            r = 1
            while 2 * r <= max_rank and room >= TRAIN_BYTES_PER_FLOAT * floats_per_rank * 2 * r:
                r *= 2
            return bits, r
    need = (other * elem + linear / 2 + TRAIN_BYTES_PER_FLOAT * floats_per_rank) / (1 << 20)
    raise ValueError(f"a client budget of {budget_mib:g} MiB cannot hold the 4-bit frozen model and "
                     f"a rank-1 adapter ({need:.1f} MiB)")


def truncate(layout: Sequence[L.Target], vec: np.ndarray, rank: int, to: int) -> np.ndarray:
    """The first ``to`` components of a rank-``rank`` adapter (A's first rows, B's first columns)."""
    parts = L.split(layout, rank, vec)
    out = [x for a, b in parts.values() for x in (a[:to].ravel(), b[:, :to].ravel())]
    return np.concatenate(out).astype(vec.dtype)


def pad(layout: Sequence[L.Target], vec: np.ndarray, rank: int, to: int) -> np.ndarray:
    """A rank-``rank`` adapter as a rank-``to`` one, the extra components zero."""
    parts = L.split(layout, rank, vec)
    out = []
    for t, (a, b) in zip(layout, parts.values()):
        a2 = np.zeros((to, t.in_features), vec.dtype)
        b2 = np.zeros((t.out_features, to), vec.dtype)
        a2[:rank], b2[:, :rank] = a, b
        out += [a2.ravel(), b2.ravel()]
    return np.concatenate(out)


def aggregate_products(layout: Sequence[L.Target], adapters: Sequence[np.ndarray],
                       ranks: Sequence[int], weights: Sequence[float], rank: int,
                       fill: np.ndarray) -> np.ndarray:
    """The rank-``rank`` adapter whose product B A is, per target, the best rank-``rank``
    approximation of sum_c w_c B_c A_c (float64; B = U S, A = V^T); components beyond the stack's
    rank take ``fill``'s rows of A (a rank-``rank`` adapter) and B = 0.  float32."""
    fills = L.split(layout, rank, fill)
    parts = [L.split(layout, r, np.asarray(a, np.float64)) for a, r in zip(adapters, ranks)]
    out = []
    for t in layout:
        bs = np.concatenate([w * p[t.name][1] for p, w in zip(parts, weights)], axis=1)  # out x k
        As = np.concatenate([p[t.name][0] for p in parts], axis=0)  # k x in
        qb, rb = np.linalg.qr(bs)
        qa, ra = np.linalg.qr(As.T)
        u, sv, vt = np.linalg.svd(rb @ ra.T)
        k = min(rank, sv.size)
        a_new = np.array(fills[t.name][0], dtype=np.float64)
        b_new = np.zeros((t.out_features, rank))
        a_new[:k] = (qa @ vt[:k].T).T
        b_new[:, :k] = (qb @ u[:, :k]) * sv[:k]
        out += [a_new.ravel(), b_new.ravel()]
    return np.concatenate(out).astype(np.float32)


_QUANTIZED: Dict[tuple, torch.nn.Module] = {}


def quantized_model(path: str, dtype: str, device, bits: int):
    """The base model in ``path`` with its linear weights (lm_head excepted) quantized to ``bits``
    by optimum-quanto, frozen; one per (path, dtype, device, bits) in a process (the in-process
    clients of a precision share it: peft's LoRA is injected and removed around each fit)."""
    key = (path, dtype, str(device), bits)
    if key not in _QUANTIZED:
        try:
            with L.quiet_imports():
                from optimum import quanto
        except ImportError as exc:
            raise L.LoraUnavailable(f"a quantized frozen model needs optimum-quanto: pip install "
                                    f"'{L.EXTRA}' ({exc})") from None
        from ..modeling import load_model
        model, _ = load_model(path, dtype, device)
        for p in model.parameters():
            p.requires_grad_(False)
        quanto.quantize(model, weights=quanto.qint8 if bits == 8 else quanto.qint4,
                        exclude=["lm_head"])
        quanto.freeze(model)
        for p in model.parameters():
            p.requires_grad_(False)
        model.eval()
        _QUANTIZED[key] = model
    return _QUANTIZED[key]


# ----------------------------------------------------------------------------- model facts
def calibration(config: FedConfig) -> List[dict]:
    """--calib-size training examples drawn by the run seed from every partition's."""
    from ..task import build_data
    parts, _, _ = build_data(config)
    pool = [e for p in parts for e in p]
    rng = np.random.Generator(np.random.PCG64(P.derive_seed(config.seed, CALIB_TAG)))
    n = min(config.calib_size, len(pool))
    return [pool[i] for i in sorted(rng.choice(len(pool), size=n, replace=False))]


def contribution_scores(ws, candidates: Sequence[L.Target], examples: Sequence[dict],
                        config: FedConfig) -> List[float]:
    """Per candidate, the mean over its elements of |dL/dW x W| summed over the calibration batches
    (batches of --batch-size in order; L the mean response loss of a batch)."""
    from ..modeling import collate, loss_sum, tokenize_examples
    items = tokenize_examples(ws.tok, examples, config.max_length, config.prompt_template())
    weights = L.target_weights(ws.model, candidates)
    params = list(ws.model.parameters())
    flags = [p.requires_grad for p in params]
    acc = {t.name: torch.zeros((), dtype=torch.float64) for t in candidates}
    try:
        for p in params:
            p.requires_grad_(False)
        for w in weights.values():
            w.requires_grad_(True)
        for i in range(0, len(items), config.batch_size):
            total, n = loss_sum(ws.model, collate(items[i:i + config.batch_size], ws.pad_id,
                                                  ws.device))
            if n == 0 or not torch.isfinite(total):
                continue
            (total / n).backward()
            for name, w in weights.items():
                acc[name] += (w.grad.double() * w.detach().double()).abs().sum().cpu()
                w.grad = None
    finally:
        for p, f in zip(params, flags):
            p.requires_grad_(f)
            p.grad = None
    return [float(acc[t.name]) / (t.in_features * t.out_features) for t in candidates]


def model_facts(config: FedConfig, ws) -> dict:
    """FedIT's facts with the selected layout, the candidates' mask and the parameter counts the
    budgets are planned on (Method.model_facts)."""
    facts = fedit_facts(config, ws)
    cands = L.layout_from(facts["lora_layout"])
    scores = contribution_scores(ws, cands, calibration(config), config)
    mask = select_targets(scores, config.select_fraction)
    lin = sum(m.weight.numel() for n, m in ws.model.named_modules()
              if isinstance(m, torch.nn.Linear) and not n.endswith("lm_head"))
    total = sum(p.numel() for p in ws.model.parameters())
    return {"lora_layout": [list(t) for t, k in zip(cands, mask) if k],
            "lora_candidates": len(cands), "lora_mask": [int(k) for k in mask],
            "lora_scores": scores, "linear_params": int(lin), "other_params": int(total - lin),
            "elem_bytes": int(next(ws.model.parameters()).element_size())}


def mask_bytes(mask: Sequence[int]) -> bytes:
    return np.packbits(np.asarray(mask, dtype=np.uint8), bitorder="little").tobytes()


def plan_of(config: FedConfig, client_id: int, *, linear: int, other: int, elem: int,
            floats_per_rank: int) -> Tuple[int, int]:
    budgets = parse_budgets(config.client_budgets)
    b = budgets[client_id % len(budgets)] if budgets else None
    return client_plan(b, linear=linear, other=other, elem=elem, floats_per_rank=floats_per_rank,
                       max_rank=config.lora_rank)


# ---------------------------------------------------------------------------------- server
class FedPipeServer(FedITServer):
    method = "fedpipe"
    down_magic, up_magic = DOWN_MAGIC, UP_MAGIC

    def __init__(self, config: FedConfig, *, base_identity: Optional[dict] = None,
                 workdir: Optional[str] = None, readonly: bool = False):
        super().__init__(config, base_identity=base_identity, workdir=workdir, readonly=readonly)
        ident = self.base_identity
        try:
            self.mask = [int(k) for k in ident["lora_mask"]]
            self.facts = {k: int(ident[n]) for k, n in (("linear", "linear_params"),
                                                        ("other", "other_params"),
                                                        ("elem", "elem_bytes"))}
        except (KeyError, TypeError, ValueError):
            raise ValueError("the fedpipe server needs the selection and the parameter counts "
                             "(base_identity, set by kseed.task.load_workspace)") from None
        self.fill = self.adapter.copy()  # the first global adapter: rows of A for empty components

    def plan(self, client_id: int) -> Tuple[int, int]:
        return plan_of(self.config, client_id, floats_per_rank=L.adapter_size(self.layout, 1),
                       **self.facts)

    def client_rank(self, client_id: int) -> int:
        return self.plan(client_id)[1]

    def adapter_for(self, client_id: int) -> np.ndarray:
        r = self.client_rank(client_id)
        return self.adapter if r == self.rank else truncate(self.layout, self.adapter, self.rank, r)

    def down_tail(self) -> bytes:
        return mask_bytes(self.mask)

    def norm_factor(self, rank: int) -> float:
        """sqrt(R / r): an update's norm grows as the square root of its floats, so the norm bound
        compares the clients' updates per unit of rank (a rank-8 client is not bounded for being
        rank 8)."""
        return math.sqrt(self.rank / rank)

    def combine(self, ups, adapters, w) -> np.ndarray:
        return aggregate_products(self.layout, adapters, [m.rank for m in ups], w, self.rank,
                                  self.fill)

    def common(self, up, update: np.ndarray) -> np.ndarray:
        return pad(self.layout, update, up.rank, self.rank)

    def export_info(self) -> dict:
        return {**super().export_info(), "lora_selected": int(sum(self.mask)),
                "lora_candidates": len(self.mask)}


# ---------------------------------------------------------------------------------- client
class FedPipeClient(FedITClient):
    down_magic, up_magic = DOWN_MAGIC, UP_MAGIC

    def _plan(self, client_id: int) -> Tuple[int, int]:
        model = self.workspace.model
        lin = sum(m.weight.numel() for n, m in model.named_modules()
                  if isinstance(m, torch.nn.Linear) and not n.endswith("lm_head"))
        total = sum(p.numel() for p in model.parameters())
        return plan_of(self.config, client_id, linear=lin, other=total - lin,
                       elem=next(model.parameters()).element_size(),
                       floats_per_rank=L.adapter_size(self.layout, 1))

    def tail_size(self) -> int:
        return (len(self.candidates) + 7) // 8

    def layout_of(self, tail: bytes) -> List[L.Target]:
        c = len(self.candidates)
        bits = np.unpackbits(np.frombuffer(tail, np.uint8), bitorder="little")
        if bits[c:].any() or not bits[:c].any():
            raise P.ProtocolError(f"the down message's target mask selects none of the {c} "
                                  "candidates, or names more")
        return [t for t, k in zip(self.candidates, bits[:c]) if k]

    def expected_rank(self, client_id: int) -> int:
        return self._plan(client_id)[1]

    def spec_for(self, rank: int) -> L.LoraSpec:
        return L.LoraSpec(targets=self.spec.targets, alpha=self.spec.alpha * rank /
                          self.config.lora_rank, dropout=self.spec.dropout)

    def train_model(self):
        bits = self._plan(self.client_id if self.client_id is not None else 0)[0]
        if bits == 32:
            return self.workspace.model
        from ..task import model_dir, resolve_dtype
        cfg = resolve_dtype(self.config)
        return quantized_model(model_dir(cfg), cfg.dtype, self.workspace.device, bits)

    def fit(self, down_bytes: bytes) -> bytes:
        up = super().fit(down_bytes)
        self.last_stats["base_bits"] = self._plan(self.client_id or 0)[0]
        return up


METHOD = Method(
    name="fedpipe",
    summary="FedPipe: FedIT on the weights a calibration set selects, per-client ranks and quantized "
            "frozen bases from memory budgets, heterogeneous ranks aggregated by SVD re-projection",
    server=FedPipeServer, client=FedPipeClient,
    options=LORA_OPTIONS | {"select_fraction", "calib_size", "client_budgets"},
    ignores=frozenset({"g_clip", "g_clip_abs"}), fixed={"g_clip": 0.0, "g_clip_abs": 0.0},
    defaults={"lr": 3e-3, "local_steps": 10}, model_facts=model_facts)
