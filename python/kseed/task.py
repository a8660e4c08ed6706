"""The engine-neutral task: the data, the model workspace, and the evaluation of the global model.

This is the part every engine shares (the role Flower's `task.py` plays in its own examples): the
in-process simulation, the Flower ServerApp and the Flower ClientApp all build their data and their
model here, and the server side evaluates the global model here.
"""
from __future__ import annotations

import hashlib
import json
import os
from typing import Callable, List, NamedTuple, Optional, Tuple

import numpy as np

from . import datasets as D
from . import modeling as M
from .config import FedConfig


# ------------------------------------------------------------------------------------ data
def build_data(cfg: FedConfig) -> Tuple[List[List[dict]], List[dict], str]:
    """(client partitions, eval examples, held-out description)."""
    if cfg.dataset == "ni":
        if cfg.data is None:
            raise D.DataError("--dataset ni needs --data DIR (a Natural Instructions 2.x checkout)")
        parts, test = D.load_natural_instructions(cfg.data, seed=cfg.seed)
        held = "test tasks"
    else:
        if cfg.dataset == "embedded":
            examples = D.generate_embedded(cfg.embedded_examples, seed=cfg.seed)
        elif cfg.dataset == "hf":
            if cfg.data is None:
                raise D.DataError("--dataset hf needs --data (a datasets directory, a parquet / csv "
                                  "/ json file, or ORG/NAME in the local Hugging Face cache)")
            examples = D.load_table(cfg.data, cfg.columns)
        else:
            if cfg.data is None:
                raise D.DataError("--dataset dolly needs --data FILE (databricks-dolly-15k.jsonl)")
            examples = D.load_dolly(cfg.data)
        if (cfg.dataset == "hf" and cfg.eval_category is None
                and len({e["category"] for e in examples}) < 2):  # no categories: a random hold-out
            train, test, held = D.split_heldout_random(examples, cfg.eval_size, cfg.seed)
        else:
            train, test, held = D.split_heldout_category(examples, cfg.eval_category)
        if cfg.partition == "iid":
            idx = D.partition_iid(len(train), cfg.num_clients, cfg.seed)
        else:
            try:
                idx = D.partition_dirichlet([e["category"] for e in train], cfg.num_clients, cfg.alpha,
                                            cfg.seed, cfg.min_per_client)
            except D.DataError as exc:
                if cfg.dataset != "embedded":
                    raise
                # many clients (the paper's 200) need more than the embedded default's 2,000 examples
                raise D.DataError(f"{exc}, or generate more embedded examples with --embedded-examples "
                                  f"(now {cfg.embedded_examples}; 200 clients: 15000)") from None
        parts = [[train[i] for i in p] for p in idx]
    if cfg.num_clients == 1 and len(parts) > 1:  # one client (MeZO) holds all the training data
        parts = [[e for p in parts for e in p]]
    if len(parts) != cfg.num_clients:
        raise D.DataError(f"the data gives {len(parts)} clients (one per training task) but "
                          f"--num-clients is {cfg.num_clients}")
    rng = np.random.Generator(np.random.PCG64(cfg.seed + 0xE7A1))
    if len(test) > cfg.eval_size:
        test = [test[i] for i in sorted(rng.choice(len(test), cfg.eval_size, replace=False))]
    return parts, test, held


def data_identity(cfg: FedConfig, parts: List[List[dict]], eval_ex: List[dict]) -> dict:
    """The identity of the data a run trains and evaluates on, kept in its checkpoint beside the base
    model's: SHA-256 over every client partition and the eval examples exactly as the run uses them
    (canonical JSON, in order).  Whatever the source (a Dolly file, an NI directory, the embedded
    generator and its parameters), an edit that changes what the run sees changes the hash, and one
    that does not (e.g. a task file NI skips) leaves it alone."""
    h = hashlib.sha256()
    for part in list(parts) + [eval_ex]:
        h.update(json.dumps(part, sort_keys=True, ensure_ascii=False).encode("utf-8"))
        h.update(b"\n")
    if cfg.dataset == "embedded":
        source = f"the embedded generator ({cfg.embedded_examples} examples, seed {cfg.seed})"
    else:
        source = os.path.abspath(cfg.data) if cfg.data is not None else None
    return {"dataset": cfg.dataset, "source": source, "sha256": h.hexdigest(),
            "train_examples": int(sum(len(p) for p in parts)), "eval_examples": len(eval_ex)}


# ----------------------------------------------------------------------------------- model
def model_dir(cfg: FedConfig) -> str:
    return cfg.model if cfg.model is not None else M.EMBEDDED_DIR


_DTYPE_NAMES = {"float32": "fp32", "bfloat16": "bf16", "float16": "fp16", "F32": "fp32",
                "BF16": "bf16", "F16": "fp16"}


def checkpoint_dtype(path: str) -> str:
    """The dtype a model directory was saved in (fp32 | bf16 | fp16): config.json's ``dtype`` (or
    the older ``torch_dtype``), else the dtype of its safetensors' floating tensors, else fp32."""
    try:
        with open(os.path.join(path, "config.json"), "r", encoding="utf-8") as f:
            conf = json.load(f)
    except (OSError, ValueError):
        conf = {}
    for key in ("dtype", "torch_dtype"):
        v = conf.get(key) if isinstance(conf, dict) else None
        if isinstance(v, str) and v.replace("torch.", "") in _DTYPE_NAMES:
            return _DTYPE_NAMES[v.replace("torch.", "")]
    import glob
    from . import weights as W
    for st in sorted(glob.glob(os.path.join(glob.escape(path), "*.safetensors"))):
        header, _ = W.read_header(st)
        kinds = {e.get("dtype") for n, e in header.items() if n != "__metadata__"}
        for k in ("BF16", "F16", "F32"):
            if k in kinds:
                return _DTYPE_NAMES[k]
    return "fp32"


def resolve_dtype(cfg: FedConfig) -> FedConfig:
    """``cfg`` with ``dtype auto`` made the base model's own dtype (checkpoint_dtype; the embedded
    model's is fp32) and ``rounding auto`` made stochastic for 16-bit weights (a step smaller than
    half a bf16 ulp would round away) and nearest for fp32.  Idempotent; a run's checkpoint keeps
    the resolved values."""
    import dataclasses
    dtype = checkpoint_dtype(model_dir(cfg)) if cfg.dtype == "auto" else cfg.dtype
    rounding = cfg.rounding
    if rounding == "auto":
        rounding = "nearest" if dtype == "fp32" else "stochastic"
    if (dtype, rounding) == (cfg.dtype, cfg.rounding):
        return cfg
    return dataclasses.replace(cfg, dtype=dtype, rounding=rounding)


def load_workspace(cfg: FedConfig, device: str = "cpu", backend: Optional[str] = None,
                   cache: bool = True, model_path: Optional[str] = None,
                   facts: bool = True) -> M.Workspace:
    """The base model's Workspace for the run; its identity holds the model's hash, dtype and size
    and, with ``facts``, what the method's server must know of the model (Method.model_facts, e.g.
    FedPipe's weight selection: a client, which learns them from its down messages, passes False)."""
    path = model_path or model_dir(cfg)
    cfg = resolve_dtype(cfg)
    model, tok = M.load_model(path, cfg.dtype, device)
    ident = {"model": "embedded" if cfg.model is None else os.path.abspath(path),
             "hash": M.model_hash(model), "dtype": cfg.dtype,
             "parameters": int(sum(p.numel() for p in model.parameters()))}
    ws = M.Workspace(model, tok, backend=backend, rounding=cfg.rounding, noise=cfg.noise,
                     identity=ident, cache=cache)
    from .methods import get
    method_facts = get(cfg.method).model_facts  # what the method's server must know of the model
    if facts and method_facts is not None:
        ident.update(method_facts(cfg, ws))
    return ws


# ------------------------------------------------------------------------------ evaluation
class Evaluation(NamedTuple):
    loss: Optional[float]               # held-out loss, token-weighted mean (metrics key eval_loss);
    loss_example_mean: Optional[float]  # mean of per-example means (eval_loss_example_mean); both
    #                                     None when the held-out set has no response tokens
    rouge_l: Optional[float]    # Rouge-L F1 of greedy generations, when asked for


def check_evaluation(cfg: FedConfig) -> None:
    """ValueError for evaluation settings that would fail only when used (at the end of the run):
    Rouge-L (--rouge-size > 0) generates, so it needs --max-new-tokens >= 1.  Kept out of
    FedConfig.validate so that a checkpoint written with such settings can still be read and resumed
    with better ones (both may change on --resume)."""
    if cfg.rouge_size > 0 and cfg.max_new_tokens < 1:
        raise ValueError(f"--max-new-tokens must be >= 1 when Rouge-L is computed (--rouge-size "
                         f"{cfg.rouge_size}), got {cfg.max_new_tokens}; pass --max-new-tokens N or "
                         "--rouge-size 0 (a resumed run may change either)")


def global_evaluator(cfg: FedConfig, ws: M.Workspace, server, eval_ex: List[dict]
                     ) -> Callable[[bool], Evaluation]:
    """A function ``evaluate(with_rouge) -> Evaluation`` of the server's current global model, which
    the server (any method's: kseed.methods) loads into ``ws`` (server.load_global)."""
    check_evaluation(cfg)
    eval_items = M.tokenize_examples(ws.tok, eval_ex, cfg.max_length, cfg.prompt_template())

    def evaluate(with_rouge: bool) -> Evaluation:
        server.load_global(ws)
        loss, per_example = M.eval_loss(ws.model, eval_items, ws.pad_id, ws.device, both=True)
        rl = None
        if with_rouge:
            rl = M.rouge_l(ws.model, ws.tok, eval_ex[:cfg.rouge_size], cfg.max_length, ws.device,
                           cfg.max_new_tokens, cfg.prompt_template())
        return Evaluation(loss, per_example, rl)

    return evaluate
