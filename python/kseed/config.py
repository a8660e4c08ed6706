"""The run configuration shared by the server, the clients and the simulation (one dataclass)."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Optional


@dataclass
class FedConfig:
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
    lr: float = 1e-4
    eps: float = 1e-3
    sampling: str = "uniform"  # or "pro"
    pro_clip: float = 1000.0
    clientwise_lr: bool = False  # FedMeZO-style client-wise learning rates
    batch_size: int = 8
    max_length: int = 128
    # data and model
    model: Optional[str] = None  # None: the embedded model
    data: Optional[str] = None  # None: the embedded generator
    dataset: str = "embedded"  # embedded | dolly | ni
    partition: str = "dirichlet"  # dirichlet | iid (NI: one client per task)
    alpha: float = 0.5
    min_per_client: int = 10
    eval_category: Optional[str] = None
    eval_size: int = 64
    embedded_examples: int = 2000
    dtype: str = "fp32"
    rounding: str = "nearest"
    # evaluation
    eval_every: int = 1
    rouge_every: int = 0  # 0: Rouge-L only at the end
    rouge_size: int = 16
    max_new_tokens: int = 32

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "FedConfig":
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - names
        if unknown:
            raise ValueError(f"unknown config fields: {sorted(unknown)}")
        return cls(**d)

    def validate(self) -> "FedConfig":
        def pos(name, strict=True):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or (v <= 0 if strict else v < 0):
                raise ValueError(f"--{name.replace('_', '-')} must be {'> 0' if strict else '>= 0'}, "
                                 f"got {v!r}")
        for n in ("rounds", "num_clients", "clients_per_round", "num_seeds", "batch_size",
                  "max_length", "eps", "eval_size", "pro_clip", "alpha"):
            pos(n)
        for n in ("local_steps", "seed", "min_replies", "min_per_client", "eval_every", "rouge_every",
                  "rouge_size", "max_new_tokens"):
            pos(n, strict=False)
        if self.clients_per_round > self.num_clients:
            raise ValueError(f"--clients-per-round ({self.clients_per_round}) is more than "
                             f"--num-clients ({self.num_clients})")
        if self.min_replies > self.clients_per_round:
            raise ValueError(f"--min-replies ({self.min_replies}) is more than --clients-per-round "
                             f"({self.clients_per_round})")
        if self.sampling not in ("uniform", "pro"):
            raise ValueError(f"--sampling must be uniform or pro, got {self.sampling!r}")
        if self.dataset not in ("embedded", "dolly", "ni"):
            raise ValueError(f"--dataset must be embedded, dolly or ni, got {self.dataset!r}")
        if self.partition not in ("dirichlet", "iid"):
            raise ValueError(f"--partition must be dirichlet or iid, got {self.partition!r}")
        if self.dtype not in ("fp32", "bf16", "fp16"):
            raise ValueError(f"--dtype must be fp32, bf16 or fp16, got {self.dtype!r}")
        if self.rounding not in ("nearest", "stochastic"):
            raise ValueError(f"--rounding must be nearest or stochastic, got {self.rounding!r}")
        if self.max_length < 8:
            raise ValueError("--max-length must be >= 8")
        return self
