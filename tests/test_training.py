"""Local training: the gate learns to route on a toy problem with known specialisation."""

import torch
from torch import nn

from ddome_strategy.client import mean_gate_scores, train_local
from ddome_strategy.models import build_gate

CFG = {"momentum": 0.9, "lr": 0.05, "gate-lr": 0.05, "local-epochs": 1, "batch-size": 32}


def blobs(n=256, seed=0):
    """Two clusters of embeddings; inputs equal embeddings; cluster c has labels {2c, 2c+1}."""
    g = torch.Generator().manual_seed(seed)
    cluster = torch.randint(0, 2, (n,), generator=g)
    centers = torch.tensor([[3.0, 0.0], [-3.0, 0.0]])
    emb = centers[cluster] + 0.5 * torch.randn(n, 2, generator=g)
    sub = (emb[:, 1] > 0).long()
    return emb, cluster, 2 * cluster + sub


class Specialist(nn.Module):
    """Right on cluster ``c``'s labels, wrong elsewhere (predicts from the sign of y)."""

    def __init__(self, c):
        super().__init__()
        self.c = c
        self.dummy = nn.Parameter(torch.zeros(1))  # something for the optimiser

    def forward(self, x):
        logits = torch.full((len(x), 4), -5.0)
        logits[:, 2 * self.c] = -5 * x[:, 1]
        logits[:, 2 * self.c + 1] = 5 * x[:, 1]
        return logits + 0 * self.dummy


def routing_accuracy(gate, emb, cluster):
    return float((gate(emb).argmax(1) == cluster).float().mean())


def test_anchor_gate_loss_teaches_the_gate_which_expert_owns_which_cluster():
    torch.manual_seed(0)
    emb, cluster, y = blobs()
    gate = build_gate(2, 2, hidden=16)
    experts = {0: nn.Linear(2, 4), 1: nn.Linear(2, 4)}
    for r in range(5):
        for anchor in (0, 1):
            mine = cluster == anchor
            train_local(CFG, gate, {anchor: experts[anchor]}, emb[mine], emb[mine], y[mine], anchor, seed=r)
    assert routing_accuracy(gate, emb, cluster) > 0.95


def test_mixture_loss_alone_teaches_the_gate_to_pick_the_right_specialist():
    torch.manual_seed(0)
    emb, cluster, y = blobs()
    gate = build_gate(2, 2, hidden=16)
    before = routing_accuracy(gate, emb, cluster)
    experts = {0: Specialist(0), 1: Specialist(1)}
    for r in range(5):
        loss = train_local(CFG, gate, experts, emb, emb, y, None, seed=r)
    assert routing_accuracy(gate, emb, cluster) > 0.95 > before
    assert loss < 0.5
    # The routing reply of a client holding only cluster 1 ranks expert 1 first.
    assert mean_gate_scores(gate, emb[cluster == 1]).argmax() == 1
