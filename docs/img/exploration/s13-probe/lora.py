"""Offline probe of issue 10 (session 13): a LoRA update of the common expert's first layer
against fine-tuning it whole, centrally on the pooled training clients (output.txt)."""

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
args = parse_args(["--run-config", *sys.argv[1:]])
cfg = resolve_config(args, 0)
dataset, common, _ = build_common_expert(cfg)
_, plan = partitioned(cfg)
tr = np.concatenate([plan.train_indices[i] for i in range(plan.num_train_clients)])
X, Y = dataset.train_x[tr], dataset.train_y[tr]
tests = [i for i in range(len(plan.eval_indices)) if i >= plan.num_train_clients]
evx = dataset.test_x if plan.eval_split != "train" else dataset.train_x
evy = dataset.test_y if plan.eval_split != "train" else dataset.train_y


def score(f):
    accs = []
    with torch.no_grad():
        for i in tests:
            idx = torch.as_tensor(plan.eval_indices[i])
            accs.append(float((f(evx[idx]).argmax(1) == evy[idx]).float().mean()))
    return np.mean(accs)


class LoRA(nn.Module):
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


def train(model, epochs, lr=0.03, bs=32):
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=lr, momentum=0.9)
    g = torch.Generator().manual_seed(0)
    for _ep in range(epochs):
        perm = torch.randperm(len(X), generator=g)
        for s in range(0, len(X), bs):
            i = perm[s : s + bs]
            loss = F.cross_entropy(model(X[i]), Y[i])
            opt.zero_grad()
            loss.backward()
            opt.step()


for ep in (1, 3):
    full = copy.deepcopy(common)
    train(full, ep)
    print(ep, "full", round(score(full), 4))
    for r in (4, 16):
        m = LoRA(common, r)
        train(m, ep)
        print(ep, "lora", r, round(score(m), 4), sum(p.numel() for p in m.parameters() if p.requires_grad))
