"""The server's built-in strategies and aggregation rules (Flower 1.42's), registered in
:data:`privseg.core.plugins.STRATEGIES` and :data:`privseg.core.plugins.AGGREGATIONS`.

Each gives a Flower strategy class and its own arguments; :func:`privseg.federated.strategy.
make_strategy` adds the site-aware behaviour (per-site metrics, max epsilon, refusals) on top.
"""

from __future__ import annotations

from typing import Any

from flwr.serverapp.strategy import (
    Bulyan,
    FedAdam,
    FedAvg,
    FedMedian,
    FedProx,
    FedTrimmedAvg,
    Krum,
    MultiKrum,
    Strategy,
)

from privseg.config import Config, FederatedConfig
from privseg.core.plugins import AGGREGATIONS

Built = tuple[type[Strategy], dict[str, Any]]


def aggregation(fed: FederatedConfig) -> Built:
    """The rule ``federated.aggregation`` names."""
    built: Built = AGGREGATIONS.get(fed.aggregation)(fed)
    return built


# ---- federated.strategy ------------------------------------------------------------------
def fedavg(cfg: Config) -> Built:
    return aggregation(cfg.federated)


def fedprox(cfg: Config) -> Built:
    """The server side is FedAvg (or the robust rule); the sites add the proximal term."""
    if cfg.federated.aggregation != "mean":
        return aggregation(cfg.federated)
    return FedProx, {"proximal_mu": cfg.federated.proximal_mu}


def fedadam(cfg: Config) -> Built:
    """Adam on the mean update (the config allows only ``aggregation = "mean"`` here)."""
    return FedAdam, {"eta": cfg.federated.server_lr, "eta_l": cfg.train.lr}


# ---- federated.aggregation ---------------------------------------------------------------
def mean(fed: FederatedConfig) -> Built:
    return FedAvg, {}


def median(fed: FederatedConfig) -> Built:
    return FedMedian, {}


def trimmed_mean(fed: FederatedConfig) -> Built:
    return FedTrimmedAvg, {"beta": fed.trim_fraction}


def krum(fed: FederatedConfig) -> Built:
    return Krum, {"num_malicious_nodes": fed.malicious_sites}


def multikrum(fed: FederatedConfig) -> Built:
    return MultiKrum, {
        "num_malicious_nodes": fed.malicious_sites,
        "num_nodes_to_select": max(1, fed.min_sites - fed.malicious_sites),
    }


def bulyan(fed: FederatedConfig) -> Built:
    return Bulyan, {"num_malicious_nodes": fed.malicious_sites}
