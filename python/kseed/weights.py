"""Where the pristine weights w0 and the per-round snapshot live: file-backed memory maps, never
anonymous memory (issue #11).

* ``host_w0(model, ms, ...)``: w0 of a ModelSeeds' tensors, on the host.
  - **the model's own safetensors**, mapped copy-on-write (the pages are page cache; nothing is ever
    written back), when every trainable tensor is stored there in the run dtype, at an aligned offset,
    bitwise equal to what was loaded;
  - else (another run dtype, a pickle ``.bin`` model, a tensor transformers converted while loading)
    **a cache file** ``<cache>/w0/<model hash>-<dtype>.safetensors``, written once (atomically) from the
    loaded model and mapped; a later run with the same model hash and dtype maps it again after checking
    it bitwise against the loaded model (a mismatch rewrites it);
  - a model that did not come from ``kseed.modeling.load_model`` (built in memory): an unlinked file.
* ``FileBuffer``: tensors in an unlinked file (a shared map: page cache, freed with the object), for the
  simulation's per-round snapshot.
Where no file can be written (the cache folder is not writable or its disk is full) these fall back to
private memory with a logged warning: the run works, with the model's size more memory.

``<cache>`` is $KSEED_CACHE, else $XDG_CACHE_HOME/kseed, else ~/.cache/kseed.  Keep it on a disk: the
pages of a file on tmpfs count as shared memory (RssShmem), which is what this module avoids.  Cache
files are never deleted by kseed; deleting the folder is always safe (the next run rewrites what it
needs).
"""
from __future__ import annotations

import json
import logging
import os
import struct
import tempfile
from typing import Dict, List, Optional, Sequence, Tuple

import torch

from .rundir import atomic_file

log = logging.getLogger("kseed")

ST_DTYPES = {"F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16}
ST_NAMES = {v: k for k, v in ST_DTYPES.items()}
_INT_VIEW = {torch.float32: torch.int32, torch.bfloat16: torch.int16, torch.float16: torch.int16}
CACHE_FORMAT = "kseed-w0/1"
_ALIGN = 64
_CHUNK = 1 << 22  # elements per chunk of the checks (isfinite: about 6 bytes of temporaries each)


class ModelError(ValueError):
    """A model directory that cannot be used (the message names the problem)."""


# ------------------------------------------------------------------------------- locations
def cache_dir() -> str:
    """The model-independent kseed cache: $KSEED_CACHE, $XDG_CACHE_HOME/kseed or ~/.cache/kseed."""
    d = os.environ.get("KSEED_CACHE")
    if not d:
        base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
        d = os.path.join(base, "kseed")
    return os.path.abspath(d)


def _fs_type(path: str) -> str:
    """The file-system type of the mount holding ``path`` ('' if unknown)."""
    best, kind = "", ""
    try:
        with open("/proc/mounts", encoding="utf-8") as f:
            for line in f:
                parts = line.split()
                if len(parts) >= 3:
                    mnt = parts[1].replace("\\040", " ")
                    if (path == mnt or path.startswith(mnt.rstrip("/") + "/")) and len(mnt) >= len(best):
                        best, kind = mnt, parts[2]
    except OSError:
        pass
    return kind


def _usable_dir(sub: str) -> str:
    d = os.path.join(cache_dir(), sub)
    try:
        os.makedirs(d, exist_ok=True)
    except OSError as exc:
        raise OSError(f"cannot create the kseed cache folder {d}: {exc.strerror}") from None
    if _fs_type(os.path.realpath(d)) in ("tmpfs", "ramfs"):
        log.warning("kseed cache %s is on %s: its memory maps count as shared memory; set KSEED_CACHE "
                    "to a directory on a disk", d, _fs_type(os.path.realpath(d)))
    return d


# ---------------------------------------------------------------------------- safetensors
def read_header(path: str) -> Tuple[dict, int]:
    """(header, offset of the data) of a safetensors file; ModelError if it is not one."""
    try:
        size = os.path.getsize(path)
        with open(path, "rb") as f:
            raw = f.read(8)
            if len(raw) < 8:
                raise ModelError(f"{path} is not a safetensors file (shorter than 8 bytes)")
            n = struct.unpack("<Q", raw)[0]
            if n > min(size - 8, 1 << 27):
                raise ModelError(f"{path} is not a safetensors file (header length {n})")
            header = json.loads(f.read(n).decode("utf-8"))
    except OSError as exc:
        raise ModelError(f"cannot read {path}: {exc}") from None
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise ModelError(f"{path} is not a safetensors file (its header is not JSON)") from None
    if not isinstance(header, dict):
        raise ModelError(f"{path} is not a safetensors file (its header is not a JSON object)")
    start = 8 + n
    for name, e in header.items():
        if name == "__metadata__":
            continue
        try:
            a, b = (int(x) for x in e["data_offsets"])
            ok = 0 <= a <= b and start + b <= size and isinstance(e["shape"], list)
        except (KeyError, TypeError, ValueError):
            ok = False
        if not ok:
            raise ModelError(f"{path}: tensor {name!r} has a bad header entry (or the file is "
                             "truncated)")
    return header, start


def weight_files(path: str) -> List[str]:
    """The safetensors files of a model directory (sharded or not); [] when it has none."""
    index = os.path.join(path, "model.safetensors.index.json")
    if os.path.isfile(index):
        try:
            with open(index, encoding="utf-8") as f:
                wm = json.load(f)["weight_map"]
            return sorted({os.path.join(path, v) for v in wm.values()})
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise ModelError(f"cannot read {index}: {exc}") from None
    single = os.path.join(path, "model.safetensors")
    return [single] if os.path.isfile(single) else []


def map_safetensors(path: str) -> Dict[str, torch.Tensor]:
    """The tensors of a safetensors file as copy-on-write maps of it (read from the page cache; a write,
    which kseed never does, would go to private memory and leave the file alone).  Tensors of other
    dtypes than float32 / bf16 / fp16, and tensors at an offset not aligned to their element size, are
    left out."""
    header, start = read_header(path)
    size = os.path.getsize(path)
    out: Dict[str, torch.Tensor] = {}
    if size == 0:
        return out
    storage = torch.UntypedStorage.from_file(path, shared=False, nbytes=size)
    for name, e in header.items():
        if name == "__metadata__" or e.get("dtype") not in ST_DTYPES:
            continue
        dt = ST_DTYPES[e["dtype"]]
        item = torch.empty(0, dtype=dt).element_size()
        a, b = (int(x) for x in e["data_offsets"])
        shape = tuple(int(x) for x in e["shape"])
        numel = 1
        for d in shape:
            numel *= d
        if (start + a) % item or (b - a) != numel * item:
            continue
        t = torch.empty(0, dtype=dt)
        t.set_(storage, (start + a) // item, shape, _contiguous_strides(shape))
        out[name] = t
    return out


def _contiguous_strides(shape) -> Tuple[int, ...]:
    st, acc = [], 1
    for d in reversed(shape):
        st.append(acc)
        acc *= max(int(d), 1)
    return tuple(reversed(st))


def _aligned(n: int) -> int:
    return (n + _ALIGN - 1) // _ALIGN * _ALIGN


def write_safetensors(path: str, names: Sequence[str], tensors: Sequence[torch.Tensor],
                      metadata: Optional[dict] = None) -> None:
    """Write float tensors (on any device) as a safetensors file, atomically (``rundir.atomic_file``:
    temp file, fsync, rename, fsync the directory), one tensor at a time: the only extra memory is
    one tensor's host copy when it is on another device."""
    hdr: Dict[str, dict] = {}
    off = 0
    for n, t in zip(names, tensors):
        nb = t.numel() * t.element_size()
        hdr[n] = {"dtype": ST_NAMES[t.dtype], "shape": list(t.shape), "data_offsets": [off, off + nb]}
        off += nb
    if metadata:
        hdr["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
    raw = json.dumps(hdr, separators=(",", ":")).encode()
    raw += b" " * (-(8 + len(raw)) % 8)  # the data starts 8-byte aligned
    with atomic_file(path) as f:
        f.write(struct.pack("<Q", len(raw)) + raw)
        for t in tensors:
            t = t.detach().cpu().contiguous()
            if t.numel():
                f.write(t.view(-1).view(torch.uint8).numpy().data)


# ---------------------------------------------------------------------------------- checks
def bitwise_equal(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Bitwise equality of two float tensors of one dtype and shape, on any devices (what crosses
    devices goes in chunks of 4M elements)."""
    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    if a.numel() == 0:
        return True
    ia = a.detach().reshape(-1).view(_INT_VIEW[a.dtype])
    ib = b.detach().reshape(-1).view(_INT_VIEW[b.dtype])
    if ia.device == ib.device:
        return bool(torch.equal(ia, ib))
    for i in range(0, ia.numel(), _CHUNK):
        if not torch.equal(ia[i:i + _CHUNK], ib[i:i + _CHUNK].to(ia.device)):
            return False
    return True


def first_nonfinite(named: Sequence[Tuple[str, torch.Tensor]]) -> Optional[str]:
    """The name of the first floating-point tensor holding a NaN or an infinity, else None (checked in
    chunks: no tensor-sized temporary)."""
    for name, t in named:
        if not t.is_floating_point() or t.numel() == 0:
            continue
        flat = t.detach().reshape(-1)
        for i in range(0, flat.numel(), _CHUNK):
            if not bool(torch.isfinite(flat[i:i + _CHUNK]).all()):
                return name
    return None


# ------------------------------------------------------------------------------ FileBuffer
class FileBuffer:
    """Host tensors shaped like ``like`` (same dtypes), stored in an unlinked file of the kseed cache
    (a shared map: the pages are page cache, written back to the disk when the kernel likes, never
    anonymous memory).  The file has no name once created, so nothing is left behind."""

    def __init__(self, like: Sequence[torch.Tensor]):
        offs, total = [], 0
        for t in like:
            total = _aligned(total)
            offs.append(total)
            total += t.numel() * t.element_size()
        total = max(_aligned(total), _ALIGN)
        fd, path = tempfile.mkstemp(prefix=".buffer-", dir=_usable_dir("tmp"))
        try:
            try:
                os.posix_fallocate(fd, 0, total)  # no SIGBUS later on a full disk: fail here
            except OSError as exc:
                raise OSError(f"cannot reserve {total / 2**30:.2f} GiB in {os.path.dirname(path)} "
                              f"({exc.strerror}); set KSEED_CACHE to a disk with room") from None
            storage = torch.UntypedStorage.from_file(path, shared=True, nbytes=total)
        finally:
            os.close(fd)
            os.unlink(path)
        self.nbytes = total
        self.tensors: List[torch.Tensor] = []
        for t, o in zip(like, offs):
            x = torch.empty(0, dtype=t.dtype)
            item = x.element_size()
            x.set_(storage, o // item, tuple(t.shape), _contiguous_strides(t.shape))
            self.tensors.append(x)

    @torch.no_grad()
    def copy_from(self, tensors: Sequence[torch.Tensor]) -> None:
        for dst, src in zip(self.tensors, tensors):
            dst.copy_(src)


class MemoryBuffer:
    """FileBuffer's stand-in in private host memory, for when no file can be made (with a warning)."""

    def __init__(self, like: Sequence[torch.Tensor]):
        self.tensors = [torch.empty(tuple(t.shape), dtype=t.dtype) for t in like]
        self.nbytes = sum(t.numel() * t.element_size() for t in like)

    copy_from = FileBuffer.copy_from


def host_buffer(like: Sequence[torch.Tensor], what: str):
    """A FileBuffer shaped like ``like``; if the cache cannot hold one (no room, not writable), a
    MemoryBuffer and a warning that names ``what``."""
    try:
        return FileBuffer(like)
    except OSError as exc:
        log.warning("%s kept in private memory (%s): the peak memory grows by the model's size",
                    what, exc)
        return MemoryBuffer(like)


# ------------------------------------------------------------------------------------- w0
def _mapped_from_files(files: Sequence[str], aliases: Sequence[Sequence[str]],
                       params: Sequence[torch.Tensor]) -> Tuple[Optional[List[torch.Tensor]], str]:
    """The model files' tensors for every param, or (None, why not)."""
    table: Dict[str, torch.Tensor] = {}
    for f in files:
        table.update(map_safetensors(f))
    out = []
    for names, p in zip(aliases, params):
        t = next((table[n] for n in names if n in table), None)
        if t is None:
            return None, f"{names[0]} is not stored as a mappable {p.dtype} tensor"
        if t.dtype != p.dtype or t.shape != p.shape:
            return None, f"{names[0]} is stored as {t.dtype} {tuple(t.shape)}"
        if not bitwise_equal(p, t):
            return None, f"{names[0]} as loaded differs from the file"
        out.append(t)
    return out, "model file"


def _cached(names: Sequence[str], params: Sequence[torch.Tensor], key: str,
            ) -> Tuple[List[torch.Tensor], str]:
    dtype = params[0].dtype
    path = os.path.join(_usable_dir("w0"), f"{key}-{ST_NAMES.get(dtype, 'X').lower()}.safetensors")
    if os.path.isfile(path):
        try:
            table = map_safetensors(path)
            got = [table.get(n) for n in names]
            if all(t is not None and bitwise_equal(p, t) for t, p in zip(got, params)):
                return got, path
        except (ModelError, OSError, RuntimeError):
            pass
        log.info("rewriting the w0 cache file %s (it does not match the loaded model)", path)
    write_safetensors(path, names, params, {"format": CACHE_FORMAT, "key": key})
    table = map_safetensors(path)
    return [table[n] for n in names], path


def host_w0(model: torch.nn.Module, ms, *, key: Optional[str] = None,
            source: Optional[str] = None) -> Tuple[List[torch.Tensor], str]:
    """(w0 for each of ``ms.params``, on the host and bitwise equal to them now; where it lives: "model
    file", the cache file's path, "temporary file" or, if no file could be written, "memory").

    ``source``: the model directory the weights were loaded from (None: an in-memory model);
    ``key``: the model's hash (names the cache file; computed if not given)."""
    params = list(ms.params)
    if source is not None:
        files = weight_files(source)
        by_ptr: Dict[tuple, List[str]] = {}
        for n, p in model.named_parameters(remove_duplicate=False):
            by_ptr.setdefault((p.device, p.data_ptr()), []).append(n)
        aliases = [[n] + [a for a in by_ptr.get((p.device, p.data_ptr()), []) if a != n]
                   for n, p in zip(ms.names, params)]
        why = "the model has no safetensors file"
        if files:
            got, why = _mapped_from_files(files, aliases, params)
            if got is not None:
                return got, "model file"
        log.info("w0 goes to the kseed cache: %s", why)
        if key is None:
            from .modeling import model_hash
            key = model_hash(model)
        try:
            return _cached(ms.names, params, key[:32])
        except OSError as exc:
            log.warning("cannot write the w0 cache file: %s", exc)
    buf = host_buffer(params, "w0")
    buf.copy_from(params)
    return buf.tensors, "temporary file" if isinstance(buf, FileBuffer) else "memory"
