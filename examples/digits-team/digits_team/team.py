"""The team's data and models: nothing here comes from the DDOME project."""

from functools import lru_cache

import torch
from sklearn.datasets import load_digits
from torch import nn

GROUPS = [(0, 1, 2), (3, 4, 5), (6, 7, 8, 9)]  # one expert per group of digits
NORMAL = [(0, 1), (1, 2), (0, 2), (1, 2), (0, 1), (0, 2)]  # groups of partitions 3..8
TEST = [(0, 1), (1, 2)]  # partitions 9, 10: label mixes of unseen clients


def role_of(partition_id: int) -> tuple[str, int]:
    """Partitions 0-2 anchor experts 0-2, 3-8 are normal clients, 9-10 unseen test clients."""
    if partition_id < len(GROUPS):
        return "anchor", partition_id
    return ("normal", -1) if partition_id < len(GROUPS) + len(NORMAL) else ("test", -1)


@lru_cache
def digits() -> tuple[torch.Tensor, torch.Tensor]:
    x, y = load_digits(return_X_y=True)
    order = torch.randperm(len(y), generator=torch.Generator().manual_seed(0))
    return torch.tensor(x, dtype=torch.float32)[order] / 16, torch.tensor(y)[order]


def public_data() -> tuple[torch.Tensor, torch.Tensor]:
    """What the server may use: the first 200 samples."""
    x, y = digits()
    return x[:200], y[:200]


def client_samples(partition_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The partition's samples: every 11th of the non-public samples of its label groups
    (the 11 partitions are disjoint)."""
    x, y = digits()
    mix = [partition_id] if partition_id < len(GROUPS) else (NORMAL + TEST)[partition_id - len(GROUPS)]
    labels = torch.tensor([label for g in mix for label in GROUPS[g]])
    rest = torch.arange(200, len(y))
    mine = rest[torch.isin(y[rest], labels)][partition_id::11]
    return x[mine], y[mine]


class Net(nn.Module):
    """The team's classifier: ``embed`` gives the features the gate routes on."""

    def __init__(self, hidden: int = 32) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Linear(64, hidden), nn.ReLU())
        self.head = nn.Linear(hidden, 10)

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(x))


def pretrained_common_expert(epochs: int = 50) -> Net:
    """The frozen common expert: trained on the public data only."""
    torch.manual_seed(0)
    model, (x, y) = Net(), public_data()
    optimizer = torch.optim.Adam(model.parameters(), lr=0.01)
    for _ in range(epochs):
        optimizer.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        optimizer.step()
    return model
