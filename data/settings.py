"""Which run-config entries determine the data partition (shared by server and clients)."""

from __future__ import annotations

from collections.abc import Mapping


def partition_settings(cfg: Mapping) -> dict:
    """Keyword arguments of :func:`data.make_partition` taken from a run config."""
    return {
        "num_experts": int(cfg["num-experts"]),
        "num_train_clients": int(cfg["num-train-clients"]),
        "num_test_clients": int(cfg["num-test-clients"]),
        "labels_per_client": int(cfg["labels-per-client"]),
        "mode": str(cfg["partition-mode"]),
        "dirichlet_alpha": float(cfg["dirichlet-alpha"]),
        "samples_per_client": int(cfg["samples-per-client"]),
        "eval_samples_per_client": int(cfg["eval-samples-per-client"]),
        "public_fraction": float(cfg["public-fraction"]),
        "seed": int(cfg["seed"]),
    }
