"""Model side of the driver: loading a local Hugging Face causal LM, its identity hash, tokenising the
instruction examples, losses on response tokens, greedy generation, and the Workspace that rebuilds the
global model w0 + sum_k A_k z_k from a pristine copy of w0 with one fused pass."""
from __future__ import annotations

import collections
import contextlib
import glob
import hashlib
import math
import os
import time
import weakref
from typing import List, Optional, Sequence, Tuple

import numpy as np
import torch

from kseed_kernels import ModelSeeds

from . import weights as W
from .datasets import format_prompt
from .weights import ModelError

_SOURCES: "weakref.WeakKeyDictionary[torch.nn.Module, str]" = weakref.WeakKeyDictionary()

EMBEDDED_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data", "embedded")
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def check_model_dir(path: str) -> None:
    if not os.path.isdir(path):
        raise ModelError(f"model directory not found: {path}")
    if not os.path.isfile(os.path.join(path, "config.json")):
        raise ModelError(f"model directory {path} has no config.json")
    pats = ["*.safetensors", "*.bin", "*.safetensors.index.json", "*.bin.index.json"]
    if not any(glob.glob(os.path.join(path, p)) for p in pats):
        raise ModelError(f"model directory {path} holds no weights (*.safetensors or *.bin)")


@contextlib.contextmanager
def quiet_transformers():
    """transformers' progress bars off and its logging at ERROR inside the block (restored after)."""
    from transformers.utils import logging as tlog
    level = tlog.get_verbosity()
    bars = tlog.is_progress_bar_enabled()
    tlog.set_verbosity_error()
    tlog.disable_progress_bar()
    try:
        yield
    finally:
        tlog.set_verbosity(level)
        if bars:
            tlog.enable_progress_bar()


@contextlib.contextmanager
def _noting_interrupts(seen: list):
    """Appends to ``seen`` when SIGINT arrives inside the block; the signal still
    raises KeyboardInterrupt as Python's handler does.  load_model uses it to tell a Ctrl-C that a
    library caught and re-raised as another error from a real load failure.  Outside the main thread,
    or under a handler that is not Python's default, ``seen`` stays empty and nothing is changed."""
    import signal
    import threading
    if (threading.current_thread() is not threading.main_thread()
            or signal.getsignal(signal.SIGINT) is not signal.default_int_handler):
        yield
        return

    def note(signum, frame):
        seen.append(signum)
        signal.default_int_handler(signum, frame)

    signal.signal(signal.SIGINT, note)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, signal.default_int_handler)


def pad_id(tok) -> int:
    """The id that pads a batch: the tokenizer's pad token (load_model sets it to EOS, else unk, when
    missing), else 0 for a tokenizer with none of the three.  Padded positions are masked out of the
    attention and the loss, so any id in the vocabulary serves."""
    return 0 if tok.pad_token_id is None else int(tok.pad_token_id)


def _names(keys, at_most: int = 5) -> str:
    keys = sorted(keys)
    more = f" and {len(keys) - at_most} more" if len(keys) > at_most else ""
    return ", ".join(keys[:at_most]) + more


def _loading(path: str, what: str, fn):
    """``fn()`` with transformers quiet; any error it raises becomes a ModelError naming ``path``
    (a Ctrl-C that a library turned into another error stays a KeyboardInterrupt)."""
    interrupts: list = []
    try:
        with quiet_transformers(), _noting_interrupts(interrupts):
            return fn()
    except Exception as exc:  # transformers raises many kinds
        if interrupts:  # a Ctrl-C that transformers turned into another error (e.g. an ImportError)
            raise KeyboardInterrupt from None
        raise ModelError(f"cannot load {what} in {path}: {type(exc).__name__}: "
                         f"{str(exc).splitlines()[0] if str(exc) else ''}") from None


def load_tokenizer(path: str):
    """The tokenizer of a local model directory; its pad token set to EOS (else unk) when it has
    none.  Nothing is fetched from a hub."""
    from transformers import AutoTokenizer
    check_model_dir(path)
    tok = _loading(path, "the tokenizer", lambda: AutoTokenizer.from_pretrained(
        path, local_files_only=True))
    if tok.pad_token_id is None and (tok.eos_token is not None or tok.unk_token is not None):
        tok.pad_token = tok.eos_token if tok.eos_token is not None else tok.unk_token
    return tok


def _dtype_kw(dtype: str) -> dict:
    import transformers
    if dtype not in DTYPES:
        raise ModelError(f"unknown dtype {dtype!r}; choose one of {sorted(DTYPES)}")
    major_minor = tuple(int(x) for x in transformers.__version__.split(".")[:2])
    return {"dtype" if major_minor >= (4, 56) else "torch_dtype": DTYPES[dtype]}


def load_model(path: str, dtype: str = "fp32", device: str = "cpu"):
    """(model, tokenizer) from a local directory; nothing is fetched from a hub.

    Refused with a ModelError: a model whose weight files lack a tensor the architecture needs (which
    transformers would initialise at random) or hold tensors it does not use, and a model with a NaN or
    an infinity in its weights.  transformers' own messages and progress bars are not shown.

    Memory: transformers 5 maps a safetensors file and, when the run dtype is the file's, hands the
    mapped tensors to the model as they are (copy-on-write: they become private memory only as the
    training writes them); in another dtype each tensor is converted on its own.  So loading holds one
    copy of the weights at most (measured in bench/bench_memory.py).  The model remembers its directory
    for ``Workspace``, which maps w0 from the same files (kseed.weights).
    """
    from transformers import AutoModelForCausalLM
    check_model_dir(path)
    kw = _dtype_kw(dtype)
    tok = load_tokenizer(path)
    model, info = _loading(path, "the model", lambda: AutoModelForCausalLM.from_pretrained(
        path, local_files_only=True, output_loading_info=True, **kw))
    for what, key in (("lack tensors the model needs", "missing_keys"),
                      ("hold tensors the model does not use", "unexpected_keys"),
                      ("hold tensors of the wrong shape", "mismatched_keys")):
        keys = [k if isinstance(k, str) else str(k[0]) for k in (info.get(key) or [])]
        if keys:
            raise ModelError(f"the weights in {path} {what}: {_names(keys)}")
    if info.get("error_msgs"):
        raise ModelError(f"cannot load the model in {path}: {str(info['error_msgs'][0])[:200]}")
    bad = W.first_nonfinite(list(model.state_dict().items()))
    if bad is not None:
        raise ModelError(f"the weights in {path} hold NaN or infinite values (tensor {bad})")
    model.to(device)
    model.eval()
    for p in model.parameters():
        p.requires_grad_(True)  # marks the trainable set for ModelSeeds; autograd is never used
    _SOURCES[model] = os.path.abspath(path)
    return model, tok


def load_skeleton(path: str, dtype: str = "fp32") -> torch.nn.Module:
    """The model of a local directory with its parameters on the meta device: its modules, names,
    shapes, dtypes and tied weights, and no weight read or allocated (its buffers, which the
    architecture computes, are real).  Needs accelerate (a dependency of peft: ``kseed[lora]``)."""
    from transformers import AutoConfig, AutoModelForCausalLM
    check_model_dir(path)
    kw = _dtype_kw(dtype)
    try:
        from accelerate import init_empty_weights
    except ImportError as e:
        raise ImportError("a model skeleton needs accelerate: pip install 'kseed[lora]'") from e

    def build():
        config = AutoConfig.from_pretrained(path, local_files_only=True)
        with init_empty_weights(include_buffers=False):
            return AutoModelForCausalLM.from_config(config, **kw)
    model = _loading(path, "the model's architecture", build)
    model.tie_weights()  # from_pretrained ties them; from_config under init_empty_weights may not
    model.eval()
    return model


class NotStreamable(ModelError):
    """stream_weights cannot read these weights into this skeleton (not safetensors, or other
    names)."""


def stream_weights(path: str, model: torch.nn.Module, dtype: str, digest=None):
    """Yields (name, tensor) for every entry of ``model.state_dict()`` (a skeleton's: load_skeleton),
    in sorted name order, read from the directory's safetensors files one tensor at a time (plain
    reads into fresh memory: the files are never mapped, so no page of them counts in this process's
    memory) and converted to ``dtype``; a tied weight stored under one of its names is read once and
    yielded for each.  ``digest`` (a ``hashlib.sha256()``): updated as ``model_hash`` is, so that
    once the stream is exhausted its hexdigest is ``model_hash`` of the model these tensors fill.

    NotStreamable (before anything is yielded) when the files are not safetensors or their names are
    not exactly the model's (a checkpoint that transformers renames on loading): the caller may then
    load it through transformers.  ModelError for a tensor of the wrong shape, an unknown dtype or a
    NaN or infinity, as load_model refuses them."""
    files = W.weight_files(path)
    if not files:
        raise NotStreamable(f"{path} has no safetensors weights to stream")
    where = {}
    for f in files:
        header, start = W.read_header(f)
        for n, e in header.items():
            if n != "__metadata__":
                where[n] = (f, e, start)
    groups: dict = {}
    for n, p in model.named_parameters(remove_duplicate=False):
        groups.setdefault(id(p), []).append(n)
    alias = {n: g for g in groups.values() for n in g}
    sd = model.state_dict(keep_vars=True)
    source = {}
    for n in sd:
        src = [a for a in alias.get(n, [n]) if a in where]
        if not src:
            raise NotStreamable(f"the weights in {path} lack tensors the model needs: {n}")
        source[n] = src[0]
    unused = set(where) - set(source.values()) - {a for n in source for a in alias.get(n, [])}
    if unused:
        raise NotStreamable(f"the weights in {path} hold tensors the model does not use: "
                            f"{_names(unused)}")
    want = DTYPES[dtype]
    uses = collections.Counter(source.values())  # the names each stored tensor is yielded for
    read: dict = {}
    for n in sorted(sd):
        key = source[n]
        if key not in read:
            f, e, start = where[key]
            st = W.ST_DTYPES.get(e.get("dtype"))
            shape = tuple(int(x) for x in e["shape"])
            if st is None:
                raise ModelError(f"{f}: tensor {key!r} has dtype {e.get('dtype')!r}, not one of "
                                 f"{sorted(W.ST_DTYPES)}")
            if shape != tuple(sd[n].shape):
                raise ModelError(f"the weights in {path} hold tensors of the wrong shape: {key} is "
                                 f"{shape}, the model's {tuple(sd[n].shape)}")
            a, b = (int(x) for x in e["data_offsets"])
            buf = bytearray(b - a)
            with open(f, "rb") as fh:
                fh.seek(start + a)
                if fh.readinto(buf) != b - a:
                    raise ModelError(f"{f}: tensor {key!r} is truncated")
            t = (torch.frombuffer(buf, dtype=st) if buf else torch.empty(0, dtype=st)).reshape(shape)
            t = t.to(want) if t.is_floating_point() else t
            if t.is_floating_point() and not bool(torch.isfinite(t).all()):
                raise ModelError(f"the weights in {path} hold NaN or infinite values (tensor {key})")
            read[key] = [t, uses[key]]
        t = read[key][0]
        if digest is not None:
            _hash_entry(digest, n, t)
        read[key][1] -= 1
        if read[key][1] == 0:
            read[key][0] = None  # the last name of it: the caller holds the only reference
        yield n, t


def model_source(model: torch.nn.Module) -> Optional[str]:
    """The directory ``load_model`` loaded ``model`` from (None for a model built otherwise)."""
    return _SOURCES.get(model)


def model_hash(model: torch.nn.Module) -> str:
    """SHA-256 of the model's tensors (names, dtypes, shapes and bytes, sorted by name).

    Hashes each tensor's memory in place (a tensor on another device comes to the host one at a
    time): no copy of the model."""
    h = hashlib.sha256()
    sd = model.state_dict()
    for name in sorted(sd):
        _hash_entry(h, name, sd[name].detach().cpu().contiguous())
    return h.hexdigest()


def _hash_entry(h, name: str, t: torch.Tensor) -> None:
    h.update(name.encode() + b"\0" + str(t.dtype).encode() + str(tuple(t.shape)).encode())
    if t.numel():
        h.update(t.reshape(-1).view(torch.uint8).numpy().data)


# -------------------------------------------------------------------------------- tokenising
def tokenize_examples(tok, examples: Sequence[dict], max_length: int,
                      prompt: str = "reference") -> List[tuple]:
    """[(input_ids, n_prompt)] with the response (plus EOS) after the prompt, cut to max_length
    (the response keeps at most half, the prompt loses its beginning first).  ``prompt``: the
    template (kseed.datasets.format_prompt); with "reference" the response is appended directly to
    the prompt text and the two are tokenized together, the first len(prompt tokens) masked, as the
    reference code does; with "alpaca" they are tokenized apart."""
    out = []
    eos = tok.eos_token_id
    for ex in examples:
        text = format_prompt(ex, prompt)
        p = tok(text, add_special_tokens=False)["input_ids"]
        if prompt == "reference":
            joint = tok(text + ex["output"], add_special_tokens=False)["input_ids"]
            r = joint[min(len(p), len(joint)):]
            p = joint[:len(p)]
        else:
            r = tok(ex["output"], add_special_tokens=False)["input_ids"]
        if tok.bos_token_id is not None:
            p = [tok.bos_token_id] + p
        if eos is not None:
            r = r + [eos]
        r = r[: max(1, max_length // 2)] if len(p) + len(r) > max_length else r
        p = p[-(max_length - len(r)):] if len(p) + len(r) > max_length else p
        out.append((p + r, len(p)))
    return out


def collate(items: Sequence[tuple], pad_id: int, device):
    n = max(len(ids) for ids, _ in items)
    ids = torch.full((len(items), n), pad_id, dtype=torch.long)
    labels = torch.full((len(items), n), -100, dtype=torch.long)
    att = torch.zeros((len(items), n), dtype=torch.long)
    for i, (seq, npr) in enumerate(items):
        ids[i, :len(seq)] = torch.tensor(seq)
        labels[i, npr:len(seq)] = torch.tensor(seq[npr:])
        att[i, :len(seq)] = 1
    return ids.to(device), att.to(device), labels.to(device)


def loss_sum(model, batch) -> Tuple[torch.Tensor, int]:
    """(sum of the cross-entropy over the response tokens of a collated batch, as a float32 tensor
    with autograd when enabled; the number of those tokens)."""
    ids, att, labels = batch
    logits = model(input_ids=ids, attention_mask=att).logits.float()
    lg = logits[:, :-1].reshape(-1, logits.shape[-1])
    lb = labels[:, 1:].reshape(-1)
    n = int((lb != -100).sum())
    return torch.nn.functional.cross_entropy(lg, lb, ignore_index=-100, reduction="sum"), n


@torch.no_grad()
def batch_loss(model, batch) -> float:
    """Mean cross-entropy over the response tokens of a collated batch (float64 result); NaN for a
    batch without response tokens."""
    total, n = loss_sum(model, batch)
    if n == 0:  # nothing to score (e.g. empty responses and no EOS): no loss, not a zero one;
        return math.nan  # zo_step then skips the step, as for any non-finite loss
    return float(total) / n


@torch.no_grad()
def eval_loss(model, items: Sequence[tuple], pad_id: int, device, batch_size: int = 16, *,
              both: bool = False):
    """Held-out response loss over ``items`` (fixed order, fixed batches).

    Returns kseed's token-weighted mean (the sum of every response token's cross-entropy over the
    number of response tokens).  With ``both=True`` returns ``(token-weighted mean, example mean)``:
    the second is the FedKSeed reference code's metric, the mean over examples of each example's
    token-mean loss, so a short response weighs as much as a long one.  The per-token losses are
    float32; the sums are math.fsum's (correctly rounded, whatever the order or thread count).
    Items without response tokens (an empty response and no EOS) do not count; when no item has one
    there is no loss: None (and ``(None, None)``), never 0.0."""
    sums: List[float] = []
    counts: List[int] = []
    for i in range(0, len(items), batch_size):
        ids, att, labels = collate(items[i:i + batch_size], pad_id, device)
        logits = model(input_ids=ids, attention_mask=att).logits.float()
        lb = labels[:, 1:]
        nll = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]),
                                                lb.reshape(-1), ignore_index=-100, reduction="none")
        sums.extend(math.fsum(row) for row in nll.view(lb.shape).tolist())
        counts.extend((lb != -100).sum(dim=1).tolist())
    token_mean = math.fsum(sums) / sum(counts) if sum(counts) else None
    if not both:
        return token_mean
    means = [s / n for s, n in zip(sums, counts) if n]
    return token_mean, (math.fsum(means) / len(means) if means else None)


@torch.no_grad()
def rouge_l(model, tok, examples: Sequence[dict], max_length: int, device,
            max_new_tokens: int = 128, prompt: str = "reference") -> float:
    """Mean Rouge-L F1 of greedy generations against the references."""
    from rouge_score import rouge_scorer
    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=False)
    scores = []
    for ex in examples:
        p = tok(format_prompt(ex, prompt), add_special_tokens=False)["input_ids"]
        if tok.bos_token_id is not None:
            p = [tok.bos_token_id] + p
        p = p[-max(1, max_length - max_new_tokens):]
        ids = torch.tensor([p], device=device)
        out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=False,
                             max_new_tokens=max_new_tokens, pad_token_id=pad_id(tok),
                             eos_token_id=tok.eos_token_id)
        text = tok.decode(out[0, len(p):], skip_special_tokens=True).strip()
        scores.append(scorer.score(ex["output"], text)["rougeL"].fmeasure)
    return float(np.mean(scores)) if scores else float("nan")


# --------------------------------------------------------------------------------- workspace
class Workspace:
    """A model, its tokenizer, the ModelSeeds over its trainable tensors, and the pristine weights w0.

    ``rebuild(seeds, coefs)`` sets the weights to w0 + sum_k coefs[k] z(seeds[k]) (z of the workspace's
    noise family, ``noise``: gaussian or rademacher) with one fused pass
    over the nonzero coefficients (in ascending k; a zero term adds nothing under the spec's float32
    sum, see docs/SPEC.md section 4), reading each weight of w0 once.

    Memory (issue #11; kseed.weights has the details): ``w0`` is host memory that is not anonymous: a
    copy-on-write map of the model's safetensors when the run dtype is the file's, else of a cache file
    written once per model hash and dtype (``w0_source`` says which).  The model (on ``device``) is the
    only copy of the weights in private memory or on the accelerator; w0 does not move to the device:
    a rebuild on another device copies each tensor in, then applies in place (``staged``; None chooses
    by device, True forces it, which is how the tests run that path on CPU).

    With ``cache=True`` the weights of the last rebuild are kept as a snapshot in an unlinked file (page
    cache, not anonymous memory) and a second rebuild with the same seeds and coefficients copies them
    back instead of recomputing (bitwise the same bytes): in-process simulation shares ONE rebuild per
    round between the server's evaluation and all the clients of the next round.  ``rebuilds`` counts
    the computed rebuilds, ``rebuild_seconds`` the seconds spent in ``rebuild`` (both kinds).
    """

    def __init__(self, model, tok, *, backend: Optional[str] = None, rounding: str = "nearest",
                 noise: str = "gaussian", identity: Optional[dict] = None, cache: bool = False,
                 staged: Optional[bool] = None):
        self.model = model
        self.tok = tok
        self.ms = ModelSeeds(model, backend=backend, rounding=rounding, noise=noise)
        self.identity = identity or {}
        self.device = self.ms.params[0].device
        self.w0, self.w0_source = W.host_w0(model, self.ms, key=self.identity.get("hash"),
                                            source=model_source(model))
        self.staged = staged
        self.cache = cache
        self._snapshot: Optional[W.FileBuffer] = None
        self._snapshot_key: Optional[bytes] = None
        self.rebuilds = 0
        self.rebuild_seconds = 0.0

    @property
    def pad_id(self) -> int:
        return pad_id(self.tok)

    def rebuild(self, seeds: np.ndarray, coefs: np.ndarray) -> None:
        t0 = time.perf_counter()
        try:
            self._rebuild(seeds, coefs)
        finally:
            self.rebuild_seconds += time.perf_counter() - t0

    def _rebuild(self, seeds: np.ndarray, coefs: np.ndarray) -> None:
        c = np.ascontiguousarray(coefs, dtype=np.float32)
        s = np.ascontiguousarray(seeds, dtype=np.uint64)
        key = hashlib.sha256(s.tobytes() + c.tobytes()).digest() if self.cache else None
        if key is not None and key == self._snapshot_key:
            self.ms.discard_pending()  # the weights are overwritten
            with torch.no_grad():
                for p, snap in zip(self.ms.params, self._snapshot.tensors):
                    p.copy_(snap)
            return
        nz = np.flatnonzero(c != 0)
        self.ms.apply_from(self.w0, s[nz], c[nz], staged=self.staged)
        self.rebuilds += 1
        if self.cache:
            self._snapshot_key = None
            if self._snapshot is None:
                self._snapshot = W.host_buffer(self.ms.params, "the round snapshot")
            self._snapshot.copy_from(self.ms.params)
            self._snapshot_key = key

    def weights(self) -> List[torch.Tensor]:
        return [p.detach() for p in self.ms.params]
