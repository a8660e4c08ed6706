"""MeZO (Malladi et al., NeurIPS 2023), the centralised baseline: ONE client that holds all the
training data runs MeZO, on FedMeZO's code path (kseed.methods.fedmezo) with its configuration fixed:
one client sampled every round, so its model is the global model (FedAvg of one model), the history
holds its steps' (seed, -lr g) pairs round by round, and no aggregation bound applies (there is nobody
to bound it against)."""
from __future__ import annotations

from .base import Method
from .fedmezo import ZO_OPTIONS, FedMeZOClient, FedMeZOServer


class MeZOServer(FedMeZOServer):
    method = "mezo"


METHOD = Method(
    name="mezo",
    summary="MeZO: one client holding all the training data (FedMeZO with one client)",
    server=MeZOServer, client=FedMeZOClient,
    options=ZO_OPTIONS,
    ignores=frozenset({"num_clients", "clients_per_round", "partition", "alpha", "min_per_client",
                       "min_replies", "equal_weights", "g_clip", "g_clip_abs", "norm_bound",
                       "weight_cap", "loss_cap"}),
    fixed={"num_clients": 1, "clients_per_round": 1, "min_replies": 1, "g_clip": 0.0,
           "g_clip_abs": 0.0, "norm_bound": 0.0, "weight_cap": 0.0, "loss_cap": 0.0})
