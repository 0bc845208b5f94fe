"""Offline probes of issue 10 (session 13), centrally on the pooled training clients of seed 0
(output.txt): ``heads``: heads on the common expert's frozen embeddings; ``lora``: a low-rank
update of its first layer; each against fine-tuning the whole common expert.

    PYTHONPATH=. python docs/img/exploration/s13-probe/probe.py heads|lora [run-config overrides]
"""

import copy
import sys

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from benchmarks.compare import parse_args, resolve_config
from data.settings import partitioned
from server_app.app import build_common_expert

torch.set_num_threads(2)
mode, overrides = sys.argv[1], sys.argv[2:]
cfg = resolve_config(parse_args(["--run-config", *overrides]), 0)
dataset, common, _ = build_common_expert(cfg)
_, plan = partitioned(cfg)
tr = np.concatenate([plan.train_indices[i] for i in range(plan.num_train_clients)])
X, Y = dataset.train_x[tr], dataset.train_y[tr]
tests = [i for i in range(len(plan.eval_indices)) if i >= plan.num_train_clients]
evx = dataset.test_x if plan.eval_split != "train" else dataset.train_x
evy = dataset.test_y if plan.eval_split != "train" else dataset.train_y
common.eval()


def score(f):
    accs = []
    with torch.no_grad():
        for i in tests:
            idx = torch.as_tensor(plan.eval_indices[i])
            accs.append(float((f(evx[idx]).argmax(1) == evy[idx]).float().mean()))
    return np.mean(accs)


def train(model, inp, epochs, lr=0.03, bs=32):
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=lr, momentum=0.9)
    g = torch.Generator().manual_seed(0)
    for _ep in range(epochs):
        perm = torch.randperm(len(inp), generator=g)
        for s in range(0, len(inp), bs):
            i = perm[s : s + bs]
            loss = F.cross_entropy(model(inp[i]), Y[i])
            opt.zero_grad()
            loss.backward()
            opt.step()


class LoRA(nn.Module):
    """The common expert with its first layer frozen plus a trainable rank-``r`` update."""

    def __init__(self, base, r):
        super().__init__()
        self.base = copy.deepcopy(base)
        lin = self.base.body[1]
        for p in lin.parameters():
            p.requires_grad_(False)
        self.A = nn.Parameter(torch.randn(r, lin.in_features) / lin.in_features**0.5)
        self.B = nn.Parameter(torch.zeros(lin.out_features, r))
        self.bias = nn.Parameter(torch.zeros(lin.out_features))

    def forward(self, x):
        lin = self.base.body[1]
        x = x.flatten(1)
        h = F.relu(lin(x) + (x @ self.A.t()) @ self.B.t() + self.bias)
        return self.base.head(h)


if mode == "heads":
    with torch.no_grad():
        E = common.embed(X)
    print("common", score(common))
    for ep in (1, 3):
        head = copy.deepcopy(common.head)
        train(head, E, ep)
        print(ep, "linear head", score(lambda x: head(common.embed(x))))
        mlp = nn.Sequential(nn.Linear(E.shape[1], 256), nn.ReLU(), nn.Linear(256, 10))
        train(mlp, E, ep)
        print(ep, "mlp head", score(lambda x: mlp(common.embed(x))))
        full = copy.deepcopy(common)
        train(full, X, ep)
        print(ep, "full", score(full))
else:
    for ep in (1, 3):
        full = copy.deepcopy(common)
        train(full, X, ep)
        print(ep, "full", round(score(full), 4))
        for r in (4, 16):
            m = LoRA(common, r)
            train(m, X, ep)
            trainable = sum(p.numel() for p in m.parameters() if p.requires_grad)
            print(ep, "lora", r, round(score(m), 4), trainable)
