"""In-process simulation: drives FedKSeedServer and FedKSeedClient over bytes, round by round, with
metrics.jsonl, atomic checkpoints, PNG plots, resume and export.

Output directory layout (--out DIR):
  metrics.jsonl     one JSON object per round (round 0 = the base model's evaluation)
  checkpoint.json   the server's state + run config + base-model identity, atomically replaced each round
  summary.json      the final numbers (eval loss first/last, Rouge-L, bytes, seconds)
  loss.png, bytes.png
"""
from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import tempfile
import time
from typing import Dict, List, Optional

import numpy as np

from . import datasets as D
from . import modeling as M
from .client import FedKSeedClient
from .config import FedConfig
from .server import FedKSeedServer

log = logging.getLogger("kseed")
CHECKPOINT = "checkpoint.json"
METRICS = "metrics.jsonl"
CKPT_FORMAT = "kseed-run/1"


class CheckpointError(ValueError):
    """A checkpoint that is missing, corrupt, or from another run / base model."""


# ------------------------------------------------------------------------------------ data
def build_data(cfg: FedConfig):
    """(client partitions, eval examples, description)."""
    if cfg.dataset == "ni":
        if cfg.data is None:
            raise D.DataError("--dataset ni needs --data DIR (a Natural Instructions 2.x checkout)")
        parts, test = D.load_natural_instructions(cfg.data, seed=cfg.seed)
        held = "test tasks"
    else:
        if cfg.dataset == "embedded":
            examples = D.generate_embedded(cfg.embedded_examples, seed=cfg.seed)
        else:
            if cfg.data is None:
                raise D.DataError("--dataset dolly needs --data FILE (databricks-dolly-15k.jsonl)")
            examples = D.load_dolly(cfg.data)
        train, test, held = D.split_heldout_category(examples, cfg.eval_category)
        if cfg.partition == "iid":
            idx = D.partition_iid(len(train), cfg.num_clients, cfg.seed)
        else:
            idx = D.partition_dirichlet([e["category"] for e in train], cfg.num_clients, cfg.alpha,
                                        cfg.seed, cfg.min_per_client)
        parts = [[train[i] for i in p] for p in idx]
    if len(parts) != cfg.num_clients:
        raise D.DataError(f"the data gives {len(parts)} clients (one per training task) but "
                          f"--num-clients is {cfg.num_clients}")
    rng = np.random.Generator(np.random.PCG64(cfg.seed + 0xE7A1))
    if len(test) > cfg.eval_size:
        test = [test[i] for i in sorted(rng.choice(len(test), cfg.eval_size, replace=False))]
    return parts, test, held


def model_dir(cfg: FedConfig) -> str:
    return cfg.model if cfg.model is not None else M.EMBEDDED_DIR


def load_workspace(cfg: FedConfig, device: str = "cpu", backend: Optional[str] = None,
                   cache: bool = True, model_path: Optional[str] = None) -> M.Workspace:
    path = model_path or model_dir(cfg)
    model, tok = M.load_model(path, cfg.dtype, device)
    ident = {"model": "embedded" if cfg.model is None else os.path.abspath(path),
             "hash": M.model_hash(model), "dtype": cfg.dtype,
             "parameters": int(sum(p.numel() for p in model.parameters()))}
    return M.Workspace(model, tok, backend=backend, rounding=cfg.rounding, identity=ident,
                       cache=cache)


# ------------------------------------------------------------------------------ checkpoints
def _digest(payload: dict) -> str:
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()


def atomic_write(path: str, text: str) -> None:
    """Write temp file in the same directory, fsync, os.replace, fsync the directory."""
    d = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", dir=d)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    try:
        dfd = os.open(d, os.O_RDONLY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)
    except OSError:
        pass


def save_checkpoint(out: str, server: FedKSeedServer) -> None:
    payload = {"server": server.state_dict()}
    doc = {"format": CKPT_FORMAT, "sha256": _digest(payload), **payload}
    atomic_write(os.path.join(out, CHECKPOINT), json.dumps(doc, sort_keys=True))


def read_checkpoint(out: str) -> dict:
    path = os.path.join(out, CHECKPOINT)
    if not os.path.isfile(path):
        raise CheckpointError(f"no checkpoint in {out} ({CHECKPOINT} missing)")
    try:
        with open(path, "r", encoding="utf-8") as f:
            doc = json.load(f)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"corrupt checkpoint {path}: {exc}") from None
    if not isinstance(doc, dict) or doc.get("format") != CKPT_FORMAT or "server" not in doc:
        raise CheckpointError(f"{path} is not a kseed-fed checkpoint")
    if doc.get("sha256") != _digest({"server": doc["server"]}):
        raise CheckpointError(f"corrupt checkpoint {path}: checksum mismatch")
    try:
        FedConfig.from_dict(doc["server"]["config"]).validate()
    except (KeyError, TypeError, ValueError) as exc:
        raise CheckpointError(f"corrupt checkpoint {path}: bad config ({exc})") from None
    return doc


def checkpoint_config(out: str) -> FedConfig:
    return FedConfig.from_dict(read_checkpoint(out)["server"]["config"])


# ---------------------------------------------------------------------------------- plots
def write_plots(out: str, rows: List[dict]) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    r_tr = [(r["round"], r["train_loss"]) for r in rows if r.get("train_loss") is not None]
    r_ev = [(r["round"], r["eval_loss"]) for r in rows if r.get("eval_loss") is not None]
    fig, ax = plt.subplots(figsize=(6, 4))
    if r_tr:
        ax.plot(*zip(*r_tr), marker=".", label="train loss (clients, mean of L+ and L-)")
    if r_ev:
        ax.plot(*zip(*r_ev), marker="o", label="held-out loss")
    ax.set_xlabel("round")
    ax.set_ylabel("loss (response tokens)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(os.path.join(out, "loss.png"), dpi=100)
    plt.close(fig)
    fig, ax = plt.subplots(figsize=(6, 4))
    rr = [r["round"] for r in rows]
    ax.plot(rr, np.cumsum([r.get("bytes_down", 0) for r in rows]) / 1024, label="down")
    ax.plot(rr, np.cumsum([r.get("bytes_up", 0) for r in rows]) / 1024, label="up")
    ax.set_xlabel("round")
    ax.set_ylabel("cumulative KiB (all clients)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(os.path.join(out, "bytes.png"), dpi=100)
    plt.close(fig)


def read_metrics(out: str) -> List[dict]:
    path = os.path.join(out, METRICS)
    if not os.path.isfile(path):
        return []
    rows = []
    with open(path, "r", encoding="utf-8") as f:
        for line in f:
            if line.strip():
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError:
                    break  # a torn last line from a crash: dropped, the round is re-run
    return rows


def _nan_none(x):
    return None if x is None or (isinstance(x, float) and not math.isfinite(x)) else x


# ------------------------------------------------------------------------------------ run
def global_evaluator(cfg: FedConfig, ws, server: FedKSeedServer, eval_ex):
    """A function ``evaluate(with_rouge) -> (held-out loss, Rouge-L F1 or None)`` of the server's
    current global model, rebuilt in ``ws`` from w0 and the server's coefficients in one fused pass."""
    eval_items = M.tokenize_examples(ws.tok, eval_ex, cfg.max_length, cfg.prompt)

    def evaluate(with_rouge: bool):
        ws.rebuild(server.seeds, server.global_coefs())
        loss = M.eval_loss(ws.model, eval_items, ws.pad_id, ws.device)
        rl = None
        if with_rouge:
            rl = M.rouge_l(ws.model, ws.tok, eval_ex[:cfg.rouge_size], cfg.max_length, ws.device,
                           cfg.max_new_tokens, cfg.prompt)
        return loss, rl

    return evaluate


def run_summary(cfg: FedConfig, ws, server: FedKSeedServer, rows: List[dict], held, eval_ex,
                evaluate_global, t_start: float) -> dict:
    """The fields of summary.json that every engine reports (simulation and Flower): the final Rouge-L
    (timed), the held-out loss trajectory, the bytes exchanged and the model.  Callers add their own."""
    t0 = time.perf_counter()
    _, rouge = evaluate_global(True) if cfg.rouge_size > 0 else (None, None)
    rouge_seconds = round(time.perf_counter() - t0, 2)
    evals = [r["eval_loss"] for r in rows if r.get("eval_loss") is not None]
    return {
        "rounds": server.round, "held_out": held, "eval_examples": len(eval_ex),
        "eval_loss_first": evals[0] if evals else None, "eval_loss_last": evals[-1] if evals else None,
        "eval_loss_drop_pct": (100.0 * (evals[0] - evals[-1]) / evals[0]) if len(evals) > 1 else None,
        "rouge_l": rouge, "rouge_examples": min(cfg.rouge_size, len(eval_ex)),
        "rouge_seconds": rouge_seconds,
        "bytes_down_total": int(sum(r.get("bytes_down", 0) for r in rows)),
        "bytes_up_total": int(sum(r.get("bytes_up", 0) for r in rows)),
        "seconds_this_process": round(time.perf_counter() - t_start, 2),
        "base_model": ws.identity, "parameters_trained": ws.ms.numel,
    }


def run(cfg: FedConfig, out: str, *, resume: bool = False, device: str = "cpu",
        backend: Optional[str] = None, progress: bool = True, rebuild_cache: bool = True) -> dict:
    """Run (or resume) a federation; returns the summary dict (also written to summary.json)."""
    cfg.validate()
    os.makedirs(out, exist_ok=True)
    ckpt = None
    if resume:
        ckpt = read_checkpoint(out)
    elif os.path.exists(os.path.join(out, CHECKPOINT)):
        raise CheckpointError(f"{out} already holds a checkpoint: pass --resume to continue it or "
                              "choose another --out")
    parts, eval_ex, held = build_data(cfg)
    ws = load_workspace(cfg, device, backend, cache=rebuild_cache)
    server = FedKSeedServer(cfg, base_identity=ws.identity)
    rows: List[dict] = []
    if ckpt is not None:
        try:
            server.load_state_dict(ckpt["server"])
        except ValueError as exc:
            raise CheckpointError(f"checkpoint in {out} does not match this run: {exc}") from None
        rows = [r for r in read_metrics(out) if r.get("round", 1 << 30) <= server.round]
        if len(rows) != server.round + 1:
            raise CheckpointError(f"{out}/{METRICS} lacks rounds before the checkpoint's round "
                                  f"{server.round}")
    clients: Dict[int, FedKSeedClient] = {}

    def client(cid: int) -> FedKSeedClient:
        if cid not in clients:
            clients[cid] = FedKSeedClient(cfg, lambda: ws, parts[cid], client_id=cid)
        return clients[cid]

    evaluate_global = global_evaluator(cfg, ws, server, eval_ex)

    t_start = time.perf_counter()
    if not rows:  # round 0: the base model
        t0 = time.perf_counter()
        loss0, _ = evaluate_global(False)
        rows.append({"round": 0, "train_loss": None, "eval_loss": loss0, "bytes_down": 0,
                     "bytes_up": 0, "seconds": round(time.perf_counter() - t0, 3)})
        with open(os.path.join(out, METRICS), "w", encoding="utf-8") as f:
            f.write(json.dumps(rows[0]) + "\n")
            f.flush()
            os.fsync(f.fileno())
        save_checkpoint(out, server)
    else:  # drop any line after the checkpoint's round (written before a crash)
        atomic_write(os.path.join(out, METRICS), "".join(json.dumps(r) + "\n" for r in rows))

    bar = None
    if progress:
        from tqdm import tqdm
        bar = tqdm(total=cfg.rounds, initial=server.round, desc="kseed-fed", unit="round",
                   dynamic_ncols=True)
    try:
        for rnd in range(server.round + 1, cfg.rounds + 1):
            t0 = time.perf_counter()
            ids = server.sample_clients(rnd)
            downs = {c: server.make_down(rnd, c) for c in ids}
            ups = {c: client(c).fit(downs[c]) for c in ids}
            stats = server.aggregate(rnd, ups, weights={c: len(parts[c]) for c in ids})
            do_eval = (cfg.eval_every and rnd % cfg.eval_every == 0) or rnd == cfg.rounds
            do_rouge = bool(cfg.rouge_every) and rnd % cfg.rouge_every == 0
            ev, rl = evaluate_global(do_rouge) if do_eval or do_rouge else (None, None)
            row = {"round": rnd, "train_loss": _nan_none(stats["train_loss"]),
                   "eval_loss": ev if do_eval else None,
                   "bytes_down": int(sum(len(b) for b in downs.values())),
                   "bytes_up": int(stats["bytes_up"]),
                   "bytes_down_per_client": {str(c): len(downs[c]) for c in ids},
                   "bytes_up_per_client": {str(c): len(ups[c]) for c in ids},
                   "clients": ids, "rejected": {str(k): v for k, v in stats["rejected"].items()},
                   "clipped": {str(k): v for k, v in stats["clipped"].items()},
                   "steps": stats["steps"]}
            if do_rouge:
                row["rouge_l"] = rl
            row["seconds"] = round(time.perf_counter() - t0, 3)
            with open(os.path.join(out, METRICS), "a", encoding="utf-8") as f:
                f.write(json.dumps(row) + "\n")
                f.flush()
                os.fsync(f.fileno())
            save_checkpoint(out, server)
            rows.append(row)
            if bar is not None:
                post = {"train": f"{row['train_loss']:.3f}" if row["train_loss"] is not None else "-"}
                if row["eval_loss"] is not None:
                    post["held-out"] = f"{row['eval_loss']:.3f}"
                bar.set_postfix(post)
                bar.update(1)
    finally:
        if bar is not None:
            bar.close()
    # final Rouge-L of greedy generations on the held-out set
    summary = run_summary(cfg, ws, server, rows, held, eval_ex, evaluate_global, t_start)
    summary.update({"backend": backend or "default", "device": str(ws.device)})
    write_plots(out, rows)
    atomic_write(os.path.join(out, "summary.json"), json.dumps(summary, indent=1))
    return summary


def export(out: str, to: str, *, model_path: Optional[str] = None, device: str = "cpu",
           backend: Optional[str] = None) -> dict:
    """Rebuild the global model from DIR's checkpoint and save it as a Hugging Face directory."""
    doc = read_checkpoint(out)
    cfg = FedConfig.from_dict(doc["server"]["config"])
    ws = load_workspace(cfg, device, backend, cache=False, model_path=model_path)
    server = FedKSeedServer(cfg, base_identity=ws.identity)
    try:
        server.load_state_dict(doc["server"])
    except ValueError as exc:
        raise CheckpointError(f"cannot export {out}: {exc}") from None
    ws.rebuild(server.seeds, server.global_coefs())
    os.makedirs(to, exist_ok=True)
    ws.model.save_pretrained(to, safe_serialization=True)
    ws.tok.save_pretrained(to)
    info = {"from": os.path.abspath(out), "round": server.round, "base_model": ws.identity,
            "num_seeds": cfg.num_seeds, "nonzero_coefficients": int(np.count_nonzero(
                server.global_coefs()))}
    with open(os.path.join(to, "kseed_export.json"), "w", encoding="utf-8") as f:
        json.dump(info, f, indent=1)
    return info
