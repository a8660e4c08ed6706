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
2. **Per-client ranks and quantized frozen bases from budgets.**  A client's memory budget in MiB is
   its node's (a Flower SuperNode's node config ``memory-budget-mib``), else --client-budgets'
   (comma-separated, cycled over the client ids; empty: every client at --lora-rank on the run-dtype
   base).  ``client_plan``, on the client: the frozen base's precision is
   fedpipe_parts.budget_to_bits (run dtype, int8 or NF4: the largest whose frozen weights fit), the
   rank fedpipe_parts.rank_for_budget between 1 and R = --lora-rank, a budget of the full-precision
   model plus a rank-R adapter's training state (16 bytes a float) getting R.  A budget is the
   node's own business, so the server plans nothing: it sends the rank-R global adapter to everyone
   and reads each upload's rank (any of 1..R).
3. **Aggregation of heterogeneous ranks: SVD re-projection** (fedpipe_parts.aggregate_heterogeneous,
   per target): the examples-weighted mean of the clients' products s_c B_c A_c at their peft scales
   s_c = alpha / r_c, truncated to its best rank-R approximation, stored at scale alpha / R; a client
   of rank r starts from the top r components at its scale (client_adapter: ``view``), which the
   server also takes as the base of its update.
4. **Quantized frozen base** (``quantized_model``): fedpipe_parts.quantize_frozen (bitsandbytes int8
   weight-only or NF4, CPU backend), the weights streamed from the model's files into a skeleton and
   each linear quantized as it comes in: a quantized client never loads the full-precision model
   (its tokenizer is loaded alone and its layout comes from the skeleton).  Shared by the in-process
   clients of a precision; peft's LoRA sits on the quantized layers.  The server's model, the
   evaluation and the export stay full precision: export merges the global adapter into the
   full-precision base (an ordinary Hugging Face directory, as FedIT's).

Wire format: FedIT's (kseed.lora) with magics b"KPD1" / b"KPU1", the down message followed by the
selection mask: 56 + 4 N_R + ceil(C / 8) bytes down (the rank-R global adapter), 36 + 4 N_c up,
N_r = r x sum(in + out) over the selected targets.  The threat model: FedIT's norm bound, on each
client's update in its own rank's factor space times sqrt(R / r_c) (``norm_factor``); a client may
claim any rank up to R, which gives it no more weight (the bound is per unit of rank) and only
costs it memory.  The checkpoint: FedIT's (the rank-R adapter).
"""
from __future__ import annotations

import logging
import math
import os
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
log = logging.getLogger("kseed.fedpipe")
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


def budget_of(config: FedConfig, client_id: int, node_mib: Optional[float] = None
              ) -> Optional[float]:
    """Client ``client_id``'s budget in bytes: its node's (``node_mib``, a SuperNode's node config
    memory-budget-mib) if given, else --client-budgets cycled over the client ids; None: no budget."""
    if node_mib is not None:
        return float(node_mib) * (1 << 20)
    budgets = parse_budgets(config.client_budgets)
    return budgets[client_id % len(budgets)] * (1 << 20) if budgets else None


def client_plan(config: FedConfig, model, layout: Sequence[L.Target], budget: Optional[float]
                ) -> Tuple[int, int]:
    """(bits of the client's frozen base, 32 for the run dtype; its rank) from its ``budget`` in bytes
    (budget_of; None: the run dtype at --lora-rank).  ``model``: the full-precision base (a skeleton
    will do: only its shapes count).  The precision is fedpipe_parts.budget_to_bits (the largest
    whose frozen weights fit); the rank is fedpipe_parts.rank_for_budget between 1 and --lora-rank,
    ``full`` being the budget of a client that holds the full-precision model and a rank---lora-rank
    adapter's training state (16 bytes a float: weight, gradient, AdamW's two moments)."""
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
_SKELETONS: Dict[tuple, torch.nn.Module] = {}


def skeleton(path: str, dtype: str) -> torch.nn.Module:
    """kseed.modeling.load_skeleton, one per (path, dtype) in a process."""
    key = (os.path.abspath(path), dtype)
    if key not in _SKELETONS:
        from ..modeling import load_skeleton
        with L.quiet_imports():
            _SKELETONS[key] = load_skeleton(path, dtype)
    return _SKELETONS[key]


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
    fedpipe_parts.quantize_frozen (bitsandbytes: int8 weight-only or NF4), frozen, on CPU (the
    quantized layers run on bitsandbytes' CPU backend); one per (path, dtype, bits) in a process (the
    in-process clients of a precision share it: peft's LoRA is injected and removed around each fit).
    ``model.kseed_base_hash`` is kseed.modeling.model_hash of the full-precision model it came from,
    so a node can check its base against the server's without loading that model.

    Memory: the full-precision model is never loaded.  The weights are streamed (modeling.
    stream_weights: one tensor at a time, read into fresh memory, the file never mapped) into a
    skeleton (modeling.load_skeleton), each linear quantized as soon as its tensors are in; the model
    holds the quantized weights and the few tensors left in full precision (embeddings, norms), and a
    quantized client never holds the full-precision weights besides (``_unmap_large_frees`` keeps the
    freed temporaries from staying resident).  A checkpoint whose tensor names transformers must
    rename, or that is not safetensors, is loaded by transformers and quantized from there
    (``_quantized_loaded``; the same model, more memory while it loads)."""
    if torch.device(device).type != "cpu":
        raise ValueError(f"a quantized frozen base runs on CPU (bitsandbytes' CPU backend), not on "
                         f"{device}")
    key = (os.path.abspath(path), dtype, bits)
    if key not in _QUANTIZED:
        from ..modeling import NotStreamable
        _unmap_large_frees()
        with L.quiet_imports():
            try:
                model = _quantized_streamed(path, dtype, bits)
            except NotStreamable as why:
                log.info("the quantized base comes from a transformers load: %s", why)
                model = _quantized_loaded(path, dtype, bits)
        for p in model.parameters():
            p.requires_grad_(False)
        _unmap_large_frees()
        model.eval()
        _QUANTIZED[key] = model
    return _QUANTIZED[key]


def _quantized_streamed(path: str, dtype: str, bits: int):
    import hashlib
    from torch import nn
    from ..modeling import load_skeleton, stream_weights
    model = load_skeleton(path, dtype)
    targets = set(FP.linear_modules(model))
    tied = {}  # id of a meta parameter with several names -> the one new parameter for all
    counts: Dict[int, int] = {}
    for _, p in model.named_parameters(remove_duplicate=False):
        counts[id(p)] = counts.get(id(p), 0) + 1
    digest = hashlib.sha256()
    for name, t in stream_weights(path, model, dtype, digest):
        owner, _, leaf = name.rpartition(".")
        mod = model.get_submodule(owner) if owner else model
        if leaf in mod._parameters:
            old = mod._parameters[leaf]
            new = tied.get(id(old))
            if new is None:
                new = nn.Parameter(t, requires_grad=False)
                if counts.get(id(old), 1) > 1:
                    tied[id(old)] = new
            mod._parameters[leaf] = new
        else:
            mod._buffers[leaf] = t
        del t
        if owner in targets and not any(p.is_meta for p in mod.parameters(recurse=False)):
            FP.quantize_frozen(model, bits, [owner])  # its full-precision weight is freed here
    left = [n for n, p in model.named_parameters() if p.is_meta]
    if left:  # stream_weights yields every state-dict entry: a defect if any is left
        raise RuntimeError(f"the streamed load left parameters unread: {left[:3]}")
    model.kseed_base_hash = digest.hexdigest()
    return model


def _quantized_loaded(path: str, dtype: str, bits: int):
    """quantized_model through transformers' load (kseed.modeling.load_model): each linear quantized
    from its mapped weight, then the tensors left in full precision copied out of the map, so that
    the map is released."""
    from ..modeling import load_model, model_hash
    model, _ = load_model(path, dtype, "cpu")
    digest = model_hash(model)
    for p in model.parameters():
        p.requires_grad_(False)
    FP.quantize_frozen(model, bits)
    with torch.no_grad():
        for t in list(model.parameters()) + list(model.buffers()):
            if t.is_floating_point():
                t.data = t.data.clone()  # out of the file map
    model.kseed_base_hash = digest
    return model


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
    batches of --batch-size; select_top), the candidates' mask and their scores (Method.model_facts:
    the server has no model)."""
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
            "lora_scores": [scores[t.name] for t in cands]}


def mask_bytes(mask: Sequence[int]) -> bytes:
    return np.packbits(np.asarray(mask, dtype=np.uint8), bitorder="little").tobytes()


# ---------------------------------------------------------------------------------- server
class FedPipeServer(FedITServer):
    """FedIT's server over the selected layout; the global adapter has rank R = --lora-rank and LoRA
    scale alpha / R, and goes down whole to every client; a client of rank r trains its top r
    components at its own scale alpha / r and uploads a rank-r adapter (any r in 1..R: a client's
    budget is its own, so the server does not plan ranks; it reads each upload's)."""
    method = "fedpipe"
    down_magic, up_magic = DOWN_MAGIC, UP_MAGIC

    def __init__(self, config: FedConfig, *, base_identity: Optional[dict] = None,
                 workdir: Optional[str] = None, readonly: bool = False):
        super().__init__(config, base_identity=base_identity, workdir=workdir, readonly=readonly)
        try:
            self.mask = [int(k) for k in self.base_identity["lora_mask"]]
        except (KeyError, TypeError, ValueError):
            raise ValueError("the fedpipe server needs the selection (base_identity, set by "
                             "kseed.task.load_workspace)") from None
        if sum(self.mask) != len(self.layout):
            raise ValueError("the fedpipe base identity's selection does not match its layout")

    def upload_ranks(self) -> Sequence[int]:
        return range(1, self.rank + 1)

    def adapter_at(self, rank: int) -> np.ndarray:
        if rank == self.rank:
            return self.adapter
        return view(self.layout, self.adapter, self.rank, self.spec.scale(self.rank), rank,
                    self.spec.scale(rank))

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
    base its budget gives it (client_plan; the budget: ``memory_budget_mib``, a SuperNode's node
    config memory-budget-mib, else --client-budgets).  It starts from the top r components of the
    global adapter (``view``).  A client on a quantized base (quantized_model) never loads the
    full-precision model: its structure comes from a skeleton, its tokenizer alone, and its base
    model's hash from the streamed weights."""
    down_magic, up_magic = DOWN_MAGIC, UP_MAGIC

    def __init__(self, config: FedConfig, model_loader, partition, *,
                 client_id: Optional[int] = None, shared=None, cache_dir: Optional[str] = None,
                 memory_budget_mib: Optional[float] = None):
        super().__init__(config, model_loader, partition, client_id=client_id, shared=shared,
                         cache_dir=cache_dir, memory_budget_mib=memory_budget_mib)
        self._plan: Optional[Tuple[int, int]] = None
        self._quantized = None
        self._tok = None

    def _source(self) -> Tuple[str, str]:
        from ..task import model_dir, resolve_dtype
        cfg = resolve_dtype(self.config)
        return model_dir(cfg), cfg.dtype

    def structure(self):
        """The base model's skeleton (kseed.modeling.load_skeleton: shapes, no weights), or the
        workspace's model when this client has loaded it anyway."""
        if self._ws is not None:
            return self._ws.model
        return skeleton(*self._source())

    def plan(self) -> Tuple[int, int]:
        """(bits of this client's frozen base, 32 for the run dtype; its rank), from its budget and
        the layout of the last down message."""
        if self._plan is None:
            cid = self.client_id if self.client_id is not None else 0
            budget = budget_of(self.config, cid, self.memory_budget_mib)
            self._plan = client_plan(self.config, self.structure(), self.layout, budget)
        return self._plan

    def tail_size(self) -> int:
        return (len(self.candidates) + 7) // 8

    def layout_of(self, tail: bytes) -> List[L.Target]:
        c = len(self.candidates)
        bits = np.unpackbits(np.frombuffer(tail, np.uint8), bitorder="little")
        if bits[c:].any() or not bits[:c].any():
            raise P.ProtocolError(f"the down message's target mask selects none of the {c} "
                                  "candidates, or names more")
        return [t for t, k in zip(self.candidates, bits[:c]) if k]

    def start(self, m: L.AdapterDown) -> Tuple[np.ndarray, int]:
        r = self.plan()[1]
        if r == m.rank:
            return m.adapter, r
        return view(self.layout, m.adapter, m.rank, self.spec.scale(m.rank), r,
                    self.spec.scale(r)), r

    def train_model(self):
        bits = self.plan()[0]
        if bits == 32:
            return self.workspace.model
        if self._quantized is None:
            self._quantized = quantized_model(*self._source(), "cpu", bits)
        return self._quantized

    def tokenizer(self):
        if self._ws is not None or self.plan()[0] == 32:
            return self.workspace.tok
        if self._tok is None:
            from ..modeling import load_tokenizer
            self._tok = load_tokenizer(self._source()[0])
        return self._tok

    def base_model_hash(self) -> Optional[str]:
        if self._ws is None and self._quantized is not None:
            return self._quantized.kseed_base_hash
        return super().base_model_hash()

    def fit(self, down_bytes: bytes) -> bytes:
        up = super().fit(down_bytes)
        self.last_stats["base_bits"], self.last_stats["rank"] = self.plan()
        return up


METHOD = Method(
    name="fedpipe",
    summary="FedPipe: FedIT on the weights a calibration set selects, per-client ranks and quantized "
            "frozen bases from memory budgets, heterogeneous ranks aggregated by SVD re-projection",
    server=FedPipeServer, client=FedPipeClient,
    options=LORA_OPTIONS | {"select_fraction", "calib_size", "client_budgets"},
    ignores=frozenset({"g_clip", "g_clip_abs"}), fixed={"g_clip": 0.0, "g_clip_abs": 0.0},
    defaults={"lr": 3e-3, "local_steps": 10}, model_facts=model_facts)
