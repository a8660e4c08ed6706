"""kseed-fed: federated full-parameter fine-tuning of a causal LM with zeroth-order methods.

    kseed-fed                                  # the embedded default: small LLaMA, synthetic data
    kseed-fed --method fedmezo                 # FedMeZO (fedkseed, fedkseed-pro, fedmezo, mezo)
    kseed-fed --model DIR --data dolly.jsonl --dataset dolly --out runs/dolly
    kseed-fed --out runs/x --resume            # continue DIR's checkpoint
    kseed-fed export --out runs/x --to hf_dir  # the final model as a Hugging Face directory
"""
from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import sys
from typing import List, Optional

from . import config as C
from .config import FedConfig

_D = FedConfig()
# (flag(s), field, type, help); defaults come from FedConfig and are shown in --help.
_OPTIONS = [
    (("--rounds",), "rounds", int, "number of federated rounds"),
    (("--num-clients",), "num_clients", int,
     "number of clients the training data is split into (NI: must equal the usable training tasks)"),
    (("--clients-per-round",), "clients_per_round", int,
     "clients sampled per round (seeded from --seed; at most --num-clients)"),
    (("--local-steps",), "local_steps", int,
     "tau: zeroth-order steps per client per round (= (index, g) pairs uploaded)"),
    (("--num-seeds", "-K"), "num_seeds", int, "K: size of the candidate seed pool"),
    (("--lr",), "lr", float, "learning rate of the local zeroth-order steps"),
    (("--eps",), "eps", float, "perturbation scale of the two-point estimate"),
    (("--sampling",), "sampling", str,
     "seed choice per step: uniform (FedKSeed) or pro (FedKSeed-Pro, by the seeds' mean |g|)"),
    (("--model",), "model", str,
     "Hugging Face causal-LM directory, or ORG/NAME found in the local Hugging Face cache "
     "(--revision; never downloaded) (default: the embedded small LLaMA model)"),
    (("--data",), "data", str,
     "data: a Dolly jsonl file, a Natural Instructions 2.x directory, or (kseed[hf]) a datasets "
     "save_to_disk directory, a parquet / csv / json / jsonl file, or ORG/NAME in the local "
     "Hugging Face cache (default: embedded synthetic data)"),
    (("--dataset",), "dataset", str,
     "embedded | dolly | ni | hf (default: embedded; with --data: hf for a datasets directory, "
     "a hub name, parquet / csv / json and --columns, dolly for another jsonl file, ni for another "
     "directory)"),
    (("--columns",), "columns", str,
     "the data's columns for the example's fields: instruction=COL,input=COL,output=COL,"
     "category=COL (default: Alpaca's instruction / input / output and Dolly's instruction / "
     "context / response / category)"),
    (("--dtype",), "dtype", str,
     "weight dtype: auto (the checkpoint's own: config.json's dtype, else its tensors') | fp32 | "
     "bf16 | fp16"),
    (("--seed",), "seed", int, "run seed: seed pool, partition, client sampling, local batches"),
    (("--batch-size",), "batch_size", int, "examples per zeroth-order loss evaluation"),
    (("--max-length",), "max_length", int, "max tokens per example (prompt cut first)"),
    (("--partition",), "partition", str, "dirichlet (over categories) | iid; NI: one client per task"),
    (("--alpha",), "alpha", float, "Dirichlet concentration of the non-IID partition"),
    (("--min-per-client",), "min_per_client", int, "minimum examples per client (Dirichlet)"),
    (("--eval-category",), "eval_category", str,
     "held-out category (default: the 8th of the sorted categories, as in the paper's code)"),
    (("--eval-size",), "eval_size", int, "held-out examples used for the eval loss"),
    (("--eval-every",), "eval_every", int, "held-out loss every N rounds (0: last round only)"),
    (("--rouge-every",), "rouge_every", int, "Rouge-L every N rounds (0: only at the end)"),
    (("--rouge-size",), "rouge_size", int, "held-out examples generated for Rouge-L (0: none)"),
    (("--max-new-tokens",), "max_new_tokens", int, "greedy generation length for Rouge-L"),
    (("--min-replies",), "min_replies", int, "valid uploads needed to apply a round"),
    (("--pro-clip",), "pro_clip", float, "C: |g| clip of the FedKSeed-Pro statistics"),
    (("--optimizer",), "optimizer", str, "local first-order optimizer: sgd (momentum 0) | adamw"),
    (("--n-accum",), "n_accum", int, "micro-batches of --batch-size accumulated per local step"),
    (("--grad-clip",), "grad_clip", float, "gradient-norm clip of each local step (0: off)"),
    (("--server-lr",), "server_lr", float, "server step size: w <- w - this x the rebuilt update"),
    (("--seed-clip",), "seed_clip", float,
     "norm clip of each seed's rebuilt update (Ferret's 10; 0: off)"),
    (("--lora-rank",), "lora_rank", int, "rank r of the LoRA adapters"),
    (("--lora-alpha",), "lora_alpha", float, "LoRA alpha: the adapter's scale is alpha / r"),
    (("--lora-dropout",), "lora_dropout", float, "dropout on the LoRA branch in local training"),
    (("--lora-targets",), "lora_targets", str,
     "the modules adapted: comma-separated names or name suffixes of the model's linear layers "
     "(LLaMA-like attention)"),
    (("--select-fraction",), "select_fraction", float,
     "FedPipe: the top fraction of the --lora-targets weights adapted, by their contribution "
     "|dL/dW x W| on the calibration set"),
    (("--calib-size",), "calib_size", int, "FedPipe: training examples the selection is scored on"),
    (("--client-budgets",), "client_budgets", str,
     "FedPipe: memory budget of each client in MiB, comma-separated, cycled over the client ids; it "
     "sets the client's frozen-model precision (run dtype, int8, int4) and rank (default: none: "
     "every client at --lora-rank on the run-dtype model); on Flower a SuperNode's node config "
     "memory-budget-mib overrides it for its client"),
    (("--embedded-examples",), "embedded_examples", int, "size of the embedded synthetic data set"),
    (("--rounding",), "rounding", str,
     "rounding of bf16/fp16 weight updates: auto (stochastic for 16-bit weights) | nearest | "
     "stochastic"),
    (("--noise",), "noise", str,
     "perturbation family: gaussian (z ~ N(0, I), the paper's) | rademacher (each z_i = +1 or -1, "
     "the classical SPSA direction; cheaper to apply)"),
    (("--prompt",), "prompt", str,
     "prompt template: reference (the FedKSeed code's Dolly/NI template, response appended "
     "directly after '### Response:') | alpaca (the standard Alpaca wording) | auto (reference for "
     "Dolly and NI, alpaca for the embedded model, whose tokenizer was built on that wording)"),
    (("--lr-rule",), "lr_rule", str,
     "client-wise lr rule with --clientwise-lr: fedmezo (lr + delta (s_i - mean s) / max|s_j - "
     "mean s|, FedMeZO) | ratio (lr x last loss / mean loss, clipped to [0.5, 2])"),
    (("--lr-signal",), "lr_signal", str,
     "s_i of the fedmezo rule: round-wise (last training loss) | five-round (mean of the last "
     "five) | model-diff (distance of the last update from the round's mean update)"),
    (("--lr-delta",), "lr_delta", float,
     "delta of the fedmezo rule as a fraction of --lr, in [0, 0.99] (FedMeZO: 5e-6 at lr 1e-5 = "
     "0.5)"),
    (("--g-clip",), "g_clip", float,
     "aggregation bound: |g| (and a client's sum of g on one seed index) <= this x the round's "
     "lower median of the clients' median |g| (0: off)"),
    (("--g-clip-abs",), "g_clip_abs", float, "aggregation bound: a fixed |g| limit as well (0: off)"),
    (("--norm-bound",), "norm_bound", float,
     "aggregation bound: a client's update norm <= this x the round's lower median norm (0: off)"),
    (("--weight-cap",), "weight_cap", float,
     "aggregation bound: a claimed example count <= this x the round's lower median claim, where "
     "the server does not know the true sizes (0: off)"),
    (("--loss-cap",), "loss_cap", float,
     "aggregation bound: a reported training loss is clipped to [0, this x the round's lower "
     "median] (0: off)"),
]
# The option groups of --help, by concern; the method groups (the options of the methods that use
# them) are kseed.methods.base.METHOD_GROUPS, between "federation" and "data".
_GROUPS = [
    ("federation", ("rounds", "num_clients", "clients_per_round", "seed")),
    ("data", ("model", "data", "dataset", "columns", "dtype", "rounding", "partition", "alpha",
              "min_per_client", "embedded_examples", "max_length", "prompt")),
    ("evaluation", ("eval_category", "eval_size", "eval_every", "rouge_every", "rouge_size",
                    "max_new_tokens")),
    ("robustness (the aggregation bounds: README \"Threat model\")",
     ("min_replies", "equal_weights", "g_clip", "g_clip_abs", "norm_bound", "weight_cap",
      "loss_cap")),
]
_FLAGS = [
    ("--equal-weights", "equal_weights", "aggregate clients with equal weights instead of by "
                                         "example count"),
    ("--clientwise-lr", "clientwise_lr", "client-wise learning rates (rule: --lr-rule)"),
    ("--grad-checkpointing", "grad_checkpointing", "activation checkpointing in the first-order "
                                                   "local steps (less memory, one more forward)"),
]


def _parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog="kseed-fed", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="Subcommand: kseed-fed export --out DIR --to HFDIR [--model DIR] rebuilds the final "
               "model from DIR's checkpoint and writes it with safetensors.")
    from .methods import ALIASES, NAMES
    from .methods.base import METHOD_GROUPS
    titles = [_GROUPS[0]] + list(METHOD_GROUPS.items()) + _GROUPS[1:]
    groups = {t: ap.add_argument_group(t) for t, _ in titles}
    group_of = {f: groups[t] for t, fields in titles for f in fields}
    groups[titles[0][0]].add_argument(
        "--method", dest="method", default=None, choices=list(NAMES) + list(ALIASES),
        help="the federated method: fedkseed (K candidate seeds; fedkseed-pro = --sampling pro), "
             "fedmezo (FedAvg of MeZO clients: a fresh seed every step, the global model a seed "
             "history), mezo (one client holding all the training data), ferret (first-order local "
             "steps projected onto the seed pool), fedit (LoRA FedAvg, kseed[lora]), fedpipe (FedPipe: "
             "LoRA on selected weights, per-client ranks and quantized models, kseed[lora]) (default: "
             "fedkseed; an "
             "option the method does not use is refused)")
    for flags, name, typ, help_ in _OPTIONS:
        default = getattr(_D, name)
        kw = {"choices": list(C.CHOICES[name])} if name in C.CHOICES else {}
        if "(default" not in help_:
            help_ = f"{help_} (default: {default})"
        group_of[name].add_argument(*flags, dest=name, type=typ, default=None, help=help_, **kw)
    for flag, name, help_ in _FLAGS:
        group_of[name].add_argument(flag, dest=name, action="store_const", const=True, default=None,
                                    help=f"{help_} (default: off)")
    groups["data"].add_argument(
        "--revision", default="main",
        help="the revision of an ORG/NAME --model in the local Hugging Face cache: a branch or tag "
             "(refs/) or a commit hash (default: main)")
    run = ap.add_argument_group("output and runtime")
    run.add_argument("--device", default="cpu", help="torch device, e.g. cpu or cuda (default: cpu)")
    run.add_argument("--backend", default=None,
                    help="kseed_kernels backend (reference, cpu, triton, cuda; default: fastest "
                         "available)")
    run.add_argument("--out", default=None,
                    help="output directory: metrics.jsonl, checkpoint.json, summary.json, plots "
                         "(default: a new runs/kseed-DATE-TIME)")
    run.add_argument("--tensorboard", default=None, metavar="DIR",
                    help="also write each round's metrics (held-out losses, train loss, Rouge-L, "
                         "bytes, seconds) as TensorBoard scalars in DIR (needs kseed[tensorboard]; "
                         "default: none)")
    run.add_argument("--resume", action="store_true",
                    help="continue from the checkpoint in --out (default: off; a run refuses to "
                         "overwrite an existing checkpoint)")
    run.add_argument("--threads", type=int, default=0,
                    help="torch CPU threads (default: 0 = 1 thread for the embedded model, whose "
                         "ops are too small to gain from more, else torch's default)")
    run.add_argument("--quiet", action="store_true", help="no progress bar (default: off)")
    return ap


def _export_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="kseed-fed export",
                                 description="Rebuild the final global model from a run's checkpoint "
                                             "and save it as a Hugging Face directory (safetensors).")
    ap.add_argument("--out", required=True, help="the run directory holding checkpoint.json")
    ap.add_argument("--to", required=True, help="the Hugging Face directory to write")
    ap.add_argument("--model", default=None,
                    help="base model directory or ORG/NAME in the local Hugging Face cache "
                         "(default: the one recorded in the checkpoint); its hash must match")
    ap.add_argument("--revision", default="main",
                    help="the revision of an ORG/NAME --model (default: main)")
    ap.add_argument("--device", default="cpu", help="torch device (default: cpu)")
    ap.add_argument("--backend", default=None, help="kseed_kernels backend (default: fastest)")
    ap.add_argument("--overwrite", action="store_true",
                    help="write into a --to directory that already holds weights (default: off; "
                         "the run's base model directory is refused even so)")
    return ap


_WEIGHT_FILES = ("*.safetensors", "*.bin", "*.safetensors.index.json", "*.bin.index.json", "*.pt",
                 "*.pth", "*.gguf")


def _weight_files(d: str) -> List[str]:
    import glob
    return [f for p in _WEIGHT_FILES for f in glob.glob(os.path.join(glob.escape(d), p))]


def _same_file(a: str, b: str) -> bool:
    try:
        return os.path.samefile(a, b)
    except OSError:  # a dangling link is no file of the base model
        return False


def check_export_target(to: str, base_models, overwrite: bool) -> None:
    """Refuse to export into a base model directory of the run (``base_models``: the one its
    checkpoint records and the --model given, if any; w0: the run could never be resumed or exported
    again), by any path or through a weights file that is the same file as one of theirs (a hard or
    symbolic link); or into a directory that holds weights unless ``overwrite``."""
    if isinstance(base_models, str):
        base_models = [base_models]
    if os.path.exists(to) and not os.path.isdir(to):
        raise ValueError(f"--to {to} exists and is not a directory")
    held = _weight_files(to)
    for base in base_models:
        if os.path.realpath(to) == os.path.realpath(base) or (
                os.path.isdir(to) and os.path.isdir(base) and os.path.samefile(to, base)):
            raise ValueError(f"--to {to} is the run's base model directory: exporting there would "
                             "overwrite w0 (choose another directory)")
        for mine in held:
            for theirs in _weight_files(base):
                if _same_file(mine, theirs):
                    raise ValueError(
                        f"--to {to}: {os.path.basename(mine)} is the same file as the base model's "
                        f"{theirs} (a link): exporting there would overwrite w0 (choose another "
                        "directory)")
    if held and not overwrite:
        raise ValueError(f"--to {to} already holds weights ({os.path.basename(sorted(held)[0])}); "
                         "pass --overwrite to replace them")


def check_device(device: str) -> None:
    """One-line ValueError for a torch device that does not exist or is not available here."""
    import torch
    try:
        dev = torch.device(device)
    except (RuntimeError, ValueError, TypeError):
        raise ValueError(f"--device {device!r} is not a torch device (e.g. cpu, cuda, cuda:1)") from None
    if dev.type == "cpu":
        return
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"--device {device}: this torch has no usable CUDA device "
                             f"(torch {torch.__version__}); use --device cpu")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise ValueError(f"--device {device}: only {torch.cuda.device_count()} CUDA device(s)")
        return
    mod = getattr(torch.backends, dev.type, None) if dev.type == "mps" else getattr(torch, dev.type,
                                                                                      None)
    if mod is None or not getattr(mod, "is_available", lambda: False)():
        raise ValueError(f"--device {device}: device type {dev.type!r} is not available here")


def check_backend(backend: Optional[str]) -> None:
    """One-line ValueError for a kseed_kernels backend that is unknown or not usable here."""
    if backend is None:
        return
    import kseed_kernels
    usable = kseed_kernels.backends()
    if backend not in usable:
        raise ValueError(f"--backend {backend!r} is not usable here; choose one of "
                         f"{', '.join(usable)}")


def check_method_options(given: dict, method: str) -> None:
    """ValueError naming the method and the first given option it does not use (the options of the
    other methods' groups, and the shared options the method ignores, e.g. MeZO's federation)."""
    from .methods import get
    from .methods.base import METHOD_FIELDS
    m = get(method)
    unused = (METHOD_FIELDS - m.options) | m.ignores
    for f in dataclasses.fields(FedConfig):  # in the config's order: one line, the first one
        if f.name in given and f.name in unused:
            flag = next((o[0][0] for o in _OPTIONS if o[1] == f.name),
                        next((o[0] for o in _FLAGS if o[1] == f.name), f.name))
            raise ValueError(f"--method {method} does not use {flag}")


def resolve_config(args, base: Optional[FedConfig] = None) -> FedConfig:
    """FedConfig from the parsed flags over ``base`` (a checkpoint's config on --resume)."""
    given = {f.name: getattr(args, f.name) for f in dataclasses.fields(FedConfig)
             if getattr(args, f.name, None) is not None}
    if given.get("model") is not None:  # ORG/NAME: its snapshot in the local hub cache (a path)
        from .hub import resolve
        given["model"] = resolve(given["model"], getattr(args, "revision", "main"))
    if given.get("data") is not None:  # ORG/NAME: a data set's snapshot in the local hub cache
        from .hub import is_hub_name, resolve
        if is_hub_name(given["data"]):
            given["data"] = resolve(given["data"], "main", kind="dataset")
            given.setdefault("dataset", "hf")
    from .methods import ALIASES, get
    if given.get("method") in ALIASES:
        name, sets = ALIASES[given["method"]]
        for k, v in sets.items():
            if given.get(k, v) != v:
                raise ValueError(f"--method {given['method']} is --method {name} with "
                                 f"--{k.replace('_', '-')} {v}, not {given[k]}")
        given = {**given, **sets, "method": name}
    check_method_options(given, given.get("method", base.method if base is not None else _D.method))
    if base is not None:
        for name in ("model", "data"):  # the same directory by another path is the same
            v, b = given.get(name), getattr(base, name)
            if v is not None and b is not None and os.path.realpath(v) == os.path.realpath(b):
                given[name] = b
            elif v is not None:  # a moved model (its hash is checked when the run is restored)
                given[name] = os.path.abspath(v)
        from .rounds import check_resume_config  # the one rule for what a resumed run may change
        from .task import check_evaluation
        from .task import resolve_dtype
        cfg = resolve_dtype(dataclasses.replace(base, **given))
        check_resume_config(base, cfg)
        check_evaluation(cfg)
        return cfg
    cfg = dataclasses.replace(FedConfig(), **get(given.get("method", _D.method)).configure(given))
    if "dataset" not in given:
        from .datasets import is_saved_dataset, is_table_source, looks_like_dolly
        if cfg.data is None:
            cfg.dataset = "embedded"
        elif (is_saved_dataset(cfg.data) or cfg.columns is not None
              or (os.path.isfile(cfg.data) and is_table_source(cfg.data)
                  and not (cfg.data.lower().endswith(".jsonl") and looks_like_dolly(cfg.data)))):
            cfg.dataset = "hf"
        else:
            cfg.dataset = "ni" if os.path.isdir(cfg.data) else "dolly"
    if cfg.dataset == "embedded" and cfg.data is not None:
        raise ValueError("--data was given with --dataset embedded; choose dolly, ni or hf")
    if cfg.columns is not None and cfg.dataset != "hf":
        raise ValueError(f"--columns maps the columns of --dataset hf, not {cfg.dataset}")
    if cfg.data is not None and not os.path.exists(cfg.data):
        raise ValueError(f"--data {cfg.data}: no such file or directory")
    if cfg.model is not None:
        cfg.model = os.path.abspath(cfg.model)
    if cfg.data is not None:
        cfg.data = os.path.abspath(cfg.data)
    from .task import check_evaluation, resolve_dtype
    check_evaluation(cfg)
    cfg = resolve_dtype(cfg)  # dtype auto: the model's own; rounding auto: stochastic for 16-bit
    fixed = get(cfg.method).fixed  # e.g. MeZO's one client, which holds every task's examples
    if cfg.dataset == "ni" and "num_clients" not in given and "num_clients" not in fixed:
        from .datasets import load_natural_instructions
        cfg.num_clients = len(load_natural_instructions(cfg.data, seed=cfg.seed)[0])
        if "clients_per_round" not in given:
            cfg.clients_per_round = min(cfg.clients_per_round, cfg.num_clients)
    return cfg.validate()


def _fail(msg: str) -> int:
    print(f"kseed-fed: error: {msg}", file=sys.stderr)
    return 2


def main(argv: Optional[List[str]] = None) -> int:
    try:
        return _main(argv)
    except KeyboardInterrupt:  # during start-up (imports, data, model): nothing was written
        return _fail("interrupted during start-up; nothing was written")


def _interrupted(out: Optional[str]) -> int:
    from .simulation import CHECKPOINT
    if out is not None and os.path.isfile(os.path.join(out, CHECKPOINT)):
        return _fail("interrupted; the last completed round's checkpoint is kept (--resume)")
    return _fail("interrupted before the first checkpoint; nothing to resume")


def _main(argv: Optional[List[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    logging.basicConfig(level=logging.WARNING, format="kseed-fed: %(message)s")
    for name in ("transformers", "transformers.modeling_utils"):
        logging.getLogger(name).setLevel(logging.ERROR)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    from .datasets import DataError
    from .modeling import EMBEDDED_DIR, ModelError
    from .protocol import ProtocolError
    from .simulation import CheckpointError, checkpoint_config, export, run
    errors = (DataError, ModelError, CheckpointError, ProtocolError, ValueError, OSError)
    out = None
    try:
        if argv and argv[0] == "export":
            a = _export_parser().parse_args(argv[1:])
            check_device(a.device)
            check_backend(a.backend)
            if a.model is not None:
                from .hub import resolve
                a.model = resolve(a.model, a.revision)
            try:
                recorded = checkpoint_config(a.out).model or EMBEDDED_DIR
                check_export_target(a.to, [recorded] + ([a.model] if a.model else []), a.overwrite)
                info = export(a.out, a.to, model_path=a.model, device=a.device, backend=a.backend)
            except KeyboardInterrupt:  # export writes a temp directory and moves it in at the end
                return _fail(f"export interrupted; nothing was written to {a.to}")
            print(f"kseed-fed: exported round {info['round']} of {a.out} to {a.to}")
            return 0
        args = _parser().parse_args(argv)
        check_device(args.device)
        check_backend(args.backend)
        try:
            import transformers
            transformers.logging.set_verbosity_error()
            transformers.utils.logging.disable_progress_bar()
        except Exception:  # pragma: no cover
            pass
        if args.out is None:
            if args.resume:
                raise ValueError("--resume needs --out DIR (the run to continue)")
            import time as _time
            stem = os.path.join("runs", "kseed-" + _time.strftime("%Y%m%d-%H%M%S"))
            args.out, n = stem, 1
            while os.path.exists(args.out):
                n += 1
                args.out = f"{stem}-{n}"
        base = checkpoint_config(args.out) if args.resume else None
        cfg = resolve_config(args, base)
        if args.threads < 0:
            raise ValueError(f"--threads must be >= 0, got {args.threads}")
        if args.threads or cfg.model is None:
            import torch
            torch.set_num_threads(args.threads or 1)
        out = args.out
        s = run(cfg, args.out, resume=args.resume, device=args.device, backend=args.backend,
                progress=not args.quiet, tensorboard=args.tensorboard)
    except errors as exc:
        return _fail(str(exc).splitlines()[0] if str(exc) else type(exc).__name__)
    except KeyboardInterrupt:
        return _interrupted(out)
    print(_final_line(s, args.out))
    return 0


def _loss(v) -> str:
    return "n/a" if v is None else f"{v:.4f}"


def _final_line(s: dict, out: str) -> str:
    """The one line a finished run prints (every summary value may be null)."""
    msg = f"kseed-fed: {s['rounds']} rounds; held-out loss ({s['held_out']}) "
    msg += f"{_loss(s['eval_loss_first'])} -> "
    if s.get("diverged"):
        msg += "diverged (not finite)"
        if s.get("eval_loss_last_finite_round") is not None:
            msg += (f"; last finite {_loss(s['eval_loss_last_finite'])} at round "
                    f"{s['eval_loss_last_finite_round']}")
    else:
        msg += _loss(s["eval_loss_last"])
        if s.get("eval_loss_drop_pct") is not None:
            msg += f" ({s['eval_loss_drop_pct']:+.1f}% drop)"
    if s["rouge_l"] is not None:
        msg += f"; Rouge-L {s['rouge_l']:.4f} on {s['rouge_examples']} examples"
    msg += (f"; bytes down {s['bytes_down_total']}, up {s['bytes_up_total']}; "
            f"{s['seconds_this_process']:.1f}s; outputs in {out}")
    return msg


if __name__ == "__main__":
    sys.exit(main())
