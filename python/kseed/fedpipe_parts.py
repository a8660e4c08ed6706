"""FedPipe's parts that stand apart from the method wiring (Fang et al. 2024, arXiv 2404.06448):

- the frozen base quantized to a client's memory (``quantize_frozen``, ``frozen_bytes``,
  ``budget_to_bits``): int8 or 4-bit (NF4) weight-only ``nn.Linear`` through bitsandbytes, whose CPU
  backend runs forward and backward, and under which peft puts its own LoRA layers;
- the choice of the weights to adapt (``score_weights``, ``select_top``): first-order Taylor importance
  sum |grad x weight| on a calibration set, the stand-in for the paper's score;
- per-client LoRA ranks from a budget (``rank_for_budget``) and the aggregation of adapters of unequal
  ranks by SVD re-projection (``aggregate_heterogeneous``, ``client_adapter``).

docs/DRIVER.md "FedPipe" gives the choices and their reasons. Everything here is a plain function over
torch modules and tensors; bitsandbytes is imported only by the quantizing functions (``kseed[lora]``).
"""
from __future__ import annotations

import math
import numbers
from typing import Callable, Dict, Iterable, List, NamedTuple, Optional, Sequence, Tuple

import torch
from torch import nn

BITS = (None, 8, 4)  # full precision, int8, 4-bit NF4
NF4_BLOCK = 64       # bitsandbytes' default 4-bit block: one float32 absmax per 64 weights


# ---------------------------------------------------------------------------------------------------
# Quantized frozen base

def linear_modules(model: nn.Module, modules: Optional[Iterable[str]] = None) -> List[str]:
    """The names of the ``nn.Linear`` modules of ``model`` to quantize or score, sorted.

    ``modules=None``: every ``nn.Linear`` whose weight no other module shares (a tied LM head stays in
    full precision with the embedding it shares its weight with). Given names must each be an
    ``nn.Linear`` of the model (ValueError naming the first that is not)."""
    named = dict(model.named_modules())
    if modules is not None:
        if isinstance(modules, str):
            raise TypeError("modules must be a list of module names, not one string")
        names = sorted(set(modules))
        for n in names:
            if n not in named:
                raise ValueError(f"no module named {n!r} in the model")
            if not isinstance(named[n], nn.Linear):
                raise ValueError(f"module {n!r} is a {type(named[n]).__name__}, not an nn.Linear")
            if not named[n].weight.is_floating_point():
                raise ValueError(f"module {n!r} is already quantized ({named[n].weight.dtype} weight)")
        return names
    owners: Dict[int, int] = {}
    for _, p in model.named_parameters(remove_duplicate=False):
        owners[id(p)] = owners.get(id(p), 0) + 1
    return sorted(n for n, m in named.items()
                  if isinstance(m, nn.Linear) and type(m) is nn.Linear and owners.get(id(m.weight)) == 1)


def _check_bits(bits) -> None:
    if bits is not None and (isinstance(bits, bool) or bits not in (8, 4)):
        raise ValueError(f"bits must be 8, 4 or None (full precision), not {bits!r}")


def _bnb():
    try:
        import bitsandbytes as bnb
    except ImportError as e:  # the extra is not installed
        raise ImportError("a quantized frozen base needs bitsandbytes: pip install 'kseed[lora]'") from e
    return bnb


_INT8_CLASS = None


def _int8_class():
    """bitsandbytes' ``Linear8bitLt``, weight-only in eval as in training. On CPU, bitsandbytes'
    training path dequantizes the int8 rows and multiplies in the input's dtype; its eval path quantizes
    the activations too (LLM.int8). This subclass keeps the weight-only path in both modes, so a
    held-out loss sees the numerics that training saw. A subclass, so peft still wraps it with its
    bitsandbytes LoRA layer."""
    global _INT8_CLASS
    if _INT8_CLASS is None:
        bnb = _bnb()

        class Int8WeightOnlyLinear(bnb.nn.Linear8bitLt):
            def forward(self, x: torch.Tensor) -> torch.Tensor:
                if self.weight.CB is not None:
                    self.init_8bit_state()
                if self.bias is not None and self.bias.dtype != x.dtype:
                    self.bias.data = self.bias.data.to(x.dtype)
                self.state.is_training = True  # bitsandbytes' weight-only path (MatMul8bitFp on CPU)
                out = bnb.matmul(x, self.weight, bias=self.bias, state=self.state)
                if not self.state.has_fp16_weights and self.state.CB is not None:
                    self.weight.data = self.state.CB
                return out

        Int8WeightOnlyLinear.__module__ = __name__
        Int8WeightOnlyLinear.__qualname__ = "Int8WeightOnlyLinear"  # pickled by this module's name
        _INT8_CLASS = Int8WeightOnlyLinear
    return _INT8_CLASS


def __getattr__(name: str):
    """``Int8WeightOnlyLinear``, defined on first use (bitsandbytes is an extra), so that a model
    holding it pickles and loads (torch.save / torch.load, multiprocessing)."""
    if name == "Int8WeightOnlyLinear":
        return _int8_class()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def _quantized_linear(lin: nn.Linear, bits: int) -> nn.Module:
    bnb = _bnb()
    w = lin.weight.detach()
    has_bias = lin.bias is not None
    if bits == 8:
        q = _int8_class()(lin.in_features, lin.out_features, bias=has_bias, has_fp16_weights=False,
                          threshold=0.0, device="meta")
        q.weight = bnb.nn.Int8Params(w, requires_grad=False, has_fp16_weights=False)
    else:
        q = bnb.nn.Linear4bit(lin.in_features, lin.out_features, bias=has_bias, compute_dtype=w.dtype,
                              compress_statistics=False, quant_type="nf4", device="meta")
        q.weight = bnb.nn.Params4bit(w, requires_grad=False, compress_statistics=False,
                                     quant_type="nf4", blocksize=NF4_BLOCK)
    if has_bias:
        q.bias = nn.Parameter(lin.bias.detach().clone(), requires_grad=False)
    # bitsandbytes quantizes the weight when it moves to its device, into new tensors: ``w`` (no copy
    # of it is made, so a weight mapped from a file never becomes private memory) is only read
    return q.to(w.device)


def quantize_frozen(model: nn.Module, bits: Optional[int], modules: Optional[Iterable[str]] = None
                    ) -> nn.Module:
    """Quantize ``model``'s frozen linear weights in place and return it.

    bits: 8 (int8, one float32 scale per output row), 4 (NF4, one float32 absmax per 64 weights) or None
    (nothing changes). modules: the ``nn.Linear`` names (``linear_modules``' default: every untied
    linear). The quantized layers' weights and biases do not require grad; activations still carry
    gradients through them. The model is flagged ``is_loaded_in_8bit`` / ``is_loaded_in_4bit`` as a
    bitsandbytes-loaded HF model is, so ``peft.get_peft_model`` puts its bitsandbytes LoRA layers on
    the quantized ones. CPU only here (bitsandbytes' CPU backend); float32 or bfloat16 weights."""
    _check_bits(bits)
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, not {type(model).__name__}")
    names = linear_modules(model, modules)
    if bits is None:
        return model
    if not names:
        raise ValueError("the model has no nn.Linear module to quantize")
    for n in names:
        w = model.get_submodule(n).weight
        if w.device.type != "cpu":
            raise ValueError(f"quantize_frozen runs on CPU; {n} is on {w.device}")
        if w.dtype not in (torch.float32, torch.bfloat16):
            raise ValueError(f"quantize_frozen takes float32 or bfloat16 weights; {n} is {w.dtype}")
    for n in names:
        parent, _, leaf = n.rpartition(".")
        owner = model.get_submodule(parent) if parent else model
        setattr(owner, leaf, _quantized_linear(getattr(owner, leaf), bits))
    setattr(model, "is_loaded_in_8bit" if bits == 8 else "is_loaded_in_4bit", True)
    return model


def _linear_bytes(out_f: int, in_f: int, bias: bool, elem: int, bits: Optional[int]) -> int:
    n = out_f * in_f
    b = out_f * elem if bias else 0
    if bits is None:
        return n * elem + b
    if bits == 8:
        return n + 4 * out_f + b                       # int8 rows, float32 row scales (SCB)
    return (n + 1) // 2 + 4 * (-(-n // NF4_BLOCK)) + 4 * 16 + b  # packed nibbles, absmax, the NF4 code


def frozen_bytes(model: nn.Module, bits: Optional[int], modules: Optional[Iterable[str]] = None) -> int:
    """Bytes of ``model``'s weights once ``quantize_frozen(model, bits, modules)`` has run (parameters
    and buffers, each shared tensor once, plus the 4-bit layers' quantization state), from the
    full-precision model. ``stored_bytes`` measures a quantized model; tests check the two agree."""
    _check_bits(bits)
    names = set(linear_modules(model, modules))
    quant = {id(model.get_submodule(n).weight) for n in names} | {
        id(model.get_submodule(n).bias) for n in names if model.get_submodule(n).bias is not None}
    total = sum(t.numel() * t.element_size() for t in _tensors(model) if id(t) not in quant)
    for n in names:
        m = model.get_submodule(n)
        total += _linear_bytes(m.out_features, m.in_features, m.bias is not None,
                               m.weight.element_size(), bits)
    return total


def _tensors(model: nn.Module):
    seen = set()
    for t in list(model.parameters()) + list(model.buffers()):
        if id(t) not in seen:
            seen.add(id(t))
            yield t


def stored_bytes(model: nn.Module) -> int:
    """Bytes ``model`` holds in its parameters and buffers (each shared tensor once), the int8 layers'
    row scales and the 4-bit layers' quantization state (absmax, code) included."""
    tensors = list(_tensors(model))
    for t in list(tensors):
        qs = getattr(t, "quant_state", None)
        tensors += [getattr(t, "SCB", None)] + ([qs.absmax, qs.code] if qs is not None else [])
    for m in model.modules():  # bitsandbytes moves the int8 row scales to the layer's state at first use
        tensors.append(getattr(getattr(m, "state", None), "SCB", None))
    seen, total = set(), 0
    for t in tensors:
        if torch.is_tensor(t) and id(t) not in seen:
            seen.add(id(t))
            total += t.numel() * t.element_size()
    return total


def budget_to_bits(memory_budget_bytes, model: nn.Module, modules: Optional[Iterable[str]] = None
                   ) -> Optional[int]:
    """The largest precision (None = full, then 8, then 4) whose frozen weights (``frozen_bytes``) fit
    in ``memory_budget_bytes``; ValueError when not even the 4-bit base fits."""
    budget = _number(memory_budget_bytes, "memory_budget_bytes")
    if budget < 0:
        raise ValueError(f"memory_budget_bytes must be >= 0, not {memory_budget_bytes!r}")
    need = {}
    for bits in BITS:
        need[bits] = frozen_bytes(model, bits, modules)
        if need[bits] <= budget:
            return bits
    raise ValueError(f"memory budget {budget:.0f} bytes is below the 4-bit frozen model's "
                     f"{need[4]} bytes (int8: {need[8]}, full: {need[None]})")


# ---------------------------------------------------------------------------------------------------
# Weight selection

def _default_loss(model: nn.Module, batch) -> torch.Tensor:
    from .modeling import loss_sum  # an (ids, attention mask, labels) batch: mean response loss
    total, n = loss_sum(model, batch)
    return total / max(n, 1)


def score_weights(model: nn.Module, batches: Iterable, candidates: Optional[Iterable[str]] = None,
                  loss_fn: Optional[Callable[[nn.Module, object], torch.Tensor]] = None
                  ) -> Dict[str, float]:
    """{module name: score} for the candidate ``nn.Linear`` modules (``linear_modules``' default).

    score = sum over the calibration batches b and the weight's entries e of |g_b,e x w_e|, with g_b the
    gradient of batch b's loss: the first-order Taylor estimate of the loss change from removing each
    entry (Molchanov et al. 2019), summed over the weight (so a larger matrix can score higher). This is
    kseed's stand-in for FedPipe's importance score. ``loss_fn(model, batch)`` returns the scalar loss
    (default: the mean response cross-entropy of a kseed (ids, attention mask, labels) batch). Only the
    candidates' weights get gradients; every parameter's ``requires_grad`` and ``.grad`` and the
    model's train/eval mode are as they were afterwards. Run on the full-precision model."""
    names = linear_modules(model, candidates)
    if not names:
        raise ValueError("no candidate nn.Linear module to score")
    loss_fn = loss_fn or _default_loss
    weights = [model.get_submodule(n).weight for n in names]
    params = list(model.parameters())
    saved = [(p.requires_grad, p.grad) for p in params]
    was_training = model.training
    scores = [torch.zeros((), dtype=torch.float64) for _ in names]
    nb = 0
    try:
        model.eval()  # no dropout: the score of a fixed calibration set is deterministic
        for p in params:
            p.requires_grad_(False)
            p.grad = None
        for w in weights:
            w.requires_grad_(True)
        for batch in batches:
            loss = loss_fn(model, batch)
            if not torch.is_tensor(loss) or loss.numel() != 1:
                raise TypeError("loss_fn must return a scalar tensor")
            if not torch.isfinite(loss):
                raise ValueError(f"calibration batch {nb} gave a non-finite loss ({float(loss)})")
            grads = torch.autograd.grad(loss, weights, allow_unused=True)
            for i, (w, g) in enumerate(zip(weights, grads)):
                if g is not None:
                    scores[i] += (g.detach().double() * w.detach().double()).abs().sum()
            nb += 1
    finally:
        for p, (rg, gr) in zip(params, saved):
            p.requires_grad_(rg)
            p.grad = gr
        model.train(was_training)
    if nb == 0:
        raise ValueError("score_weights needs at least one calibration batch")
    return {n: float(s) for n, s in zip(names, scores)}


def select_top(scores: Dict[str, float], fraction: float) -> List[str]:
    """The names of the top ``fraction`` of ``scores`` (ceil(fraction x n), at least one), highest
    score first, equal scores by name: deterministic."""
    f = _number(fraction, "fraction")
    if not 0 < f <= 1:
        raise ValueError(f"fraction must be in (0, 1], not {fraction!r}")
    if not scores:
        raise ValueError("no scores to select from")
    for n, s in scores.items():
        if not math.isfinite(s):
            raise ValueError(f"score of {n!r} is not finite ({s})")
    k = max(1, math.ceil(f * len(scores) - 1e-9))
    return sorted(scores, key=lambda n: (-scores[n], n))[:k]


# ---------------------------------------------------------------------------------------------------
# Per-client ranks and the aggregation of adapters of unequal ranks

def _number(x, what: str) -> float:
    """A real number from a config or a Flower node config (int, float or numeric string)."""
    if isinstance(x, bool):
        raise TypeError(f"{what} must be a number, not a bool")
    if isinstance(x, str):
        try:
            x = float(x.strip())
        except ValueError:
            raise ValueError(f"{what} must be a number, not {x!r}") from None
    if not isinstance(x, numbers.Real):
        raise TypeError(f"{what} must be a number, not {type(x).__name__}")
    x = float(x)
    if not math.isfinite(x):
        raise ValueError(f"{what} must be finite, not {x}")
    return x


def rank_for_budget(budget, min_rank: int = 2, max_rank: int = 16, full: float = 1.0) -> int:
    """A client's LoRA rank from its budget (a number, or the numeric string of a Flower node config).

    share = min(budget / full, 1); rank = min_rank + round(share x (max_rank - min_rank)), half to even.
    So budget 0 gives min_rank and any budget >= full gives max_rank; ``full`` is the budget of a
    client that gets the largest rank (1.0: budgets as fractions; or a memory size in bytes)."""
    b = _number(budget, "budget")
    fl = _number(full, "full")
    for v, what in ((min_rank, "min_rank"), (max_rank, "max_rank")):
        if isinstance(v, bool) or not isinstance(v, numbers.Integral) or v < 1:
            raise ValueError(f"{what} must be an integer >= 1, not {v!r}")
    if min_rank > max_rank:
        raise ValueError(f"min_rank {min_rank} is above max_rank {max_rank}")
    if b < 0:
        raise ValueError(f"budget must be >= 0, not {budget!r}")
    if fl <= 0:
        raise ValueError(f"full must be > 0, not {full!r}")
    share = min(b / fl, 1.0)
    return int(min_rank + round(share * (max_rank - min_rank)))


class Aggregate(NamedTuple):
    A: torch.Tensor         # target_rank x in
    B: torch.Tensor         # out x target_rank
    delta: torch.Tensor     # the exact weighted mean of the clients' products (float64)
    singular: torch.Tensor  # every singular value of delta, descending (float64)
    rel_error: float        # ||delta - B A||_F / ||delta||_F = ||dropped singular values|| / ||all||


def aggregate_heterogeneous(adapters: Sequence[Tuple[torch.Tensor, torch.Tensor]],
                            weights: Sequence[float], target_rank: int,
                            scales: Optional[Sequence[float]] = None) -> Aggregate:
    """Aggregate one weight's LoRA adapters of unequal ranks by SVD re-projection.

    adapters: per client (A_i: r_i x in, B_i: out x r_i); weights: per client (e.g. example counts),
    normalised to sum 1; scales: per client s_i, the factor its LoRA layer multiplies B_i A_i by
    (peft: alpha / r_i; default 1). delta = sum_i w_i s_i B_i A_i, formed exactly in float64, then
    truncated to ``target_rank`` by SVD: delta = U S V^T, B = U_r sqrt(S_r), A = sqrt(S_r) V_r^T, the
    best rank-r approximation (Eckart-Young). Exact when target_rank >= rank(delta) (e.g. >= sum r_i);
    otherwise ``rel_error`` is the norm of the dropped singular values over the norm of all. Each
    singular vector's sign is fixed (the largest-magnitude entry of each U column is positive, the first
    such entry on ties), so the result is bitwise repeatable on one machine. A and B come back in the
    first adapter's dtype; ``client_adapter`` cuts a client's rank and scale from them."""
    if not adapters:
        raise ValueError("no adapters to aggregate")
    if len(weights) != len(adapters):
        raise ValueError(f"{len(adapters)} adapters but {len(weights)} weights")
    scales = [1.0] * len(adapters) if scales is None else list(scales)
    if len(scales) != len(adapters):
        raise ValueError(f"{len(adapters)} adapters but {len(scales)} scales")
    w = [_number(x, "weight") for x in weights]
    s = [_number(x, "scale") for x in scales]
    if any(x < 0 for x in w) or sum(w) <= 0:
        raise ValueError(f"weights must be >= 0 with a positive sum, not {list(weights)}")
    A0, B0 = adapters[0]
    out_f, in_f = B0.shape[0], A0.shape[-1]
    if isinstance(target_rank, bool) or not isinstance(target_rank, numbers.Integral) or \
            not 1 <= target_rank <= min(out_f, in_f):
        raise ValueError(f"target_rank must be an integer in [1, {min(out_f, in_f)}], not {target_rank!r}")
    delta = torch.zeros(out_f, in_f, dtype=torch.float64)
    total = math.fsum(w)
    for i, (A, B) in enumerate(adapters):
        if A.dim() != 2 or B.dim() != 2 or A.shape[0] != B.shape[1] or B.shape[0] != out_f \
                or A.shape[1] != in_f:
            raise ValueError(f"adapter {i}: A {tuple(A.shape)} and B {tuple(B.shape)} are not "
                             f"(r x {in_f}, {out_f} x r)")
        if not (torch.isfinite(A).all() and torch.isfinite(B).all()):
            raise ValueError(f"adapter {i} holds non-finite values")
        delta += (w[i] / total * s[i]) * (B.detach().double().cpu() @ A.detach().double().cpu())
    U, S, Vh = torch.linalg.svd(delta, full_matrices=False)
    U, Vh = U[:, :target_rank], Vh[:target_rank]
    pivot = U.abs().argmax(dim=0)  # first maximum on ties
    sign = torch.sign(U[pivot, torch.arange(target_rank)])
    sign[sign == 0] = 1
    U, Vh = U * sign, Vh * sign[:, None]
    root = S[:target_rank].sqrt()
    norm = S.norm()
    rel = float(S[target_rank:].norm() / norm) if norm > 0 else 0.0
    dt = A0.dtype
    return Aggregate((root[:, None] * Vh).to(dt), (U * root).to(dt), delta, S, rel)


def client_adapter(agg: Aggregate, rank: int, scale: float = 1.0) -> Tuple[torch.Tensor, torch.Tensor]:
    """A client's (A: rank x in, B: out x rank) from an ``Aggregate``: the top ``rank`` components of
    the global adapter (the best rank-``rank`` approximation of its delta), divided by the client's
    LoRA ``scale`` (1/sqrt(scale) on each factor) so that scale x B A is that approximation."""
    r = agg.A.shape[0]
    if isinstance(rank, bool) or not isinstance(rank, numbers.Integral) or not 1 <= rank <= r:
        raise ValueError(f"rank must be an integer in [1, {r}] (the aggregate's rank), not {rank!r}")
    sc = _number(scale, "scale")
    if sc <= 0:
        raise ValueError(f"scale must be > 0, not {scale!r}")
    f = 1.0 / math.sqrt(sc)
    return (agg.A[:rank] * f).contiguous(), (agg.B[:, :rank] * f).contiguous()
