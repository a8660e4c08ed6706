"""The run directory: the one writer of a run's files, whatever the engine.

Layout (``--out DIR`` of kseed-fed, ``out`` of the Flower ServerApp):
  metrics.jsonl     one strict-JSON object per round (round 0 = the base model's evaluation), appended
                    and fsync'd as each round completes
  checkpoint.json   the server's state + run config + base-model identity + data identity, with a
                    SHA-256 checksum, atomically replaced after each round
  summary.json      the final numbers (strict JSON)
  loss.png, bytes.png
  history.bin       the seed history, for the methods whose global model is one (kseed.history)

A RunDir holds an exclusive lock on the directory (``flock`` on the directory itself, so no lock file
is left behind) for as long as it is open: a second run on the same directory is refused at once.  A
fresh run refuses a directory that already holds a run's files (it never truncates them); a resumed
run needs the checkpoint.  Every file is written atomically (temp file in the directory, fsync,
``os.replace``, fsync the directory) with the modes ``open()`` would give (0666 less the umask).  A
run that fails before its first checkpoint leaves nothing behind: not its files, not the directories
it created.  Rows and the summary are strict JSON: a non-finite float is written as null.
"""
from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import io
import json
import logging
import math
import os
import secrets
from typing import IO, Iterator, List, Optional

import numpy as np

from .config import FedConfig

CHECKPOINT = "checkpoint.json"
METRICS = "metrics.jsonl"
SUMMARY = "summary.json"
PLOTS = ("loss.png", "bytes.png")
HISTORY = "history.bin"  # the seed history of the methods that keep one (kseed.history)
RUN_FILES = (CHECKPOINT, METRICS, SUMMARY) + PLOTS + (HISTORY,)
CKPT_FORMAT = "kseed-run/1"
TMP_PREFIX = ".tmp-"
log = logging.getLogger("kseed.rundir")


class CheckpointError(ValueError):
    """A checkpoint that is missing, corrupt, or from another run, base model or data."""


class RunDirError(ValueError):
    """A run directory that cannot be used now: another run holds it, or it holds another run."""


# ------------------------------------------------------------------------------ strict JSON
def strict(obj):
    """``obj`` with every non-finite float (NaN, inf) replaced by None, recursively: what JSON can
    hold.  The one place where kseed turns NaN into null."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: strict(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [strict(v) for v in obj]
    return obj


def dumps(obj, **kw) -> str:
    """Strict JSON text of ``obj`` (non-finite floats as null; never a bare NaN)."""
    return json.dumps(strict(obj), allow_nan=False, **kw)


# ------------------------------------------------------------------------------- atomic files
@contextlib.contextmanager
def atomic_file(path: str) -> Iterator[IO[bytes]]:
    """Write ``path`` atomically through the binary file this yields: a temp file
    ``.tmp-<name>-<random>`` in the same directory, created with mode 0666 less the umask (as open()
    would); on leaving the block it is flushed, fsync'd and os.replace'd over ``path``, then the
    directory is fsync'd.  On any error (in the block or after) the temp file is removed, ``path`` is
    untouched and the error is raised again."""
    d = os.path.dirname(os.path.abspath(path))
    while True:
        tmp = os.path.join(d, f"{TMP_PREFIX}{os.path.basename(path)}-{secrets.token_hex(6)}")
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
            break
        except FileExistsError:
            continue
    try:
        with os.fdopen(fd, "wb") as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.lexists(tmp):
            os.unlink(tmp)
        raise
    _fsync_dir(d)


def atomic_write(path: str, data) -> None:
    """Write ``data`` (str, as UTF-8, or bytes) to ``path`` through ``atomic_file``."""
    raw = data.encode("utf-8") if isinstance(data, str) else bytes(data)
    with atomic_file(path) as f:
        f.write(raw)


def _fsync_dir(d: str) -> None:
    try:
        dfd = os.open(d, os.O_RDONLY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)
    except OSError:
        pass


# ---------------------------------------------------------------------------------- reading
def _digest(payload: dict) -> str:
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()


def _payload(doc: dict) -> dict:
    """The checksummed part of a checkpoint: everything but its format and checksum."""
    return {k: v for k, v in doc.items() if k not in ("format", "sha256")}


def read_checkpoint(out: str) -> dict:
    """The checkpoint document of run directory ``out`` (checked: format, checksum, config)."""
    path = os.path.join(out, CHECKPOINT)
    if not os.path.isfile(path):
        if os.path.lexists(path):
            what = "a directory" if os.path.isdir(path) else "not a regular file"
            raise CheckpointError(f"{path} is {what}, not a checkpoint file")
        raise CheckpointError(f"no checkpoint in {out} ({CHECKPOINT} missing)")
    try:
        with open(path, "r", encoding="utf-8") as f:
            doc = json.load(f)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"corrupt checkpoint {path}: {exc}") from None
    if not isinstance(doc, dict) or doc.get("format") != CKPT_FORMAT or "server" not in doc:
        raise CheckpointError(f"{path} is not a kseed-fed checkpoint")
    if doc.get("sha256") != _digest(_payload(doc)):
        raise CheckpointError(f"corrupt checkpoint {path}: checksum mismatch")
    try:
        FedConfig.from_dict(doc["server"]["config"]).validate()
    except (KeyError, TypeError, ValueError) as exc:
        raise CheckpointError(f"corrupt checkpoint {path}: bad config ({exc})") from None
    if not isinstance(doc.get("data", {}), dict):
        raise CheckpointError(f"corrupt checkpoint {path}: bad data identity")
    return doc


def checkpoint_config(out: str) -> FedConfig:
    return FedConfig.from_dict(read_checkpoint(out)["server"]["config"])


def read_metrics(out: str) -> List[dict]:
    """The rows of ``out``'s metrics.jsonl, up to a torn line (a crash while appending: it and what
    follows are dropped).  A line that is JSON but not an object (e.g. ``null``) is a CheckpointError
    naming the file and line."""
    path = os.path.join(out, METRICS)
    if not os.path.isfile(path):
        return []
    rows = []
    with open(path, "r", encoding="utf-8") as f:
        for ln, line in enumerate(f, 1):
            if line.strip():
                try:
                    row = json.loads(line)
                except json.JSONDecodeError:
                    break  # a torn last line from a crash: dropped, the round is re-run
                if not isinstance(row, dict):
                    raise CheckpointError(f"{path}:{ln}: not a metrics row (a JSON object), got "
                                          f"{line.strip()[:40]}")
                rows.append(row)
    return rows


# ------------------------------------------------------------------------------------ plots
def pyplot():
    """matplotlib.pyplot on the Agg backend (files only, no display): the plots' one entry point."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def figure_png(fig) -> bytes:
    """The PNG bytes of ``fig`` (tight layout, 100 dpi); the figure is closed."""
    plt = pyplot()
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    plt.close(fig)
    return buf.getvalue()


def render_plots(rows: List[dict]) -> dict:
    """{file name: PNG bytes} of the loss and bytes plots of ``rows``."""
    plt = pyplot()

    def series(key):
        return [(r["round"], r[key]) for r in rows if r.get(key) is not None]

    out = {}
    fig, ax = plt.subplots(figsize=(6, 4))
    for key, style, label in (
            ("train_loss", ".", "train loss (clients, mean of L+ and L-)"),
            ("eval_loss", "o", "held-out loss, token-weighted (eval_loss)"),
            ("eval_loss_example_mean", "s", "held-out loss, mean over examples "
                                            "(eval_loss_example_mean, the reference's)")):
        pts = series(key)
        if pts:
            ax.plot(*zip(*pts), marker=style, label=label)
    ax.set_xlabel("round")
    ax.set_ylabel("loss (response tokens)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    out["loss.png"] = figure_png(fig)
    fig, ax = plt.subplots(figsize=(6, 4))
    rr = [r["round"] for r in rows]
    ax.plot(rr, np.cumsum([r.get("bytes_down") or 0 for r in rows]) / 1024, label="down")
    ax.plot(rr, np.cumsum([r.get("bytes_up") or 0 for r in rows]) / 1024, label="up")
    ax.set_xlabel("round")
    ax.set_ylabel("cumulative KiB (all clients)")
    ax.grid(alpha=0.3)
    ax.legend()
    out["bytes.png"] = figure_png(fig)
    return out


# ------------------------------------------------------------------------------- TensorBoard
TENSORBOARD_EXTRA = "pip install 'kseed[tensorboard]' (the tensorboard package)"


class ScalarLog:
    """TensorBoard event files in ``logdir``: every number of a round's metrics row (held-out
    losses, train loss, Rouge-L, bytes, seconds, rebuild seconds, whatever the method reports) as a
    scalar tagged by its key at step = the round.  torch.utils.tensorboard's SummaryWriter (the
    ``tensorboard`` package), else tensorboardX's; RunDirError naming the extra without either."""

    def __init__(self, logdir: str):
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            try:
                from tensorboardX import SummaryWriter
            except ImportError:
                raise RunDirError(f"--tensorboard {logdir}: TensorBoard is not installed; "
                                  f"{TENSORBOARD_EXTRA}") from None
        self.writer = SummaryWriter(log_dir=os.fspath(logdir))

    def add(self, row: dict) -> None:
        step = int(row.get("round", 0))
        for key, v in row.items():
            if key != "round" and isinstance(v, (int, float)) and not isinstance(v, bool):
                self.writer.add_scalar(key, v, step)
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


# --------------------------------------------------------------------------------- the owner
class RunDir:
    """The run directory ``path`` of one run, locked while open; ``path=None``: a run without files
    (the rows are kept in memory only).

    ``resume=False`` refuses a directory that holds any of a run's files; ``resume=True`` needs a
    valid checkpoint (``self.checkpoint``).  ``hints`` name the user's switches in error messages:
    (how to resume, how to choose the directory), e.g. ("--resume", "--out") or ("resume=true", "out").
    ``tensorboard``: a directory that also gets each row as TensorBoard scalars (ScalarLog).
    Use as a context manager, or call ``close(failed=...)``.
    """

    def __init__(self, path: Optional[str], *, resume: bool = False,
                 hints=("--resume", "--out"), tensorboard: Optional[str] = None):
        self.path = None if path is None else os.fspath(path)
        self.resume = resume
        self.rows: List[dict] = []
        self.checkpoint: Optional[dict] = None
        self.checkpointed = False
        self._fd: Optional[int] = None
        self._locked = True
        self._created: List[str] = []
        self._wrote: List[str] = []
        self.scalars: Optional[ScalarLog] = None
        if self.path is None:
            if resume:
                raise RunDirError(f"resuming needs a run directory ({hints[1]})")
            self.scalars = ScalarLog(tensorboard) if tensorboard else None
            return
        self._lock(hints)
        try:
            self._check(hints)
            self.scalars = ScalarLog(tensorboard) if tensorboard else None
        except BaseException:
            self.close(failed=True)
            raise

    # ------------------------------------------------------------------------- open and close
    def _lock(self, hints) -> None:
        path = os.path.abspath(self.path)
        if os.path.lexists(path) and not os.path.isdir(path):
            raise RunDirError(f"{self.path} exists and is not a directory; choose another {hints[1]}")
        missing = []
        p = path
        while not os.path.exists(p):
            missing.append(p)
            parent = os.path.dirname(p)
            if parent == p:
                break
            p = parent
        for d in reversed(missing):
            try:
                os.mkdir(d)
                self._created.append(d)
            except FileExistsError:
                pass
        while True:
            fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as exc:
                if exc.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                    # a file system without flock on directories (some network file systems)
                    log.warning("cannot lock %s (%s): two runs on it are not prevented", self.path,
                                exc.strerror)
                    self._fd = fd
                    self._locked = False
                    return
                os.close(fd)
                self._remove_created()
                raise RunDirError(f"{self.path} is in use by another run (it holds the "
                                  f"directory's lock); wait for it or choose another "
                                  f"{hints[1]}") from None
            try:  # the directory may have been removed and made again while we waited
                same = os.path.samestat(os.fstat(fd), os.stat(path))
            except FileNotFoundError:
                same = False
            if same:
                self._fd = fd
                return
            os.close(fd)
            os.makedirs(path, exist_ok=True)

    def _check(self, hints) -> None:
        ours = tuple(f"{TMP_PREFIX}{n}-" for n in RUN_FILES)
        for name in os.listdir(self.path):  # temp files of a run that was killed while writing
            if name.startswith(ours):
                try:
                    os.unlink(os.path.join(self.path, name))
                except OSError:
                    pass
        if self.resume:
            self.checkpoint = read_checkpoint(self.path)
            return
        if os.path.exists(os.path.join(self.path, CHECKPOINT)):
            raise CheckpointError(f"{self.path} already holds a checkpoint: pass {hints[0]} to "
                                  f"continue it or choose another {hints[1]}")
        found = [n for n in RUN_FILES if os.path.lexists(os.path.join(self.path, n))]
        if found:
            raise RunDirError(f"{self.path} already holds a run's files ({', '.join(found)}) but "
                              f"no checkpoint to resume; choose another {hints[1]}")

    def _remove_created(self) -> None:
        for d in reversed(self._created):
            try:
                os.rmdir(d)  # only if empty
            except OSError:
                break
        self._created = []

    def close(self, failed: bool = False) -> None:
        """Release the lock.  After a failure before the first checkpoint, remove what this run
        wrote and the directories it created (if they are then empty)."""
        if self.scalars is not None:
            self.scalars.close()
            self.scalars = None
        if self._fd is None:
            return
        try:
            if failed and not self.checkpointed and not self.resume:
                for name in self._wrote:
                    try:
                        os.unlink(os.path.join(self.path, name))
                    except OSError:
                        pass
                self._remove_created()
        finally:
            if self._locked:
                fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None

    def __enter__(self) -> "RunDir":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        self.close(failed=exc_type is not None)

    # ------------------------------------------------------------------------------- writing
    def _file(self, name: str) -> str:
        if name not in self._wrote:
            self._wrote.append(name)
        return os.path.join(self.path, name)

    def track(self, name: str) -> None:
        """Count ``name`` among this run's files (another writer makes it: e.g. the seed history):
        removed with the others if the run fails before its first checkpoint."""
        if self.path is not None and not self.resume:
            self._file(name)

    def restore_rows(self, completed_round: int) -> None:
        """On resume: the metrics rows up to the checkpoint's round (later lines, written before a
        crash, are dropped and their rounds re-run)."""
        rows = [r for r in read_metrics(self.path) if r.get("round", 1 << 30) <= completed_round]
        if len(rows) != completed_round + 1:
            raise CheckpointError(f"{self.path}/{METRICS} lacks rounds before the checkpoint's "
                                  f"round {completed_round}")
        self.rows = rows
        atomic_write(os.path.join(self.path, METRICS), "".join(dumps(r) + "\n" for r in rows))

    def append(self, row: dict) -> dict:
        """Add a round's row (strict JSON) to metrics.jsonl, fsync'd; returns the row as written."""
        row = strict(row)
        self.rows.append(row)
        if self.path is not None:
            with open(self._file(METRICS), "a", encoding="utf-8") as f:
                f.write(dumps(row) + "\n")
                f.flush()
                os.fsync(f.fileno())
        if self.scalars is not None:
            self.scalars.add(row)
        return row

    def save_checkpoint(self, server_state: dict, data_identity: Optional[dict] = None) -> None:
        if self.path is None:
            return
        payload = {"server": server_state}
        if data_identity is not None:
            payload["data"] = data_identity
        doc = {"format": CKPT_FORMAT, "sha256": _digest(payload), **payload}
        atomic_write(self._file(CHECKPOINT), json.dumps(doc, sort_keys=True))
        self.checkpointed = True

    def write_summary(self, summary: dict) -> dict:
        summary = strict(summary)
        if self.path is not None:
            atomic_write(self._file(SUMMARY), dumps(summary, indent=1))
        return summary

    def write_plots(self) -> None:
        if self.path is None:
            return
        for name, png in render_plots(self.rows).items():
            atomic_write(self._file(name), png)
