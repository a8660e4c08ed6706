"""The run configuration shared by the server, the clients and the simulation (one dataclass)."""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Optional

from .methods import NAMES as METHODS  # the registered methods (kseed.methods; a light import)

# Largest accepted --lr / --eps: zeroth-order step sizes in use are 1e-7..1e-3 (MeZO, FedKSeed) and
# perturbations 1e-4..1e-2; a value above 1 is a typo (e.g. 1e30), not a setting.
MAX_LR = 1.0
MAX_EPS = 1.0
LR_RULES = ("fedmezo", "ratio")
LR_SIGNALS = ("round-wise", "five-round", "model-diff")
RATIO_CLIP = (0.5, 2.0)  # the ratio rule's factor (last loss / mean loss) is clipped to this range
PROMPTS = ("auto", "reference", "alpaca")
SAMPLINGS = ("uniform", "pro")
DATASETS = ("embedded", "dolly", "ni", "hf")  # hf: a `datasets` source (kseed[hf])
PARTITIONS = ("dirichlet", "iid")
DTYPES = ("auto", "fp32", "bf16", "fp16")  # auto: the checkpoint's own (kseed.task.resolve_dtype)
ROUNDINGS = ("auto", "nearest", "stochastic")  # auto: stochastic for 16-bit weights, else nearest
NOISES = ("gaussian", "rademacher")  # the perturbation family (docs/SPEC.md; issue #12)
# The options with a fixed set of values (FedConfig field -> its values): validate() and kseed-fed's
# argument parser both read this.
OPTIMIZERS = ("sgd", "adamw")  # Ferret's local first-order optimizer
CHOICES = {"method": METHODS, "sampling": SAMPLINGS, "optimizer": OPTIMIZERS, "dataset": DATASETS, "partition": PARTITIONS,
           "dtype": DTYPES,
           "rounding": ROUNDINGS, "noise": NOISES, "lr_rule": LR_RULES, "lr_signal": LR_SIGNALS,
           "prompt": PROMPTS}

# Values for fields an older checkpoint does not have: they reproduce what that run did (no
# aggregation bounds, kseed's own client-wise lr rule, the Alpaca prompt), so it resumes bitwise.
LEGACY = {"g_clip": 0.0, "g_clip_abs": 0.0, "norm_bound": 0.0, "weight_cap": 0.0, "loss_cap": 0.0,
          "lr_rule": "ratio", "prompt": "alpaca", "noise": "gaussian", "method": "fedkseed"}


@dataclass
class FedConfig:
    # the federated method (kseed.methods): fedkseed | fedmezo | mezo
    method: str = "fedkseed"
    # federation
    rounds: int = 10
    num_clients: int = 8
    clients_per_round: int = 2
    seed: int = 42
    min_replies: int = 1
    equal_weights: bool = False
    # FedKSeed
    num_seeds: int = 256
    local_steps: int = 100
    lr: float = 5e-5  # the embedded default's best of 3e-5, 5e-5, 1e-4 over 20 seeds (docs/DRIVER.md)
    eps: float = 1e-3
    sampling: str = "uniform"  # or "pro"
    pro_clip: float = 1000.0
    clientwise_lr: bool = False  # client-wise learning rates (FedMeZO)
    lr_rule: str = "fedmezo"  # fedmezo: lr0 + delta (s_i - mean s) / max|s_j - mean s| | ratio
    lr_signal: str = "model-diff"  # s_i of the fedmezo rule: round-wise | five-round | model-diff
    lr_delta: float = 0.5  # the fedmezo rule's delta as a fraction of --lr (FedMeZO: 5e-6 / 1e-5)
    batch_size: int = 8
    max_length: int = 128
    # Ferret (kseed.methods.ferret): first-order local steps projected onto the seed pool
    optimizer: str = "sgd"  # sgd (momentum 0, Ferret's) | adamw
    n_accum: int = 1  # micro-batches accumulated per local step
    grad_clip: float = 0.0  # gradient-norm clip of each local step (0: off)
    grad_checkpointing: bool = False  # activation checkpointing in the local steps (memory)
    server_lr: float = 1.0  # Ferret's server step size slr
    seed_clip: float = 10.0  # Ferret's norm clip of each seed's rebuilt update (0: off)
    # LoRA (kseed.methods.fedit, fedpipe; kseed.lora): the adapters' settings
    lora_rank: int = 8
    lora_alpha: float = 16.0  # the adapter's scale is alpha / rank (peft's)
    lora_dropout: float = 0.05
    lora_targets: str = "q_proj,k_proj,v_proj,o_proj"  # module names (or name suffixes) adapted
    # FedPipe (kseed.methods.fedpipe): weight selection and the clients' memory budgets
    select_fraction: float = 0.5  # the top fraction of the candidate weights adapted
    calib_size: int = 16  # calibration examples of the selection scores
    client_budgets: str = ""  # MiB per client, comma-separated, cycled over the ids ("": none)
    # aggregation bounds (one client's influence per round; 0 = off; see README "Threat model")
    g_clip: float = 20.0  # |g| <= g_clip x the round's lower median of the clients' median |g|
    g_clip_abs: float = 0.0  # a fixed bound on |g| as well
    norm_bound: float = 1.5  # client update norm <= norm_bound x the round's lower median norm
    weight_cap: float = 4.0  # claimed examples <= weight_cap x the round's lower median claim
    loss_cap: float = 4.0  # reported loss clipped to [0, loss_cap x the round's lower median]
    # data and model
    model: Optional[str] = None  # None: the embedded model
    data: Optional[str] = None  # None: the embedded generator
    dataset: str = "embedded"  # embedded | dolly | ni | hf
    # hf: FIELD=COLUMN,... (fields instruction, input, output, category); None: Alpaca's / Dolly's
    columns: Optional[str] = None
    partition: str = "dirichlet"  # dirichlet | iid (NI: one client per task)
    alpha: float = 0.5
    min_per_client: int = 10
    eval_category: Optional[str] = None
    eval_size: int = 64
    embedded_examples: int = 2000
    dtype: str = "auto"  # auto | fp32 | bf16 | fp16; auto becomes the checkpoint's own dtype
    rounding: str = "auto"  # auto | nearest | stochastic; auto: stochastic for bf16 / fp16
    # the direction family of every perturbation and update: gaussian (the paper's) | rademacher
    noise: str = "gaussian"
    # reference (the FedKSeed code's Dolly/NI template) | alpaca | auto: the template the data's base
    # model was built for (reference for Dolly / NI, alpaca for the embedded model; see prompt_template)
    prompt: str = "auto"
    # evaluation
    eval_every: int = 1
    rouge_every: int = 0  # 0: Rouge-L only at the end
    rouge_size: int = 16
    max_new_tokens: int = 32

    def prompt_template(self) -> str:
        """The prompt template this run uses: ``prompt`` unless it is "auto", which gives the
        reference code's template for Dolly and Natural Instructions and the Alpaca wording for the
        embedded dataset, whose base model's tokenizer was built on that wording (a template the
        tokenizer never saw costs the base model a large part of what the federation learns)."""
        if self.prompt != "auto":
            return self.prompt
        return "alpaca" if self.dataset == "embedded" else "reference"

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "FedConfig":
        """From to_dict(); fields missing from an older run's dict take their LEGACY values."""
        if not isinstance(d, dict):
            raise ValueError(f"config must be a mapping, got {type(d).__name__}")
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - names
        if unknown:
            raise ValueError(f"unknown config fields: {sorted(unknown)}")
        return cls(**{**{k: v for k, v in LEGACY.items() if k not in d}, **d})

    def validate(self) -> "FedConfig":
        """Check every field (types, ranges, NaN/inf); ValueError naming the flag."""
        def flag(name):
            return "--" + name.replace("_", "-")

        def num(name, lo=None, strict=True, hi=None, kind=(int, float)):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, kind):
                raise ValueError(f"{flag(name)} must be a number, got {v!r}")
            if isinstance(v, float) and not math.isfinite(v):
                raise ValueError(f"{flag(name)} must be finite, got {v!r}")
            if lo is not None and (v <= lo if strict else v < lo):
                raise ValueError(f"{flag(name)} must be {'>' if strict else '>='} {lo}, got {v!r}")
            if hi is not None and v > hi:
                raise ValueError(f"{flag(name)} must be <= {hi}, got {v!r}")

        for n in ("rounds", "num_clients", "clients_per_round", "num_seeds", "batch_size",
                  "max_length", "eval_size", "embedded_examples"):
            num(n, 0, kind=int)
        for n in ("local_steps", "seed", "min_replies", "min_per_client", "eval_every", "rouge_every",
                  "rouge_size", "max_new_tokens"):
            num(n, 0, strict=False, kind=int)
        num("lr", 0, hi=MAX_LR)
        num("eps", 0, hi=MAX_EPS)
        for n in ("pro_clip", "alpha", "server_lr"):
            num(n, 0)
        num("n_accum", 0, kind=int)
        for n in ("grad_clip", "seed_clip"):
            num(n, 0, strict=False)
        num("lr_delta", 0, strict=False, hi=0.99)
        num("lora_rank", 0, hi=4096, kind=int)
        num("lora_alpha", 0)
        num("lora_dropout", 0, strict=False, hi=0.9)
        if not isinstance(self.lora_targets, str):
            raise ValueError(f"--lora-targets must be a string, got {self.lora_targets!r}")
        from .lora import parse_targets  # no peft here: the names only
        parse_targets(self.lora_targets)
        num("select_fraction", 0, hi=1.0)
        num("calib_size", 0, kind=int)
        if not isinstance(self.client_budgets, str):
            raise ValueError(f"--client-budgets must be a string, got {self.client_budgets!r}")
        from .methods.fedpipe import parse_budgets
        parse_budgets(self.client_budgets)
        for n in ("g_clip", "g_clip_abs", "norm_bound", "weight_cap", "loss_cap"):
            num(n, 0, strict=False)
            if n != "g_clip_abs" and 0 < getattr(self, n) < 1:
                raise ValueError(f"{flag(n)} must be 0 (off) or >= 1 (a multiple of the round's "
                                 f"median), got {getattr(self, n)!r}")
        if self.clients_per_round > self.num_clients:
            raise ValueError(f"--clients-per-round ({self.clients_per_round}) is more than "
                             f"--num-clients ({self.num_clients})")
        if self.min_replies > self.clients_per_round:
            raise ValueError(f"--min-replies ({self.min_replies}) is more than --clients-per-round "
                             f"({self.clients_per_round})")
        for n, choices in CHOICES.items():
            if getattr(self, n) not in choices:
                raise ValueError(f"{flag(n)} must be {' | '.join(choices)}, got "
                                 f"{getattr(self, n)!r}")
        for n in ("equal_weights", "clientwise_lr", "grad_checkpointing"):
            if not isinstance(getattr(self, n), bool):
                raise ValueError(f"{flag(n)} must be true or false, got {getattr(self, n)!r}")
        for n in ("model", "data", "eval_category", "columns"):
            if getattr(self, n) is not None and not isinstance(getattr(self, n), str):
                raise ValueError(f"{flag(n)} must be a string, got {getattr(self, n)!r}")
        from .methods import get
        for n, v in get(self.method).fixed.items():
            if getattr(self, n) != v:
                raise ValueError(f"--method {self.method} needs {flag(n)} {v}, got "
                                 f"{getattr(self, n)!r}")
        if self.columns is not None:
            from .datasets import parse_columns
            parse_columns(self.columns)
        if self.max_length < 8:
            raise ValueError("--max-length must be >= 8")
        return self
