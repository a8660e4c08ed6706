"""LoRA plumbing of the adapter methods (FedIT, FedPipe; kseed.methods.fedit / fedpipe), through peft.

peft is kseed's extra ``kseed[lora]``: it is imported only here, and only when a LoRA method runs
(``require_peft``), so plain kseed-fed needs none of it.

The pieces:

- ``find_targets(model, patterns)``: the model's ``nn.Linear`` modules whose name is one of the
  patterns or ends with ``.pattern`` (peft's own rule), in module order: the adapter's *layout*, a list
  of ``Target(name, in_features, out_features)``.  A model where nothing matches gets a ValueError
  naming the model's linear module names.
- The adapter as ONE float32 vector: per target, in layout order, A (rank x in, row-major) then B
  (out x rank, row-major); ``adapter_size(layout, rank) = rank x sum(in + out)``.  ``init_adapter``:
  A as peft's default (Kaiming-uniform with a = sqrt(5): U(-1/sqrt(in), 1/sqrt(in))) drawn from a seed,
  B = 0, so the first global model is the base model.
- ``LoraModel``: peft's LoRA injected into a workspace's model for one round of local training
  (``with LoraModel(ws.model, layout, spec, rank) as lm``: ``lm.load(vec)``, train ``lm.parameters``,
  ``lm.vector()``); on exit the model's modules are restored (peft's ``unload``), so the workspace
  holds a plain model again and its base tensors were never written.
- ``merge_into(params_by_name, layout, vec, rank, scale)``: W += scale x B @ A in place: the global
  model as a plain model (evaluation, export: an ordinary Hugging Face directory that loads without
  peft).
- The wire form of an adapter message: a fixed little-endian header (``AdapterHeader``) and the
  vector; decode checks every field and the exact length before reading a float, so a hostile or
  malformed message gets a ProtocolError naming the problem (kseed.protocol's style).
"""
from __future__ import annotations

import contextlib
import hashlib
import logging
import math
import struct
import warnings
from dataclasses import dataclass
from typing import Callable, Dict, List, NamedTuple, Optional, Sequence

import numpy as np
import torch

from . import protocol as P

EXTRA = "kseed[lora]"
DEFAULT_TARGETS = "q_proj,k_proj,v_proj,o_proj"  # LLaMA-like attention projections
MAX_RANK = 1 << 12
INIT_TAG = 5  # derive_seed(run seed, INIT_TAG): the first global adapter's A


class LoraUnavailable(ValueError):
    """peft (the kseed[lora] extra) is not installed."""


@contextlib.contextmanager
def quiet_imports():
    """peft and optimum-quanto import torchao when it is installed: its notices (optional kernels
    it cannot load, torch's deprecation of how it registers enums) are not kseed's."""
    quiet = [logging.getLogger(n) for n in ("torchao", "torch.utils._pytree")]
    levels = [q.level for q in quiet]
    for q in quiet:
        q.setLevel(logging.ERROR)
    try:
        yield
    finally:
        for q, lv in zip(quiet, levels):
            q.setLevel(lv)


def require_peft():
    """The peft module, or LoraUnavailable naming the extra to install."""
    try:
        with quiet_imports():
            import peft
    except ImportError as exc:
        raise LoraUnavailable(f"the LoRA methods need peft: pip install '{EXTRA}' ({exc})") from None
    return peft


class Target(NamedTuple):
    name: str
    in_features: int
    out_features: int


@dataclass(frozen=True)
class LoraSpec:
    """The LoRA settings of a run: target patterns, alpha and dropout (the rank is per client)."""
    targets: str = DEFAULT_TARGETS
    alpha: float = 16.0
    dropout: float = 0.05

    def patterns(self) -> List[str]:
        return parse_targets(self.targets)

    def scale(self, rank: int) -> float:
        """peft's LoRA scaling alpha / rank."""
        return float(self.alpha) / int(rank)


def parse_targets(text: str) -> List[str]:
    """The comma-separated target patterns of --lora-targets (ValueError for an empty one)."""
    if not isinstance(text, str):
        raise ValueError(f"--lora-targets must be a string, got {text!r}")
    pats = [t.strip() for t in text.split(",")]
    if not pats or any(not t or any(c.isspace() for c in t) for t in pats):
        raise ValueError(f"--lora-targets must be comma-separated module names (e.g. "
                         f"{DEFAULT_TARGETS}), got {text!r}")
    return pats


def linear_modules(model: torch.nn.Module) -> List[Target]:
    """Every nn.Linear of ``model`` in module order."""
    return [Target(n, int(m.in_features), int(m.out_features)) for n, m in model.named_modules()
            if isinstance(m, torch.nn.Linear)]


def find_targets(model: torch.nn.Module, patterns: Sequence[str]) -> List[Target]:
    """The layout: the linear modules whose name equals a pattern or ends with '.' + pattern (peft's
    rule for a list of target modules), in module order.  ValueError naming the model's linear
    modules (their distinct last parts) when none matches."""
    lin = linear_modules(model)
    pats = list(patterns)
    out = [t for t in lin if any(t.name == p or t.name.endswith("." + p) for p in pats)]
    if not out:
        kinds = sorted({t.name.rsplit(".", 1)[-1] for t in lin})
        raise ValueError(f"no linear module of the model matches --lora-targets "
                         f"{','.join(pats)}; its linear modules are named: "
                         f"{', '.join(kinds) if kinds else '(none)'}")
    return out


def layout_from(value) -> List[Target]:
    """A layout from its JSON form [[name, in, out], ...] (ValueError for a malformed one)."""
    try:
        out = [Target(str(n), int(i), int(o)) for n, i, o in value]
    except (TypeError, ValueError):
        raise ValueError(f"not an adapter layout: {str(value)[:80]!r}") from None
    if not out or any(t.in_features < 1 or t.out_features < 1 for t in out):
        raise ValueError("an adapter layout needs at least one target of positive sizes")
    return out


def adapter_size(layout: Sequence[Target], rank: int) -> int:
    """Floats in an adapter of this rank: rank x sum(in + out)."""
    return int(rank) * sum(t.in_features + t.out_features for t in layout)


def layout_fingerprint(layout: Sequence[Target], spec: LoraSpec) -> bytes:
    """8 bytes naming the layout and the LoRA settings both sides must share."""
    text = ";".join(f"{t.name}:{t.in_features}:{t.out_features}" for t in layout)
    text += f"|alpha={float(spec.alpha)!r}|dropout={float(spec.dropout)!r}"
    return hashlib.sha256(b"kseed-lora/v1/" + text.encode()).digest()[:8]


def split(layout: Sequence[Target], rank: int, vec) -> Dict[str, tuple]:
    """{target name: (A [rank, in], B [out, rank])} views of an adapter vector (numpy or torch)."""
    want = adapter_size(layout, rank)
    if len(vec) != want:
        raise ValueError(f"an adapter of rank {rank} over this layout has {want} floats, got "
                         f"{len(vec)}")
    out, o = {}, 0
    for t in layout:
        na, nb = rank * t.in_features, t.out_features * rank
        out[t.name] = (vec[o:o + na].reshape(rank, t.in_features),
                       vec[o + na:o + na + nb].reshape(t.out_features, rank))
        o += na + nb
    return out


def init_adapter(layout: Sequence[Target], rank: int, seed: int) -> np.ndarray:
    """float32: A ~ U(-1/sqrt(in), 1/sqrt(in)) (peft's default Kaiming-uniform init, a = sqrt(5)),
    drawn from ``seed`` target by target; B = 0."""
    rng = np.random.Generator(np.random.PCG64(P.derive_seed(seed, INIT_TAG)))
    vec = np.zeros(adapter_size(layout, rank), dtype=np.float32)
    for t, (a, _) in zip(layout, split(layout, rank, vec).values()):
        bound = 1.0 / math.sqrt(t.in_features)
        a[...] = rng.uniform(-bound, bound, size=a.shape).astype(np.float32)
    return vec


@torch.no_grad()
def merge_into(params: Dict[str, torch.Tensor], layout: Sequence[Target], vec: np.ndarray,
               rank: int, scale: float) -> None:
    """W += scale x B @ A for every target (``params``: target name -> its weight tensor [out, in]),
    computed in float32 and added in the weight's dtype."""
    parts = split(layout, rank, torch.from_numpy(np.ascontiguousarray(vec, dtype=np.float32)))
    for name, (a, b) in parts.items():
        w = params[name]
        delta = (b @ a) * scale
        w.add_(delta.to(device=w.device, dtype=w.dtype))


def target_weights(model: torch.nn.Module, layout: Sequence[Target]) -> Dict[str, torch.Tensor]:
    """{target name: the weight tensor of that module of ``model``}."""
    mods = dict(model.named_modules())
    try:
        return {t.name: mods[t.name].weight for t in layout}
    except KeyError as exc:
        raise ValueError(f"the model has no module {exc} of the adapter layout") from None


class LoraModel:
    """peft's LoRA over ``layout`` injected into ``model`` for the duration of a ``with`` block.

    Inside: the base tensors are frozen (requires_grad False), ``parameters`` are the adapter's
    tensors in the vector's order, ``load(vec)`` / ``vector()`` move the adapter in and out, and
    ``train()`` turns dropout on.  On exit peft's ``unload`` puts the original modules back (the base
    tensors are the same objects, never written), their requires_grad flags are restored and the
    model is in eval mode."""

    def __init__(self, model: torch.nn.Module, layout: Sequence[Target], spec: LoraSpec, rank: int):
        self.model = model
        self.layout = list(layout)
        self.spec = spec
        self.rank = int(rank)
        self.peft = None
        self._flags = None

    def __enter__(self) -> "LoraModel":
        peft = require_peft()
        self._flags = [(p, p.requires_grad) for p in self.model.parameters()]
        conf = peft.LoraConfig(r=self.rank, lora_alpha=self.spec.alpha,
                               lora_dropout=self.spec.dropout, bias="none",
                               target_modules=[t.name for t in self.layout])
        # peft's own init draws from the global RNG; transformers warns of a name peft reads
        with torch.random.fork_rng(devices=[]), warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            self.peft = peft.get_peft_model(self.model, conf)
        mods = dict(self.peft.base_model.model.named_modules())
        self.parameters: List[torch.Tensor] = []
        for t in self.layout:
            m = mods[t.name]
            self.parameters += [m.lora_A["default"].weight, m.lora_B["default"].weight]
        for p in self.parameters:
            if p.dtype != torch.float32:
                raise ValueError(f"peft made a {p.dtype} adapter; kseed's adapters are float32")
        self.model.eval()
        return self

    def __exit__(self, *exc) -> None:
        try:
            if self.peft is not None:
                self.peft.unload()
        finally:
            for p, flag in self._flags or []:
                p.requires_grad_(flag)
                p.grad = None
            self.model.eval()
            self.peft = None

    def train(self, on: bool = True) -> None:
        self.peft.train(on)

    @torch.no_grad()
    def load(self, vec: np.ndarray) -> None:
        parts = split(self.layout, self.rank, torch.from_numpy(np.ascontiguousarray(
            vec, dtype=np.float32)))
        it = iter(self.parameters)
        for a, b in parts.values():
            next(it).copy_(a)
            next(it).copy_(b)

    @torch.no_grad()
    def vector(self) -> np.ndarray:
        return np.concatenate([p.detach().float().cpu().reshape(-1).numpy()
                               for p in self.parameters]).astype(np.float32)


# ---------------------------------------------------------------------------------- wire form
VERSION = 1


@dataclass
class AdapterDown:
    """Server -> client: the global adapter and the local settings."""
    round: int
    client_id: int
    fingerprint: bytes  # layout_fingerprint
    local_steps: int
    batch_size: int
    lr: float
    client_seed: int
    rank: int
    adapter: np.ndarray  # float32 [adapter_size(layout, rank)]
    tail: bytes = b""  # a method's own bytes after the adapter


@dataclass
class AdapterUp:
    """Client -> server: the client's adapter after its local steps."""
    round: int
    client_id: int
    num_examples: int
    steps: int  # local steps taken (a step with a non-finite loss is skipped)
    train_loss: float
    rank: int
    adapter: np.ndarray  # float32


_DOWN = struct.Struct("<4sHHII8sIIdQII")
_UP = struct.Struct("<4sHHIIIIfII")
DOWN_HEADER_SIZE = _DOWN.size
UP_HEADER_SIZE = _UP.size
assert DOWN_HEADER_SIZE == 56 and UP_HEADER_SIZE == 36


def down_size(n: int) -> int:
    return DOWN_HEADER_SIZE + 4 * int(n)


def up_size(n: int) -> int:
    return UP_HEADER_SIZE + 4 * int(n)


def _rank(r) -> int:
    if P._u32("rank", r) < 1 or r > MAX_RANK:
        raise P.ProtocolError(f"rank must be in [1, {MAX_RANK}], got {r!r}")
    return int(r)


def encode_down(m: AdapterDown, magic: bytes, tail: bytes = b"") -> bytes:
    """The down message; ``tail``: a method's own bytes after the adapter (FedPipe's target mask)."""
    a = P._finite_f32("adapter", m.adapter)
    if not (math.isfinite(float(m.lr)) and m.lr > 0):
        raise P.ProtocolError(f"lr must be finite and > 0, got {m.lr}")
    if P._u32("batch_size", m.batch_size) < 1:
        raise P.ProtocolError("batch_size must be >= 1")
    if not isinstance(m.fingerprint, bytes) or len(m.fingerprint) != 8:
        raise P.ProtocolError("fingerprint must be 8 bytes")
    if not isinstance(m.client_seed, (int, np.integer)) or not 0 <= int(m.client_seed) < 2 ** 64:
        raise P.ProtocolError(f"client_seed must be a uint64, got {m.client_seed!r}")
    hdr = _DOWN.pack(magic, VERSION, 0, P._u32("round", m.round), P._u32("client_id", m.client_id),
                     m.fingerprint, P._u32("local_steps", m.local_steps), int(m.batch_size),
                     float(m.lr), int(m.client_seed), _rank(m.rank), a.shape[0])
    return hdr + a.astype("<f4").tobytes() + bytes(tail)


def _floats(data: bytes, offset: int, n: int, what: str) -> np.ndarray:
    a = np.frombuffer(data, dtype="<f4", count=n, offset=offset).astype(np.float32)
    if not np.isfinite(a).all():
        i = int(np.flatnonzero(~np.isfinite(a))[0])
        raise P.ProtocolError(f"NaN/inf in the {what}: adapter[{i}] = {a[i]}")
    return a


def decode_down(data, magic: bytes, *, size_of, tail: int = 0) -> AdapterDown:
    """Decode and check a down message; ``size_of(rank)``: the adapter floats at that rank (the
    layout's), so the length is checked exactly; ``tail``: the bytes of the method's own after the
    adapter (``AdapterDown.tail``)."""
    data = P._check_bytes(data)
    if len(data) < DOWN_HEADER_SIZE:
        raise P.ProtocolError(f"adapter down message truncated: {len(data)} bytes, the header "
                              f"alone is {DOWN_HEADER_SIZE}")
    got, ver, flags, rnd, cid, fp, tau, bs, lr, cseed, rank, n = _DOWN.unpack_from(data)
    P.check_preamble(f"{magic.decode()} down message", got, magic, ver, VERSION, flags)
    if rnd < 1:
        raise P.ProtocolError("adapter down message for round 0")
    if not (math.isfinite(lr) and lr > 0) or bs < 1:
        raise P.ProtocolError(f"bad local config in the down message: lr {lr}, batch size {bs}")
    if not 1 <= rank <= MAX_RANK:
        raise P.ProtocolError(f"rank {rank} in the down message is not in [1, {MAX_RANK}]")
    want = size_of(rank)
    if n != want or len(data) != down_size(want) + tail:
        raise P.ProtocolError(f"wrong length: the down message has {len(data)} bytes and says {n} "
                              f"floats; a rank-{rank} adapter is {want} floats, "
                              f"{down_size(want) + tail} bytes")
    return AdapterDown(round=rnd, client_id=cid, fingerprint=fp, local_steps=tau, batch_size=bs,
                       lr=lr, client_seed=cseed, rank=rank,
                       adapter=_floats(data, DOWN_HEADER_SIZE, n, "down message"),
                       tail=data[down_size(n):])


def encode_up(m: AdapterUp, magic: bytes) -> bytes:
    a = P._finite_f32("adapter", m.adapter)
    if P._u32("num_examples", m.num_examples) < 1:
        raise P.ProtocolError("num_examples must be >= 1")
    hdr = _UP.pack(magic, VERSION, 0, P._u32("round", m.round), P._u32("client_id", m.client_id),
                   int(m.num_examples), P._u32("steps", m.steps), float(m.train_loss),
                   _rank(m.rank), a.shape[0])
    return hdr + a.astype("<f4").tobytes()


def decode_up(data, magic: bytes, *, size_of: Callable[[int], int], ranks: Sequence[int],
              expected_round: Optional[int] = None, expected_client: Optional[int] = None,
              max_steps: Optional[int] = None) -> AdapterUp:
    """Decode and check an upload of an adapter of one of the ``ranks`` allowed; ``size_of(rank)``:
    its floats at that rank (the layout's).  The length is checked before anything is read (an upload
    over the largest allowed adapter is refused unread), and then exactly for the rank it names."""
    data = P._check_bytes(data)
    ranks = sorted(set(int(r) for r in ranks))
    limit = up_size(size_of(ranks[-1]))
    if len(data) > limit:
        raise P.ProtocolError(f"oversized upload: {len(data)} bytes > limit {limit}")
    if len(data) < UP_HEADER_SIZE:
        raise P.ProtocolError(f"upload truncated: {len(data)} bytes, the header alone is "
                              f"{UP_HEADER_SIZE}")
    got, ver, flags, rnd, cid, n_ex, steps, loss, r, n = _UP.unpack_from(data)
    P.check_preamble(f"{magic.decode()} upload", got, magic, ver, VERSION, flags)
    P.check_up_header(rnd, cid, n_ex, 0, expected_round, expected_client)
    if max_steps is not None and steps > max_steps:
        raise P.ProtocolError(f"upload reports {steps} local steps, the run has {max_steps}")
    if r not in ranks:
        allowed = (f"this client's rank is {ranks[0]}" if len(ranks) == 1 else
                   f"the ranks allowed are {ranks[0]}..{ranks[-1]}")
        raise P.ProtocolError(f"upload holds a rank-{r} adapter, {allowed}")
    size = size_of(r)
    if n != size or len(data) != up_size(size):
        raise P.ProtocolError(f"wrong length: upload has {len(data)} bytes and says {n} floats; a "
                              f"rank-{r} adapter is {size} floats, {up_size(size)} bytes")
    return AdapterUp(round=rnd, client_id=cid, num_examples=n_ex, steps=steps,
                     train_loss=float(loss), rank=r, adapter=_floats(data, UP_HEADER_SIZE, n,
                                                                     "upload"))
