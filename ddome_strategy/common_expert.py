"""The common expert: pretrained once on a public split, frozen, cached by config hash."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from .models import Classifier, build_model, pick_device

log = logging.getLogger(__name__)


@torch.no_grad()
def accuracy(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, batch: int = 1024) -> float:
    """Top-1 accuracy of ``model`` on ``(x, y)``."""
    model.eval()
    device = next(model.parameters()).device
    correct = sum(
        int((model(x[i : i + batch].to(device)).argmax(1).cpu() == y[i : i + batch]).sum())
        for i in range(0, len(x), batch)
    )
    return correct / max(len(x), 1)


def pretrain(
    model: Classifier,
    train: tuple[torch.Tensor, torch.Tensor],
    test: tuple[torch.Tensor, torch.Tensor],
    target_acc: float,
    max_epochs: int,
    seed: int,
    lr: float = 0.05,
    batch_size: int = 128,
    check_every: int = 10,
) -> float:
    """Train ``model`` until its test accuracy reaches ``target_acc``.

    Accuracy is checked every ``check_every`` steps so training stops close to the
    target (the paper's common experts are checkpoints stopped at a given accuracy).

    Returns
    -------
    float
        The accuracy reached (may stay below the target after ``max_epochs``).
    """
    device = pick_device()
    model.to(device)
    generator = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9)
    x, y = train
    acc, step = accuracy(model, *test), 0
    for epoch in range(max_epochs):
        if acc >= target_acc:
            break
        order = torch.randperm(len(x), generator=generator)
        model.train()
        for i in range(0, len(x), batch_size):
            idx = order[i : i + batch_size]
            optimizer.zero_grad()
            F.cross_entropy(model(x[idx].to(device)), y[idx].to(device)).backward()
            optimizer.step()
            step += 1
            if step % check_every == 0:
                acc = accuracy(model, *test)
                model.train()
                if acc >= target_acc:
                    break
        else:
            acc = accuracy(model, *test)
        log.info("common expert: epoch %d, test accuracy %.4f", epoch + 1, acc)
    model.cpu().eval()
    return acc


def cache_key(settings: dict, public_indices: np.ndarray) -> str:
    """A hash of everything that determines the common expert."""
    blob = json.dumps(settings, sort_keys=True).encode() + np.asarray(public_indices).tobytes()
    return hashlib.sha256(blob).hexdigest()[:16]


def load_or_pretrain(
    settings: dict,
    dataset,
    public_indices: np.ndarray,
    cache_dir: str | os.PathLike,
) -> tuple[Classifier, float, Path]:
    """Return the common expert for ``settings``, pretraining and caching it if needed.

    Parameters
    ----------
    settings : dict
        ``arch``, ``hidden``, ``target_acc``, ``max_epochs``, ``seed`` and the dataset
        name: everything (with ``public_indices``) that determines the checkpoint.
    dataset
        The loaded dataset (``train_x``, ``train_y``, ``test_x``, ``test_y``).
    public_indices : np.ndarray
        Training-split indices held out from all clients.
    cache_dir : path
        Where checkpoints are kept, one file per configuration hash.

    Returns
    -------
    tuple[Classifier, float, Path]
        The frozen model, its test accuracy and the checkpoint path.
    """
    path = Path(cache_dir).expanduser() / f"common-expert-{cache_key(settings, public_indices)}.pt"
    torch.manual_seed(settings["seed"])
    model = build_model(settings["arch"], dataset.input_shape, dataset.num_classes, settings["hidden"])
    if path.exists():
        checkpoint = torch.load(path, weights_only=True)
        model.load_state_dict(checkpoint["state_dict"])
        log.info("common expert: loaded %s (accuracy %.4f)", path, checkpoint["accuracy"])
        return model.eval(), float(checkpoint["accuracy"]), path
    idx = torch.as_tensor(public_indices, dtype=torch.long)
    acc = pretrain(
        model,
        (dataset.train_x[idx], dataset.train_y[idx]),
        (dataset.test_x, dataset.test_y),
        settings["target_acc"],
        settings["max_epochs"],
        settings["seed"],
    )
    if acc < settings["target_acc"]:
        log.warning(
            "common expert reached %.4f < common-expert-target-acc %.4f after %d epochs",
            acc,
            settings["target_acc"],
            settings["max_epochs"],
        )
    path.parent.mkdir(parents=True, exist_ok=True)
    save_atomically({"state_dict": model.state_dict(), "accuracy": acc}, path)
    return model, acc, path


def save_atomically(obj: object, path: Path) -> None:
    """``torch.save`` to a temporary file, then rename: a crash leaves no half file."""
    with tempfile.NamedTemporaryFile(dir=path.parent, suffix=".tmp", delete=False) as tmp:
        try:
            torch.save(obj, tmp)
        except BaseException:
            os.unlink(tmp.name)
            raise
    os.replace(tmp.name, path)
