"""The common expert: pretrained once on a public split, frozen, cached by config hash.

Early stopping reads a validation slice of the public split only: the test split holds
the unseen test clients' images, so stopping on it would leak them into every method.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import IO

import numpy as np
import torch
import torch.nn.functional as F

from .models import Classifier, build_model, pick_device

log = logging.getLogger(__name__)

# Share of the public split kept aside to decide when pretraining stops.
PUBLIC_VALIDATION_SHARE = 0.2


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
    validation: tuple[torch.Tensor, torch.Tensor],
    target_acc: float,
    max_epochs: int,
    seed: int,
    lr: float = 0.05,
    batch_size: int = 128,
    check_every: int = 10,
) -> float:
    """Train ``model`` until its accuracy on ``validation`` reaches ``target_acc``.

    Accuracy is checked every ``check_every`` steps so training stops close to the
    target (the paper's common experts are checkpoints stopped at a given accuracy).

    Returns
    -------
    float
        The validation accuracy reached (may stay below the target after ``max_epochs``).
    """
    device = pick_device()
    model.to(device)
    generator = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9)
    x, y = train
    acc, step = accuracy(model, *validation), 0
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
                acc = accuracy(model, *validation)
                model.train()
                if acc >= target_acc:
                    break
        else:
            acc = accuracy(model, *validation)
        log.info("common expert: epoch %d, validation accuracy %.4f", epoch + 1, acc)
    model.cpu().eval()
    return acc


def cache_key(settings: dict, public_indices: np.ndarray) -> str:
    """A hash of everything that determines the common expert."""
    stopping = {"stops-on": "public-validation", "share": PUBLIC_VALIDATION_SHARE}
    blob = json.dumps({**settings, **stopping}, sort_keys=True).encode() + np.asarray(public_indices).tobytes()
    return hashlib.sha256(blob).hexdigest()[:16]


def split_public(public_indices: np.ndarray, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """The public split's training part and the validation slice that stops pretraining."""
    order = np.random.default_rng(seed).permutation(np.asarray(public_indices))
    cut = int(round(PUBLIC_VALIDATION_SHARE * len(order)))
    return np.sort(order[cut:]), np.sort(order[:cut])


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
        The loaded dataset; only its training split is read (``train_x``, ``train_y``).
    public_indices : np.ndarray
        Training-split indices held out from all clients.
    cache_dir : path
        Where checkpoints are kept, one file per configuration hash.

    Returns
    -------
    tuple[Classifier, float, Path]
        The frozen model, its accuracy on the public validation slice and the
        checkpoint path.
    """
    path = Path(cache_dir).expanduser() / f"common-expert-{cache_key(settings, public_indices)}.pt"
    torch.manual_seed(settings["seed"])
    model = build_model(settings["arch"], dataset.input_shape, dataset.num_classes, settings["hidden"])
    if path.exists():
        checkpoint = torch.load(path, weights_only=True)
        model.load_state_dict(checkpoint["state_dict"])
        log.info("common expert: loaded %s (accuracy %.4f)", path, checkpoint["accuracy"])
        return model.eval(), float(checkpoint["accuracy"]), path
    fit, validation = (torch.as_tensor(i, dtype=torch.long) for i in split_public(public_indices, settings["seed"]))
    acc = pretrain(
        model,
        (dataset.train_x[fit], dataset.train_y[fit]),
        (dataset.train_x[validation], dataset.train_y[validation]),
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


def write_atomically(path: Path, write: Callable[[IO[bytes]], None]) -> None:
    """``write(file)`` into a private temporary file beside ``path``, then rename: a crash
    leaves no half file, and writers racing for the same path never share one."""
    with tempfile.NamedTemporaryFile(dir=path.parent, suffix=".tmp", delete=False) as tmp:
        try:
            write(tmp)
        except BaseException:
            os.unlink(tmp.name)
            raise
    os.replace(tmp.name, path)


def save_atomically(obj: object, path: Path) -> None:
    """``torch.save`` to ``path`` with :func:`write_atomically`."""
    write_atomically(path, lambda file: torch.save(obj, file))
