"""FedPipe (Fang et al. 2024, "Automated Federated Pipeline for Parameter-Efficient Fine-Tuning of
Large Language Models", arXiv 2404.06448): FedIT's plumbing (kseed.methods.fedit, kseed.lora) wired to
FedPipe's parts (kseed.fedpipe_parts):

1. **Weight selection.**  The candidates are the linear modules --lora-targets names.  The server
   scores each on a calibration set (--calib-size training examples drawn by the run seed from the
   union of the partitions, which kseed's server builds anyway; batches of --batch-size) by
   fedpipe_parts.score_weights (sum |dL/dW x W|, the stand-in for the paper's score) and adapts the
   top --select-fraction (select_top), in module order.  The selection rides in every down message as
   a bitmask over the candidates (ceil(C / 8) bytes), so a client never recomputes it; the layout
   fingerprint covers it.
2. **Per-client ranks and quantized frozen bases from budgets.**  --client-budgets gives each client a
   memory budget in MiB (comma-separated, cycled over the client ids; empty: every client at
   --lora-rank on the run-dtype base).  ``client_plan``: the frozen base's precision is
   fedpipe_parts.budget_to_bits (run dtype, int8 or NF4: the largest whose frozen weights fit), the
   rank fedpipe_parts.rank_for_budget between 1 and R = --lora-rank, a budget of the full-precision
   model plus a rank-R adapter's training state (16 bytes a float) getting R.  The server learns every
   client's plan from the base identity (``model_facts`` computes them on the full-precision model,
   as the client does), so it checks each upload's rank.
3. **Aggregation of heterogeneous ranks: SVD re-projection** (fedpipe_parts.aggregate_heterogeneous,
   per target): the examples-weighted mean of the clients' products s_c B_c A_c at their peft scales
   s_c = alpha / r_c, truncated to its best rank-R approximation, stored at scale alpha / R; a client
   of rank r gets the top r components at its scale (client_adapter: ``view``).
4. **Quantized frozen base** (``quantized_model``): fedpipe_parts.quantize_frozen (bitsandbytes int8
   weight-only or NF4, CPU backend) on a second load of the base model, shared by the in-process
   clients of a precision; peft's LoRA sits on the quantized layers.  The server's model, the
   evaluation and the export stay full precision: export merges the global adapter into the
   full-precision base (an ordinary Hugging Face directory, as FedIT's).

Wire format: FedIT's (kseed.lora) with magics b"KPD1" / b"KPU1", the down message followed by the
selection mask: 56 + 4 N_c + ceil(C / 8) bytes down, 36 + 4 N_c up, N_c = r_c x sum(in + out) over
the selected targets.  The threat model: FedIT's norm bound, on each client's update in its own rank's
factor space times sqrt(R / r_c) (``norm_factor``).  The checkpoint: FedIT's (the rank-R adapter).
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
from .. import fedpipe_parts as FP
from .fedit import LORA_OPTIONS, FedITClient, FedITServer, model_facts as fedit_facts

DOWN_MAGIC = b"KPD1"
UP_MAGIC = b"KPU1"
CALIB_TAG = 7  # derive_seed(run seed, CALIB_TAG): the calibration examples
TRAIN_BYTES_PER_FLOAT = 16  # adapter weight + gradient + AdamW's two moments, float32


# --------------------------------------------------------------------- wiring of the parts
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


def budget_of(config: FedConfig, client_id: int) -> Optional[float]:
    """Client ``client_id``'s budget in bytes (--client-budgets cycled; None: no budget)."""
    budgets = parse_budgets(config.client_budgets)
    return budgets[client_id % len(budgets)] * (1 << 20) if budgets else None


def client_plan(config: FedConfig, model, layout: Sequence[L.Target], client_id: int
                ) -> Tuple[int, int]:
    """(bits of the client's frozen base, 32 for the run dtype; its rank) from its budget: the
    precision is fedpipe_parts.budget_to_bits (the largest whose frozen weights fit); the rank is
    fedpipe_parts.rank_for_budget between 1 and --lora-rank, ``full`` being the budget of a client that
    holds the full-precision model and a rank---lora-rank adapter's training state (16 bytes a float:
    weight, gradient, AdamW's two moments)."""
    budget = budget_of(config, client_id)
    if budget is None:
        return 32, config.lora_rank
    bits = FP.budget_to_bits(budget, model)
    full = (FP.frozen_bytes(model, None)
            + TRAIN_BYTES_PER_FLOAT * L.adapter_size(layout, config.lora_rank))
    return (32 if bits is None else bits), FP.rank_for_budget(budget, 1, config.lora_rank, full)


def view(layout: Sequence[L.Target], vec: np.ndarray, rank: int, scale: float, to: int,
         to_scale: float) -> np.ndarray:
    """The top ``to`` components of a rank-``rank`` adapter of LoRA scale ``scale``, as factors of
    scale ``to_scale`` (fedpipe_parts.client_adapter on each target)."""
    out = []
    for a, b in L.split(layout, rank, torch.from_numpy(np.ascontiguousarray(vec))).values():
        agg = FP.Aggregate(a, b, None, None, 0.0)
        a2, b2 = FP.client_adapter(agg, to, to_scale / scale)
        out += [a2.reshape(-1), b2.reshape(-1)]
    return torch.cat(out).numpy().astype(np.float32)


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


_QUANTIZED: Dict[tuple, torch.nn.Module] = {}
M_MMAP_THRESHOLD = -3  # glibc's mallopt parameter


def _unmap_large_frees() -> None:
    """glibc only (elsewhere nothing): every allocation of 1 MiB or more gets its own mapping, given
    back to the system when freed.  glibc's default raises that threshold up to 32 MiB as large blocks
    are freed, after which the quantizing temporaries and the quantized layers' per-step dequantized
    weights (one linear's fp32 weight each, up to 25 MiB on the 0.60B bench model) land in the heap and
    its freed holes stay resident: measured +1.2 GiB after quantizing the 0.60B model to int8 and
    +0.5 GiB more after two training steps (bench/RESULTS.md, issue #20).  Process-wide, set once a
    process builds a quantized base; it changes where memory comes from, not any result."""
    try:
        import ctypes
        libc = ctypes.CDLL(None)
        libc.mallopt(M_MMAP_THRESHOLD, 1 << 20)
        libc.malloc_trim(0)
    except (OSError, AttributeError):
        pass


def quantized_model(path: str, dtype: str, device, bits: int):
    """The base model in ``path`` with its untied linear weights quantized to ``bits`` by
    fedpipe_parts.quantize_frozen (bitsandbytes: int8 weight-only or NF4), frozen; one per (path,
    dtype, device, bits) in a process (the in-process clients of a precision share it: peft's LoRA
    is injected and removed around each fit).

    Memory: the load maps the weight file (kseed.modeling.load_model, copy-on-write); each linear is
    quantized from its mapped weight, never copied; the tensors left in full precision (embeddings,
    norms) are then copied out of the map, so the map is released and the model holds no file pages:
    its memory is the quantized weights and those few full-precision tensors (``_unmap_large_frees``
    keeps the freed temporaries from staying resident)."""
    key = (path, dtype, str(device), bits)
    if key not in _QUANTIZED:
        from ..modeling import load_model
        _unmap_large_frees()
        model, _ = load_model(path, dtype, device)
        for p in model.parameters():
            p.requires_grad_(False)
        with L.quiet_imports():
            FP.quantize_frozen(model, bits)
        with torch.no_grad():
            for t in list(model.parameters()) + list(model.buffers()):
                if t.is_floating_point():
                    t.data = t.data.clone()  # out of the file map
        _unmap_large_frees()
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


def model_facts(config: FedConfig, ws) -> dict:
    """FedIT's facts with the selected layout (fedpipe_parts.score_weights on the calibration set,
    batches of --batch-size; select_top), the candidates' mask, and every client's (bits, rank)
    (Method.model_facts: the server has no model)."""
    from ..modeling import collate, tokenize_examples
    facts = fedit_facts(config, ws)
    cands = L.layout_from(facts["lora_layout"])
    items = tokenize_examples(ws.tok, calibration(config), config.max_length,
                              config.prompt_template())
    batches = [collate(items[i:i + config.batch_size], ws.pad_id, ws.device)
               for i in range(0, len(items), config.batch_size)]
    scores = FP.score_weights(ws.model, batches, [t.name for t in cands])
    chosen = set(FP.select_top(scores, config.select_fraction))
    layout = [t for t in cands if t.name in chosen]
    return {"lora_layout": [list(t) for t in layout],
            "lora_mask": [int(t.name in chosen) for t in cands],
            "lora_scores": [scores[t.name] for t in cands],
            "client_plans": [list(client_plan(config, ws.model, layout, c))
                             for c in range(config.num_clients)]}


def mask_bytes(mask: Sequence[int]) -> bytes:
    return np.packbits(np.asarray(mask, dtype=np.uint8), bitorder="little").tobytes()


# ---------------------------------------------------------------------------------- server
class FedPipeServer(FedITServer):
    """FedIT's server over the selected layout; the global adapter has rank R = --lora-rank and LoRA
    scale alpha / R; a client of rank r gets its top r components at its own scale alpha / r."""
    method = "fedpipe"
    down_magic, up_magic = DOWN_MAGIC, UP_MAGIC

    def __init__(self, config: FedConfig, *, base_identity: Optional[dict] = None,
                 workdir: Optional[str] = None, readonly: bool = False):
        super().__init__(config, base_identity=base_identity, workdir=workdir, readonly=readonly)
        ident = self.base_identity
        try:
            self.mask = [int(k) for k in ident["lora_mask"]]
            self.plans = [(int(b), int(r)) for b, r in ident["client_plans"]]
        except (KeyError, TypeError, ValueError):
            raise ValueError("the fedpipe server needs the selection and the clients' plans "
                             "(base_identity, set by kseed.task.load_workspace)") from None
        if len(self.plans) != config.num_clients or sum(self.mask) != len(self.layout):
            raise ValueError("the fedpipe base identity does not match the run (clients or "
                             "selection)")

    def plan(self, client_id: int) -> Tuple[int, int]:
        """(bits of the client's frozen base, its rank)."""
        return self.plans[client_id]

    def client_rank(self, client_id: int) -> int:
        return self.plan(client_id)[1]

    def adapter_for(self, client_id: int) -> np.ndarray:
        r = self.client_rank(client_id)
        if r == self.rank:
            return self.adapter
        return view(self.layout, self.adapter, self.rank, self.spec.scale(self.rank), r,
                    self.spec.scale(r))

    def down_tail(self) -> bytes:
        return mask_bytes(self.mask)

    def norm_factor(self, rank: int) -> float:
        """sqrt(R / r): an update's norm grows as the square root of its floats, so the norm bound
        compares the clients' updates per unit of rank (a rank-8 client is not bounded for being
        rank 8)."""
        return math.sqrt(self.rank / rank)

    def combine(self, ups, adapters, w) -> np.ndarray:
        """Per target, fedpipe_parts.aggregate_heterogeneous of the clients' (A, B) at their scales
        alpha / r_c, re-projected to rank R, stored at scale alpha / R (client_adapter)."""
        parts = [L.split(self.layout, m.rank, torch.from_numpy(np.asarray(a, np.float64)))
                 for m, a in zip(ups, adapters)]
        scales = [self.spec.scale(m.rank) for m in ups]
        out = []
        for t in self.layout:
            agg = FP.aggregate_heterogeneous([p[t.name] for p in parts], list(w), self.rank,
                                             scales)
            a, b = FP.client_adapter(agg, self.rank, self.spec.scale(self.rank))
            out += [a.reshape(-1), b.reshape(-1)]
        return torch.cat(out).numpy().astype(np.float32)

    def common(self, up, update: np.ndarray) -> np.ndarray:
        return pad(self.layout, update, up.rank, self.rank)

    def export_info(self) -> dict:
        return {**super().export_info(), "lora_selected": int(sum(self.mask)),
                "lora_candidates": len(self.mask)}


# ---------------------------------------------------------------------------------- client
class FedPipeClient(FedITClient):
    """FedIT's client on the layout the down message's mask selects, at the rank and on the frozen
    base (quantized_model) its budget gives it."""
    down_magic, up_magic = DOWN_MAGIC, UP_MAGIC

    def _plan(self) -> Tuple[int, int]:
        cid = self.client_id if self.client_id is not None else 0
        return client_plan(self.config, self.workspace.model, self.layout, cid)

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
        return self._plan()[1]

    def train_model(self):
        bits = self._plan()[0]
        if bits == 32:
            return self.workspace.model
        from ..task import model_dir, resolve_dtype
        cfg = resolve_dtype(self.config)
        return quantized_model(model_dir(cfg), cfg.dtype, self.workspace.device, bits)

    def fit(self, down_bytes: bytes) -> bytes:
        up = super().fit(down_bytes)
        self.last_stats["base_bits"] = self._plan()[0]
        return up


METHOD = Method(
    name="fedpipe",
    summary="FedPipe: FedIT on the weights a calibration set selects, per-client ranks and quantized "
            "frozen bases from memory budgets, heterogeneous ranks aggregated by SVD re-projection",
    server=FedPipeServer, client=FedPipeClient,
    options=LORA_OPTIONS | {"select_fraction", "calib_size", "client_budgets"},
    ignores=frozenset({"g_clip", "g_clip_abs"}), fixed={"g_clip": 0.0, "g_clip_abs": 0.0},
    defaults={"lr": 3e-3, "local_steps": 10}, model_facts=model_facts)
