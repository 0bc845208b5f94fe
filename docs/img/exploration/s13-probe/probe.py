"""Offline probe of issue 10 (session 13): heads on the common expert's frozen embeddings
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
over = sys.argv[1:]
args = parse_args(["--run-config", *over])
cfg = resolve_config(args, 0)
dataset, common, _ = build_common_expert(cfg)
_, plan = partitioned(cfg)
tr = np.concatenate([plan.train_indices[i] for i in range(plan.num_train_clients)])
X, Y = dataset.train_x[tr], dataset.train_y[tr]
tests = [i for i in range(len(plan.eval_indices)) if i >= plan.num_train_clients]
evx = dataset.test_x if plan.eval_split != "train" else dataset.train_x
evy = dataset.test_y if plan.eval_split != "train" else dataset.train_y
common.eval()
with torch.no_grad():
    E = common.embed(X)


def score(f):
    accs = []
    with torch.no_grad():
        for i in tests:
            idx = torch.as_tensor(plan.eval_indices[i])
            accs.append(float((f(evx[idx]).argmax(1) == evy[idx]).float().mean()))
    return np.mean(accs)


print("common", score(common))


def train(model, inp, epochs=5, lr=0.03, bs=32):
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9)
    g = torch.Generator().manual_seed(0)
    for _ep in range(epochs):
        perm = torch.randperm(len(inp), generator=g)
        for s in range(0, len(inp), bs):
            i = perm[s : s + bs]
            loss = F.cross_entropy(model(inp[i]), Y[i])
            opt.zero_grad()
            loss.backward()
            opt.step()


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
