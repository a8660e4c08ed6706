"""The public ops of kseed_kernels: argument checking, then one call into the chosen backend.

Every function here validates its inputs and raises TypeError / ValueError with a message that names the
argument and the problem.  Backends (kseed_kernels.backends) only ever see normalised inputs.
"""
from __future__ import annotations

import hashlib
import numbers
from typing import Sequence

import numpy as np
import torch

from . import _spec as S
from . import backends as _backends
from ._ieee import ieee_subnormals

FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
ROUNDINGS = ("nearest", "stochastic")
NOISES = S.NOISES
_U64 = 1 << 64
_U32 = 1 << 32
# Element indices must fit a signed 64-bit integer in every kernel.
MAX_INDEX = 1 << 62
# The smallest normal float32: a coefficient below it rounds to a float32 subnormal (or zero).
_F32_TINY = 2.0 ** -126


# ------------------------------------------------------------------------------------ helpers
def stream_id(name: str) -> int:
    """The stream id of a parameter name: the first 4 bytes of SHA-256(UTF-8 name), little-endian.

    A pure function of the name, the same in every process and on every machine.
    """
    if not isinstance(name, str):
        raise TypeError(f"stream_id: name must be a str, got {type(name).__name__}")
    return int.from_bytes(hashlib.sha256(name.encode("utf-8")).digest()[:4], "little")


def backends() -> list:
    """Names of the backends usable in this process, e.g. ["reference", "cpu"]."""
    return _backends.usable()


def _check_uint(name: str, value, bound: int, what: str) -> int:
    if isinstance(value, torch.Tensor):
        if value.numel() != 1 or value.dtype.is_floating_point or value.dtype == torch.bool:
            raise TypeError(f"{name} must be an integer, got a {value.dtype} tensor of shape "
                            f"{tuple(value.shape)}")
        value = value.item()
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an integer, got {type(value).__name__} {value!r}")
    value = int(value)
    if not 0 <= value < bound:
        raise ValueError(f"{name} must be in {what}, got {value}")
    return value


def _check_stream(stream) -> int:
    return _check_uint("stream", stream, _U32, "[0, 2^32)")


def _seed_value(seed, name: str = "seed") -> int:
    """One seed as its uint64 value (an int): the one rule for every seed kseed takes.

    A Python int must be in [0, 2^64); a value read from an int64 tensor or array (a 1-element torch
    tensor, a numpy int64 scalar) stands for its uint64 bits, as in an int64 seeds tensor; other integer
    dtypes must hold a value >= 0."""
    bits = False
    if isinstance(seed, torch.Tensor):
        if seed.numel() != 1 or seed.dtype.is_floating_point or seed.dtype.is_complex or \
                seed.dtype == torch.bool:
            raise TypeError(f"{name} must be an integer, got a {seed.dtype} tensor of shape "
                            f"{tuple(seed.shape)}")
        bits = seed.dtype == torch.int64
        seed = seed.item()
    elif isinstance(seed, np.integer):
        bits = seed.dtype == np.int64
    if isinstance(seed, (bool, np.bool_)) or not isinstance(seed, numbers.Integral):
        raise TypeError(f"{name} must be an int, got {type(seed).__name__} {seed!r}")
    seed = int(seed)
    if bits and seed < 0:
        seed += _U64
    if not 0 <= seed < _U64:
        raise ValueError(f"{name} = {seed} is outside [0, 2^64)")
    return seed


def _check_seed(seed) -> int:
    return _seed_value(seed)


def normalize_seeds(seeds) -> torch.Tensor:
    """seeds -> int64 CPU tensor [K] of uint64 bit patterns (an int64 tensor's bits are kept as is)."""
    if isinstance(seeds, torch.Tensor):
        if seeds.dtype.is_floating_point or seeds.dtype.is_complex or seeds.dtype == torch.bool:
            raise TypeError(f"seeds must be integers, got a {seeds.dtype} tensor")
        if seeds.layout != torch.strided:
            raise TypeError(f"seeds must be a dense (strided) tensor, got a {seeds.layout} tensor")
        if seeds.dim() != 1:
            raise ValueError(f"seeds must be 1-d [K], got shape {tuple(seeds.shape)}")
        seeds = seeds.detach().cpu()
        if seeds.dtype == torch.int64:
            return seeds.contiguous()
        if seeds.dtype == torch.uint64:
            return seeds.view(torch.int64).contiguous()
        if seeds.numel() and int(seeds.min()) < 0:
            raise ValueError("seeds must be in [0, 2^64); a negative seed was given in a "
                             f"{seeds.dtype} tensor")
        return seeds.to(torch.int64).contiguous()
    if isinstance(seeds, np.ndarray):
        if seeds.ndim != 1:
            raise ValueError(f"seeds must be 1-d [K], got shape {seeds.shape}")
        if seeds.dtype in (np.uint64, np.int64):  # uint64 bits, as an int64 torch tensor's
            return torch.from_numpy(seeds.view(np.int64).copy())
        seeds = list(seeds)
    if isinstance(seeds, (str, bytes)) or not isinstance(seeds, Sequence):
        raise TypeError(f"seeds must be an integer tensor or a sequence of ints, got "
                        f"{type(seeds).__name__}")
    out = []
    for i, s in enumerate(seeds):
        if isinstance(s, (list, tuple)):
            raise ValueError("seeds must be 1-d [K]; element %d is a sequence" % i)
        s = _seed_value(s, f"seeds[{i}]")
        out.append(s - _U64 if s >= (1 << 63) else s)
    return torch.tensor(out, dtype=torch.int64)


def normalize_coefs(coefs, k: int) -> torch.Tensor:
    """coefs -> finite float32 CPU tensor [K] (rounded to nearest float32)."""
    if isinstance(coefs, torch.Tensor):
        if not coefs.dtype.is_floating_point:
            raise TypeError(f"coefs must be a floating-point tensor, got {coefs.dtype}")
        if coefs.layout != torch.strided:
            raise TypeError(f"coefs must be a dense (strided) tensor, got a {coefs.layout} tensor")
        if coefs.dim() != 1:
            raise ValueError(f"coefs must be 1-d [K], got shape {tuple(coefs.shape)}")
        c = coefs.detach().cpu()
        if c.dtype == torch.float64:  # a rounding to float32 that flush-to-zero would change
            with ieee_subnormals():
                c = c.to(torch.float32)
        c = c.to(torch.float32).contiguous()
    else:
        if isinstance(coefs, np.ndarray):
            if coefs.ndim != 1:
                raise ValueError(f"coefs must be 1-d [K], got shape {coefs.shape}")
            coefs = coefs.tolist()
        if isinstance(coefs, (str, bytes)) or not isinstance(coefs, Sequence):
            raise TypeError(f"coefs must be a float tensor or a sequence of numbers, got "
                            f"{type(coefs).__name__}")
        fl = []
        tiny = False  # a coefficient that rounds to a float32 subnormal
        for i, c in enumerate(coefs):
            if isinstance(c, (bool, np.bool_)) or not isinstance(c, numbers.Real):
                raise TypeError(f"coefs[{i}] must be a real number, got {type(c).__name__} {c!r}")
            try:
                f = float(c)
            except OverflowError:
                raise ValueError(f"coefs must be finite (after rounding to float32); coefs[{i}] is "
                                 "an integer too large for a float") from None
            tiny = tiny or 0.0 < abs(f) < _F32_TINY
            fl.append(f)
        if tiny:  # rounded with subnormals kept, whatever the flush-to-zero mode
            with ieee_subnormals():
                c = torch.tensor(fl, dtype=torch.float32)
        else:
            c = torch.tensor(fl, dtype=torch.float32)
    if c.numel() != k:
        raise ValueError(f"seeds and coefs must have the same length, got {k} seeds and "
                         f"{c.numel()} coefs")
    if k and not bool(torch.isfinite(c).all()):
        bad = int((~torch.isfinite(c)).nonzero()[0])
        raise ValueError(f"coefs must be finite (after rounding to float32); coefs[{bad}] = "
                         f"{c[bad].item()}")
    return c


def _check_rounding(rounding) -> str:
    if rounding not in ROUNDINGS:
        raise ValueError(f"rounding must be one of {ROUNDINGS}, got {rounding!r}")
    return rounding


def _check_tensor(t, what: str = "tensor") -> torch.Tensor:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{what} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{what} must be float32, bfloat16 or float16, got {t.dtype}")
    if t.layout != torch.strided:
        raise TypeError(f"{what} must be a dense (strided) tensor, got a {t.layout} tensor")
    return t


def _check_writable(t: torch.Tensor, what: str) -> None:
    """A tensor the op writes.  kseed follows torch's rules for in-place ops: an inference tensor (made
    under torch.inference_mode) is written only inside inference mode, on every backend, and no two of
    its elements may share memory (an expanded tensor)."""
    if _overlaps_itself(t):
        raise ValueError(f"{what} has elements that share memory (an expanded or stride-0 view); it "
                         "cannot be written in place: clone it first")
    if t.is_inference() and not torch.is_inference_mode_enabled():
        raise ValueError(f"{what} is an inference tensor (made under torch.inference_mode); it can be "
                         "written only inside torch.inference_mode(), as torch's in-place ops require; "
                         "clone it first or call inside inference_mode")


def _span(t: torch.Tensor):
    """(storage address, first byte, end byte) of the memory a tensor's elements may occupy."""
    es = t.element_size()
    lo = hi = t.storage_offset()
    for n, st in zip(t.shape, t.stride()):
        if st > 0:
            hi += (n - 1) * st
        else:
            lo += (n - 1) * st
    return t.untyped_storage().data_ptr(), lo * es, (hi + 1) * es


# Overlap checks enumerate at most this many elements (both tensors together) before giving up and
# refusing (only views that interleave in ways no modulus separates get there).
_ENUMERATE_MAX = 1 << 22


def _byte_dims(t: torch.Tensor) -> list:
    """[(size, byte stride)] of the dims of t that have more than one element, largest stride first."""
    es = t.element_size()
    return sorted(((n, st * es) for n, st in zip(t.shape, t.stride()) if n > 1),
                  key=lambda d: -d[1])


def _byte_starts(t: torch.Tensor) -> torch.Tensor:
    """int64 tensor of the first byte (in its storage) of every element of t."""
    es = t.element_size()
    offs = torch.tensor([t.storage_offset() * es], dtype=torch.int64)
    for n, st in _byte_dims(t):
        offs = (offs.unsqueeze(-1) + torch.arange(n, dtype=torch.int64) * st).reshape(-1)
    return offs


def _residues_disjoint(a: torch.Tensor, b: torch.Tensor) -> bool:
    """True if some modulus m (one of the two tensors' byte strides) proves that a and b share no byte:
    modulo m, the dims whose stride m divides add nothing, so every byte of a lies in the cyclic
    interval [off_a, off_a + E_a] (E_a: the reach of the other dims plus the element's bytes), and the
    two intervals do not meet.  Column blocks (m = the row stride) and interleaved views such as
    w[:, 0::2] and w[:, 1::2] (m = 2 elements) are separated this way in O(dims^2)."""
    da, db = _byte_dims(a), _byte_dims(b)
    oa, ob = a.storage_offset() * a.element_size(), b.storage_offset() * b.element_size()
    for m in {st for _, st in da + db if st > 1}:
        ea = sum((n - 1) * st for n, st in da if st % m) + a.element_size() - 1
        eb = sum((n - 1) * st for n, st in db if st % m) + b.element_size() - 1
        d = (ob - oa) % m
        if d > ea and m - d > eb:
            return True
    return False


def _share_bytes(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Whether two tensors of one storage whose byte spans meet share a byte.  Exact: a modulus test
    first, then (up to _ENUMERATE_MAX elements) the elements themselves; past that, True (refused)."""
    if _residues_disjoint(a, b):
        return False
    if a.numel() + b.numel() > _ENUMERATE_MAX:
        return True
    sa, _ = torch.sort(_byte_starts(a))
    sb = _byte_starts(b)
    # the last element of a that starts before each element of b ends, and whether it reaches b
    i = torch.searchsorted(sa, sb + b.element_size()) - 1
    ok = i >= 0
    return bool((sa[i.clamp(min=0)][ok] + a.element_size() > sb[ok]).any())


def _overlaps_itself(t: torch.Tensor) -> bool:
    """Whether two elements of t share memory (an expanded tensor, stride 0, or an as_strided view)."""
    if t.is_contiguous() or t.numel() < 2:
        return False
    dims = _byte_dims(t)
    reach = t.element_size()  # bytes spanned by the dims of smaller strides
    for n, st in reversed(dims):
        if st < reach:
            break
        reach += (n - 1) * st
    else:
        return False  # each stride clears everything below it: separable, no two elements meet
    if any(st == 0 for _, st in dims):
        return True
    if t.numel() > _ENUMERATE_MAX:
        return True
    starts, _ = torch.sort(_byte_starts(t))
    return bool((starts[1:] - starts[:-1] < t.element_size()).any())


def _check_no_overlap(written, read=(), hint="a tensor an op writes must not share memory with any "
                      "other tensor of the call") -> None:
    """ValueError if a written (name, tensor) shares memory with another written one or a read one.
    Exact for strided views: byte spans first, then the elements of views whose spans meet."""
    by_storage: dict = {}
    for is_written, items in ((True, written), (False, read)):
        for name, t in items:
            if t.numel():
                ptr, lo, hi = _span(t)
                by_storage.setdefault((t.device, ptr), []).append((lo, hi, is_written, name, t))
    for spans in by_storage.values():
        spans.sort(key=lambda x: x[:2])
        for a in range(len(spans)):
            for b in range(a + 1, len(spans)):
                if spans[b][0] >= spans[a][1]:
                    break
                if (spans[a][2] or spans[b][2]) and _share_bytes(spans[a][4], spans[b][4]):
                    raise ValueError(f"{spans[a][3]} and {spans[b][3]} overlap in memory; {hint}")


def _sr_key(seeds: torch.Tensor, coefs: torch.Tensor, rounding: str, dtypes) -> int:
    if rounding != "stochastic" or all(d == torch.float32 for d in dtypes):
        return 0
    return S.sr_key(seeds.numpy().view(np.uint64), coefs.numpy().view(np.uint32))


def _check_noise(noise) -> str:
    if not isinstance(noise, str) or noise not in NOISES:
        raise ValueError(f"noise must be one of {NOISES}, got {noise!r}")
    return noise


def _update(seeds, coefs, rounding, noise) -> tuple:
    """The checked seeds, coefs, rounding and noise of an apply call: (seeds, coefs, rounding, noise)."""
    rounding = _check_rounding(rounding)
    s = normalize_seeds(seeds)
    c = normalize_coefs(coefs, s.numel())
    return s, c, rounding, _check_noise(noise)


def _run(mod, outs, streams, seeds, coefs, rounding, bases=None, noise="gaussian") -> None:
    """mod.apply on the non-empty tensors, through contiguous copies where a tensor is not contiguous
    (element i is always the row-major index); results are copied back into such outs.  K = 0: nothing
    in place, a copy of each base out of place."""
    keep = [i for i, o in enumerate(outs) if o.numel()]
    if not keep or seeds.numel() == 0:
        if bases is not None:
            with torch.no_grad():
                for i in keep:
                    outs[i].copy_(bases[i])
        return
    upd = _backends.Update(seeds, coefs, rounding,
                           _sr_key(seeds, coefs, rounding, [outs[i].dtype for i in keep]), noise)
    with torch.no_grad():
        work = [outs[i] if outs[i].is_contiguous() else outs[i].contiguous() if bases is None
                else torch.empty_like(outs[i], memory_format=torch.contiguous_format) for i in keep]
        src = None if bases is None else [bases[i].contiguous() for i in keep]
        mod.apply(work, [streams[i] for i in keep], upd, src)
        for i, w in zip(keep, work):
            if w is not outs[i]:
                outs[i].copy_(w)


def _check_sequence(x, name: str, what: str) -> list:
    if isinstance(x, (torch.Tensor, str, bytes)) or not isinstance(x, Sequence):
        raise TypeError(f"{name} must be a sequence of {what}")
    return list(x)


def _check_tensors(x, name: str):
    """A sequence of float tensors: (the list, the names "name[i]" for messages)."""
    ts = _check_sequence(x, name, "tensors")
    names = [f"{name}[{i}]" for i in range(len(ts))]
    for t, n in zip(ts, names):
        _check_tensor(t, n)
    return ts, names


def _check_streams(streams, n: int, of: str) -> list:
    streams = _check_sequence(streams, "streams", "ints")
    if len(streams) != n:
        raise ValueError(f"{of} and streams must have the same length, got {n} {of} and "
                         f"{len(streams)} streams")
    return [_check_uint(f"streams[{i}]", x, _U32, "[0, 2^32)") for i, x in enumerate(streams)]


def _one_device(tensors) -> None:
    devices = {t.device for t in tensors}
    if len(devices) > 1:
        raise ValueError(f"all tensors must be on one device, got {sorted(map(str, devices))}")


def _outs_for(bases, outs, base_names, out_names) -> list:
    """outs (checked against their bases: dtype, shape, device, writable) or fresh contiguous ones."""
    if outs is None:
        return [torch.empty_like(b, memory_format=torch.contiguous_format) for b in bases]
    for b, o, bn, on in zip(bases, outs, base_names, out_names):
        _check_tensor(o, on)
        if o.dtype != b.dtype:
            raise TypeError(f"{on} must have the dtype of {bn}, got {o.dtype} and {b.dtype}")
        if o.shape != b.shape:
            raise ValueError(f"{on} must have the shape of {bn}, got {tuple(o.shape)} and "
                             f"{tuple(b.shape)}")
        if o.device != b.device:
            raise ValueError(f"{on} must be on the device of {bn}, got {o.device} and {b.device}")
        _check_writable(o, on)
    _check_no_overlap(list(zip(out_names, outs)), list(zip(base_names, bases)))
    return list(outs)


# --------------------------------------------------------------------------------------- ops
def philox4x32_10(counter: torch.Tensor, key: torch.Tensor) -> torch.Tensor:
    """Philox4x32-10 of counter [..., 4] and key [..., 2] (int64 tensors of uint32 values).

    Returns an int64 tensor [..., 4] of the uint32 outputs.  Shapes broadcast over the leading dims.
    """
    for name, x, last in (("counter", counter, 4), ("key", key, 2)):
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
        if x.dtype != torch.int64:
            raise TypeError(f"{name} must be an int64 tensor, got {x.dtype}")
        if x.dim() == 0 or x.shape[-1] != last:
            raise ValueError(f"{name} must have shape [..., {last}], got {tuple(x.shape)}")
        if x.numel() and (int(x.min()) < 0 or int(x.max()) >= _U32):
            raise ValueError(f"{name} must hold uint32 values in [0, 2^32)")
    if counter.device != key.device:
        raise ValueError(f"counter and key must be on one device, got {counter.device} and "
                         f"{key.device}")
    lead = torch.broadcast_shapes(counter.shape[:-1], key.shape[:-1])
    c = counter.expand(*lead, 4).contiguous()
    k = key.expand(*lead, 2).contiguous()
    if c.device.type == "cpu" and "cpu" in backends():
        return torch.ops.kseed.philox4x32_10(c, k)
    from . import torch_reference

    return torch_reference.philox4x32_10(c, k)


def _noise_args(seed, numel, stream, offset, device, backend):
    """The checked arguments of gaussian / rademacher: (backend module, seed, numel, stream, offset,
    device)."""
    seed = _check_seed(seed)
    if isinstance(numel, (bool, np.bool_)) or not isinstance(numel, numbers.Integral):
        raise TypeError(f"numel must be an int, got {type(numel).__name__} {numel!r}")
    if numel < 0:
        raise ValueError(f"numel must be >= 0, got {numel}")
    stream = _check_stream(stream)
    offset = _check_uint("offset", offset, MAX_INDEX, "[0, 2^62)")
    if offset + numel > MAX_INDEX:
        raise ValueError(f"offset + numel must be <= 2^62, got {offset + numel}")
    device = torch.device("cpu") if device is None else torch.device(device)
    return _backends.pick(device, backend), seed, int(numel), stream, offset, device


def gaussian(seed, numel, *, stream=0, offset=0, device=None, backend=None) -> torch.Tensor:
    """float32 tensor [numel] whose element j is z(seed, stream, offset + j) (docs/SPEC.md)."""
    mod, *args = _noise_args(seed, numel, stream, offset, device, backend)
    return mod.gaussian(*args)


def rademacher(seed, numel, *, stream=0, offset=0, device=None, backend=None) -> torch.Tensor:
    """float32 tensor [numel] of +-1.0 whose element j is r(seed, stream, offset + j) (docs/SPEC.md
    section 8)."""
    mod, *args = _noise_args(seed, numel, stream, offset, device, backend)
    return mod.rademacher(*args)


def apply_seeds_(tensor, seeds, coefs, *, stream=0, backend=None, rounding="nearest",
                 noise="gaussian"):
    """In place: tensor <- round(float32(tensor) + sum_k coefs[k] * n(seeds[k], stream, i)).

    ``noise``: "gaussian" (n = z, the default) or "rademacher" (n = r in {-1, +1}, docs/SPEC.md
    section 8: each term is an exact sign flip of coefs[k] and one add).

    The sum runs in float32 in ascending k; the result is rounded once to the tensor's dtype, to
    nearest even or (bf16 / fp16, rounding="stochastic") stochastically with Philox bits.  Works on any
    float32 / bf16 / fp16 tensor; element i is the row-major index, so non-contiguous tensors are
    handled through a contiguous copy.  K = 0 is a no-op.  An inference tensor is written only inside
    torch.inference_mode (ValueError otherwise), as torch's in-place ops require.  Returns ``tensor``.
    """
    _check_tensor(tensor)
    stream = _check_stream(stream)
    s, c, rounding, noise = _update(seeds, coefs, rounding, noise)
    _check_writable(tensor, "tensor")
    _run(_backends.pick(tensor.device, backend), [tensor], [stream], s, c, rounding, noise=noise)
    return tensor


def apply_seeds_multi_(tensors, streams, seeds, coefs, *, backend=None, rounding="nearest",
                       noise="gaussian"):
    """apply_seeds_ on every tensor of a list, each with its own stream id, in one (or a few) launches.

    ``tensors``: a sequence of float32 / bf16 / fp16 tensors on one device, none sharing memory with
    another; ``streams``: one stream id per tensor.  Returns ``tensors``.
    """
    ts, names = _check_tensors(tensors, "tensors")
    st = _check_streams(streams, len(ts), "tensors")
    s, c, rounding, noise = _update(seeds, coefs, rounding, noise)
    if not ts:
        return tensors
    _one_device(ts)
    for t, name in zip(ts, names):
        _check_writable(t, name)
    _check_no_overlap(list(zip(names, ts)), hint="list each tensor once")
    _run(_backends.pick(ts[0].device, backend), ts, st, s, c, rounding, noise=noise)
    return tensors


def apply_seeds(base, seeds, coefs, *, out=None, stream=0, backend=None, rounding="nearest",
                noise="gaussian"):
    """Out of place: out <- round(float32(base) + sum_k coefs[k] * n(seeds[k], stream, i)).

    Bitwise what ``out.copy_(base); apply_seeds_(out, ...)`` gives, in one pass: base is only read (each
    element once) and out written once.  ``out``: a tensor of base's shape, dtype and device that shares
    no memory with base, or None for a fresh contiguous one.  K = 0 copies base.  Returns ``out``.
    """
    _check_tensor(base, "base")
    stream = _check_stream(stream)
    s, c, rounding, noise = _update(seeds, coefs, rounding, noise)
    (out,) = _outs_for([base], None if out is None else [out], ["base"], ["out"])
    _run(_backends.pick(base.device, backend), [out], [stream], s, c, rounding, bases=[base],
         noise=noise)
    return out


def apply_seeds_multi(bases, streams, seeds, coefs, *, outs=None, backend=None, rounding="nearest",
                      noise="gaussian"):
    """apply_seeds on every base of a list into its out, each with its own stream id, in one (or a few)
    launches.  ``outs``: a sequence of tensors matching ``bases`` (no out sharing memory with any base
    or other out), or None for fresh contiguous ones.  Returns the outs (a list)."""
    bs, bnames = _check_tensors(bases, "bases")
    st = _check_streams(streams, len(bs), "bases")
    s, c, rounding, noise = _update(seeds, coefs, rounding, noise)
    if outs is not None:
        outs = _check_sequence(outs, "outs", "tensors")
        if len(outs) != len(bs):
            raise ValueError(f"bases and outs must have the same length, got {len(bs)} bases and "
                             f"{len(outs)} outs")
    if bs:
        _one_device(bs)
    os_ = _outs_for(bs, outs, bnames, [f"outs[{i}]" for i in range(len(bs))])
    if not bs:
        return os_
    _run(_backends.pick(bs[0].device, backend), os_, st, s, c, rounding, bases=bs, noise=noise)
    return os_


def _project(ts, streams, seeds, noise, backend, device) -> torch.Tensor:
    """project_seeds_multi on checked inputs: the non-empty tensors go to the backend (through
    contiguous copies where not contiguous: element i is the row-major index); K = 0 or no elements
    give an empty result or +0.0 for every seed, without a backend call."""
    mod = _backends.pick(device, backend)
    keep = [(t, st) for t, st in zip(ts, streams) if t.numel()]
    if seeds.numel() == 0 or not keep:
        return torch.zeros(seeds.numel(), dtype=torch.float32, device=device)
    with torch.no_grad():
        work = [t.detach() if t.is_contiguous() else t.detach().contiguous() for t, _ in keep]
        return mod.project(work, [st for _, st in keep], seeds, noise)


def project_seeds(tensor, seeds, *, stream=0, noise="gaussian", backend=None) -> torch.Tensor:
    """The transpose of apply: float32 [K] with c_k = sum_i x_i * n(seeds[k], stream, i), n the
    ``noise`` family, x the tensor read as float32 (float32, bf16 or fp16, any strides; i the row-major
    index), on the tensor's device.

    The sum runs in the fixed order of docs/SPEC.md section 9 (float32 lanes within blocks of 2048
    elements, the block sums in float64), so every backend, on any number of threads, returns the same
    bits.  ``seeds`` as for apply_seeds_ (ints in [0, 2^64) or an int64 tensor read as uint64 bits).
    The tensor is only read; it may be an inference tensor.  K = 0 gives an empty tensor."""
    _check_tensor(tensor)
    stream = _check_stream(stream)
    s = normalize_seeds(seeds)
    noise = _check_noise(noise)
    return _project([tensor], [stream], s, noise, backend, tensor.device)


def project_seeds_multi(tensors, streams, seeds, *, noise="gaussian", backend=None) -> torch.Tensor:
    """project_seeds over a list of tensors, each with its own stream id: float32 [K], the float64 sum
    of every tensor's block sums in list order (docs/SPEC.md section 9.2), rounded once to float32.

    ``tensors``: a sequence of float32 / bf16 / fp16 tensors on one device (they may share memory: they
    are only read); ``streams``: one stream id per tensor.  An empty list gives +0.0 for every seed (on
    the CPU)."""
    ts, _ = _check_tensors(tensors, "tensors")
    st = _check_streams(streams, len(ts), "tensors")
    s = normalize_seeds(seeds)
    noise = _check_noise(noise)
    if ts:
        _one_device(ts)
    return _project(ts, st, s, noise, backend, ts[0].device if ts else torch.device("cpu"))
