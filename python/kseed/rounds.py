"""The round loop every engine runs: one federation, from its run directory to its summary.

An engine (the in-process simulation, the Flower ServerApp) supplies one thing, a ``deliver`` callable
that carries a round's down messages to the clients and returns what came back::

    deliver(round, {client id: DownMessage bytes}) -> Delivery(uploads={client id: UpMessage bytes}, ...)

and everything else is here::

    with Federation(cfg, out, resume=..., device=..., engine="simulation") as fed:
        summary = fed.run(deliver)

``Federation`` opens (and locks) the run directory, builds the task (data, workspace, evaluator) and
the method's server (kseed.methods, by ``cfg.method``),
restores the checkpoint on resume (refusing another configuration, base model or data), evaluates the
base model as round 0, and then per round: samples the clients, makes their down messages, calls
``deliver``, aggregates, evaluates, and writes the metrics row and the checkpoint.  At the end it
writes summary.json and the plots.  With the same configuration every engine ends with bitwise the
same server state, and a resumed run with bitwise the state of an uninterrupted one.
"""
from __future__ import annotations

import dataclasses
import logging
import math
import os
import sys
import time
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Mapping, Optional

from .config import FedConfig
from .rundir import CheckpointError, RunDir
from . import methods
from .methods.base import NotEnoughReplies
from .task import build_data, data_identity, global_evaluator, load_workspace, resolve_dtype

# Fields a resumed run may change; anything else must match the checkpoint.  "model": the base
# model's directory may move; its weights' hash (checked on restore) is its identity.
RESUME_MAY_CHANGE = frozenset({"rounds", "eval_every", "rouge_every", "rouge_size", "max_new_tokens",
                               "model"})


@dataclass
class Delivery:
    """What an engine reports for one round's exchange of messages."""
    uploads: Dict[int, bytes]                                    # client id -> its UpMessage bytes
    sent: Optional[List[int]] = None                             # clients a message went to (None: all)
    failed: Dict[int, str] = field(default_factory=dict)         # engine-side drops: client id -> why
    timings: Optional[Dict[int, Dict[str, float]]] = None        # per-client seconds, if measured
    wire_down: Optional[int] = None                              # bytes on the wire, if there is one
    wire_up: Optional[int] = None
    seconds: Optional[float] = None                              # the exchange's wall time


Deliver = Callable[[int, Dict[int, bytes]], Delivery]


def check_resume_config(saved: FedConfig, cfg: FedConfig, where: str = "the checkpoint") -> None:
    """CheckpointError naming every field outside RESUME_MAY_CHANGE where ``cfg`` differs from
    ``saved`` (paths compared resolved: the same directory by another path is the same)."""
    def norm(name, v):
        return os.path.realpath(v) if name in ("model", "data") and isinstance(v, str) else v

    diff = [f.name for f in dataclasses.fields(FedConfig) if f.name not in RESUME_MAY_CHANGE
            and norm(f.name, getattr(cfg, f.name)) != norm(f.name, getattr(saved, f.name))]
    if diff:
        what = ", ".join(f"{n.replace('_', '-')}={getattr(cfg, n)!r} (checkpoint: "
                         f"{getattr(saved, n)!r})" for n in diff)
        raise CheckpointError(f"the configuration differs from {where}: {what}; a resumed run "
                              "keeps its configuration (it may change rounds and the evaluation "
                              "cadence)")


def peak_memory(device) -> Dict[str, Optional[int]]:
    """The peak memory of this process so far: ``peak_rss_bytes_this_process`` (the peak resident
    set, getrusage's ru_maxrss; None where the platform has no ``resource`` module) and, on a CUDA
    device, ``peak_cuda_bytes_this_process`` (torch.cuda.max_memory_allocated).  Method-neutral; for
    the in-process engine the process holds the server, the evaluation and every client."""
    try:
        import resource
        rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        rss = int(rss if sys.platform == "darwin" else rss * 1024)  # bytes on macOS, KiB elsewhere
    except ImportError:  # pragma: no cover (Windows)
        rss = None
    out = {"peak_rss_bytes_this_process": rss}
    if getattr(device, "type", None) == "cuda":
        import torch
        out["peak_cuda_bytes_this_process"] = int(torch.cuda.max_memory_allocated(device))
    return out


class Federation:
    """One run of the federation, engine-neutral.  ``out=None``: no files (rows in memory only).
    ``rebuild_cache``: keep the last rebuilt model (worth it when clients share the server's
    workspace, as in-process).  ``hints`` name the user's switches in errors (see RunDir)."""

    def __init__(self, cfg: FedConfig, out: Optional[str], *, resume: bool = False,
                 device: str = "cpu", backend: Optional[str] = None, rebuild_cache: bool = True,
                 engine: str = "simulation", hints=("--resume", "--out"),
                 tensorboard: Optional[str] = None):
        cfg = resolve_dtype(cfg.validate())  # dtype / rounding auto: the base model's own
        self.t_start = time.perf_counter()
        self.cfg = cfg
        self.engine = engine
        self.backend = backend
        self.log = logging.getLogger(f"kseed.{engine}")
        self.rundir = RunDir(out, resume=resume, hints=hints, tensorboard=tensorboard)
        try:
            ckpt = self.rundir.checkpoint
            if ckpt is not None:
                check_resume_config(FedConfig.from_dict(ckpt["server"]["config"]), cfg,
                                    f"the checkpoint in {out}")
            self.parts, self.eval_ex, self.held = build_data(cfg)
            self.data = data_identity(cfg, self.parts, self.eval_ex)
            self.ws = load_workspace(cfg, device, backend, cache=rebuild_cache)
            self.method = methods.get(cfg.method)
            for name in self.method.server.files:  # removed if the run fails before its checkpoint
                self.rundir.track(name)
            self.server = self.method.server(cfg, base_identity=self.ws.identity, workdir=out)
            if ckpt is not None:
                self._restore(ckpt, out)
            self.evaluate = global_evaluator(cfg, self.ws, self.server, self.eval_ex)
        except BaseException:
            self.rundir.close(failed=True)
            raise

    def _restore(self, ckpt: dict, out: str) -> None:
        try:
            self.server.load_state_dict(ckpt["server"])
        except ValueError as exc:
            raise CheckpointError(f"checkpoint in {out} does not match this run: {exc}") from None
        saved = ckpt.get("data")
        if saved and saved.get("sha256") != self.data["sha256"]:
            raise CheckpointError(
                f"the data differs from the checkpoint's: {self.data['source']} gives "
                f"{self.data['train_examples']} training and {self.data['eval_examples']} eval examples "
                f"with sha256 {self.data['sha256'][:12]}..., the run started on "
                f"{saved.get('train_examples')} and {saved.get('eval_examples')} with "
                f"{str(saved.get('sha256'))[:12]}...; a resumed run needs the data it started with")
        self.rundir.restore_rows(self.server.round)

    def __enter__(self) -> "Federation":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        try:
            self.server.close()
        finally:
            self.rundir.close(failed=exc_type is not None)

    @property
    def rows(self) -> List[dict]:
        return self.rundir.rows

    def _checkpoint(self) -> None:
        self.rundir.save_checkpoint(self.server.state_dict(), self.data)

    # ------------------------------------------------------------------------------ the loop
    def run(self, deliver: Deliver, *, round0_fields: Optional[Mapping] = None,
            progress: bool = False) -> dict:
        """Rounds from the checkpoint's (or round 0) to cfg.rounds, then the summary (returned, and
        written to summary.json with the plots)."""
        cfg, server = self.cfg, self.server
        if not self.rows:  # round 0: the base model
            t0 = time.perf_counter()
            ev = self.evaluate(False)
            self.rundir.append({"round": 0, "train_loss": None, "eval_loss": ev.loss,
                                "eval_loss_example_mean": ev.loss_example_mean, "bytes_down": 0,
                                "bytes_up": 0, **dict(round0_fields or {}),
                                "seconds": round(time.perf_counter() - t0, 3)})
            self._checkpoint()
        bar = None
        if progress:
            from tqdm import tqdm
            bar = tqdm(total=cfg.rounds, initial=server.round, desc="kseed-fed", unit="round",
                       dynamic_ncols=True)
        try:
            for rnd in range(server.round + 1, cfg.rounds + 1):
                row = self.run_round(rnd, deliver)
                if bar is not None:
                    post = {"train": "-" if row["train_loss"] is None else f"{row['train_loss']:.3f}"}
                    if row["eval_loss"] is not None:
                        post["held-out"] = f"{row['eval_loss']:.3f}"
                    bar.set_postfix(post)
                    bar.update(1)
        finally:
            if bar is not None:
                bar.close()
        return self.finish()

    def run_round(self, rnd: int, deliver: Deliver) -> dict:
        """One round: sample, send, aggregate, evaluate, write the row and the checkpoint."""
        cfg, server = self.cfg, self.server
        t0 = time.perf_counter()
        ids = server.sample_clients(rnd)
        downs = {c: server.make_down(rnd, c) for c in ids}
        got = deliver(rnd, downs)
        try:
            # the server knows the true partition sizes: a client's claimed example count is only
            # recorded, never trusted (the ServerApp builds the same partitions from the run seed)
            stats = server.aggregate(rnd, got.uploads, weights={c: len(self.parts[c]) for c in ids})
        except NotEnoughReplies as exc:
            self.log.error("%s; dropped before aggregation: %s", exc, got.failed)
            raise
        do_eval = (cfg.eval_every and rnd % cfg.eval_every == 0) or rnd == cfg.rounds
        do_rouge = bool(cfg.rouge_every) and rnd % cfg.rouge_every == 0
        ev = self.evaluate(do_rouge) if do_eval or do_rouge else None
        sent = list(ids) if got.sent is None else list(got.sent)
        rejected = {str(k): v for k, v in sorted(got.failed.items())}
        rejected.update({str(k): v for k, v in stats["rejected"].items()})
        payload_down = int(sum(len(downs[c]) for c in sent))
        row = {"round": rnd, "train_loss": stats["train_loss"],
               "eval_loss": ev.loss if do_eval else None,
               "eval_loss_example_mean": ev.loss_example_mean if do_eval else None,
               "bytes_down": payload_down if got.wire_down is None else int(got.wire_down),
               "bytes_up": int(stats["bytes_up"]) if got.wire_up is None else int(got.wire_up),
               "payload_bytes_down": payload_down, "payload_bytes_up": int(stats["bytes_up"]),
               "bytes_down_per_client": {str(c): len(downs[c]) for c in sent},
               "bytes_up_per_client": {str(c): len(u) for c, u in sorted(got.uploads.items())},
               "clients": ids, "accepted": stats["accepted"], "rejected": rejected,
               "clipped": {str(k): v for k, v in stats["clipped"].items()},
               "steps": stats["steps"]}
        if got.timings is not None:
            rebuild = {str(c): t["rebuild-s"] for c, t in got.timings.items() if "rebuild-s" in t}
            row["rebuild_seconds"] = (round(sum(rebuild.values()) / len(rebuild), 4)
                                      if rebuild else None)
            row["rebuild_seconds_per_client"] = {c: round(v, 4) for c, v in rebuild.items()}
            row["client_seconds"] = {str(c): {k: round(v, 4) for k, v in t.items()}
                                     for c, t in sorted(got.timings.items())}
        if got.seconds is not None:
            row["exchange_seconds"] = round(got.seconds, 3)
        if do_rouge:
            row["rouge_l"] = ev.rouge_l
        row["seconds"] = round(time.perf_counter() - t0, 3)
        row = self.rundir.append(row)
        self._checkpoint()
        self.log.info("round %d: train %s, held-out %s, clients %s, rejected %s, bytes down %d up %d, "
                      "rebuild %s s", rnd, row["train_loss"], row["eval_loss"], stats["accepted"],
                      sorted(rejected), row["bytes_down"], row["bytes_up"], row.get("rebuild_seconds"))
        return row

    # ------------------------------------------------------------------------------- summary
    def finish(self) -> dict:
        """The plots, then summary.json (returned).  The final held-out loss is the final model's
        (null when it is NaN or infinite: ``diverged`` is then true, and the last finite value and
        its round are given), never an earlier round's.  If the end-of-run evaluation fails, the
        summary is still written (with ``final_evaluation_error``) before the error is raised."""
        cfg, rows = self.cfg, self.rows
        try:
            self.rundir.write_plots()
        except ImportError as exc:  # matplotlib missing: the numbers are in metrics.jsonl
            self.log.warning("no plots: %s", exc)
        t0 = time.perf_counter()
        last, ev, error = rows[-1], None, None
        # the last row is the final model's; a null there (not evaluated, or NaN) is evaluated again
        if cfg.rouge_size > 0 or last.get("eval_loss") is None:
            try:
                ev = self.evaluate(cfg.rouge_size > 0)
            except Exception as exc:  # the summary is written first, then this is raised again
                error = exc
        rouge_seconds = round(time.perf_counter() - t0, 2)
        final = ev.loss if ev is not None else last.get("eval_loss")
        final_ex = ev.loss_example_mean if ev is not None else last.get("eval_loss_example_mean")
        # unknown (None) only when the evaluation failed and the last row holds no value
        diverged = None if final is None and ev is None else (final is not None
                                                               and not math.isfinite(final))
        finite = [r for r in rows if r.get("eval_loss") is not None]
        first = rows[0].get("eval_loss")
        ex_first = rows[0].get("eval_loss_example_mean")
        summary = {
            "engine": self.engine, "rounds": self.server.round, "held_out": self.held,
            "eval_examples": len(self.eval_ex),
            "eval_loss_first": first,
            "eval_loss_last": final,
            "eval_loss_drop_pct": (100.0 * (first - final) / first
                                   if first and final is not None and math.isfinite(final)
                                   and self.server.round > 0 else None),
            "diverged": diverged,
            "eval_loss_last_finite": finite[-1]["eval_loss"] if finite else None,
            "eval_loss_last_finite_round": finite[-1]["round"] if finite else None,
            "eval_loss_example_mean_first": ex_first,
            "eval_loss_example_mean_last": final_ex,
            "rouge_l": ev.rouge_l if ev is not None else None,
            "rouge_examples": min(cfg.rouge_size, len(self.eval_ex)),
            "rouge_seconds": rouge_seconds,
            "bytes_down_total": int(sum(r.get("bytes_down") or 0 for r in rows)),
            "bytes_up_total": int(sum(r.get("bytes_up") or 0 for r in rows)),
            "payload_bytes_down_total": int(sum(r.get("payload_bytes_down") or 0 for r in rows)),
            "payload_bytes_up_total": int(sum(r.get("payload_bytes_up") or 0 for r in rows)),
            "seconds_this_process": round(time.perf_counter() - self.t_start, 2),
            "method": cfg.method,
            # the server workspace's rebuilds of the global model in this process (evaluation and,
            # in-process, the clients'): how many were computed and their seconds
            "rebuilds_this_process": int(self.ws.rebuilds),
            "rebuild_seconds_this_process": round(self.ws.rebuild_seconds, 3),
            **peak_memory(self.ws.device),
            "base_model": self.ws.identity,
            "parameters_trained": self.server.parameters_trained(self.ws),
            "data": self.data, "backend": self.backend or "default", "device": str(self.ws.device),
        }
        if error is not None:
            summary["final_evaluation_error"] = f"{type(error).__name__}: {error}"
            self.rundir.write_summary(summary)
            raise error
        return self.rundir.write_summary(summary)
