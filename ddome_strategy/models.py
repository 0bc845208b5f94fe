"""Model builders: the common expert, the experts and the gate.

Every task model is a :class:`Classifier` split into a ``body`` (input -> embedding)
and a linear ``head`` (embedding -> logits). The common expert's ``body`` output is the
embedding the gate routes on (the spec's choice: penultimate-layer features).
"""

from __future__ import annotations

import copy
import math

import torch
from torch import nn

ARCHITECTURES = ("mlp", "cnn", "resnet18", "resnet34")
# Those whose hidden width is a setting (ResNets ignore it), so a narrower generalist exists.
NARROWABLE = ("mlp", "cnn")


class Classifier(nn.Module):
    """A task model made of a feature ``body`` and a linear ``head``."""

    def __init__(self, body: nn.Module, feature_dim: int, num_classes: int) -> None:
        super().__init__()
        self.body = body
        self.feature_dim = feature_dim
        self.head = nn.Linear(feature_dim, num_classes)

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """Return the penultimate-layer features of ``x``."""
        return self.body(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(x))


def _mlp_body(input_shape: tuple[int, ...], hidden: int) -> tuple[nn.Module, int]:
    # The paper's EMNIST expert: a 2-layer MLP (one hidden layer + the head).
    body = nn.Sequential(nn.Flatten(), nn.Linear(math.prod(input_shape), hidden), nn.ReLU())
    return body, hidden


def _cnn_body(input_shape: tuple[int, ...], hidden: int) -> tuple[nn.Module, int]:
    channels, height, width = input_shape
    body = nn.Sequential(
        nn.Conv2d(channels, 32, 3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(32, 64, 3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(64 * (height // 4) * (width // 4), hidden),
        nn.ReLU(),
    )
    return body, hidden


def _resnet_body(input_shape: tuple[int, ...], depth: int) -> tuple[nn.Module, int]:
    # torchvision only here: importing it costs seconds, and MLP/CNN runs never need it.
    from torchvision.models import resnet18, resnet34

    net = (resnet18 if depth == 18 else resnet34)(weights=None)
    # The usual CIFAR adaptation: a 3x3 stem with stride 1 and no max-pool keeps
    # enough spatial resolution for 32x32 inputs.
    net.conv1 = nn.Conv2d(input_shape[0], 64, 3, stride=1, padding=1, bias=False)
    net.maxpool = nn.Identity()
    feature_dim = net.fc.in_features
    net.fc = nn.Identity()
    return net, feature_dim


def build_model(arch: str, input_shape: tuple[int, ...], num_classes: int, hidden: int = 128) -> Classifier:
    """Build a task model (common expert or expert) by architecture name.

    Parameters
    ----------
    arch : str
        One of :data:`ARCHITECTURES`.
    input_shape : tuple[int, ...]
        ``(channels, height, width)`` of one input sample.
    num_classes : int
        Number of output classes.
    hidden : int (default: 128)
        Hidden width of the MLP and of the CNN's last layer (ignored by ResNets).

    Returns
    -------
    Classifier
        The model, randomly initialised.
    """
    if arch == "mlp":
        body, dim = _mlp_body(input_shape, hidden)
    elif arch == "cnn":
        body, dim = _cnn_body(input_shape, hidden)
    elif arch in ("resnet18", "resnet34"):
        body, dim = _resnet_body(input_shape, int(arch[len("resnet") :]))
    else:
        raise ValueError(f"Unknown architecture {arch!r}; choose one of {', '.join(ARCHITECTURES)}.")
    return Classifier(body, dim, num_classes)


def generalist_hidden(hidden: int, width: float) -> int:
    """Hidden units of the generalist: ``width`` (a fraction) of the experts' ``hidden``."""
    return max(1, round(hidden * width))


def narrowed(model: Classifier, width: int) -> Classifier:
    """A copy of ``model`` with ``width`` units in its body's last hidden layer: the ones
    that matter most (norm of the weights into a unit times the norm of the head's weights
    out of it), so the copy starts close to the original.

    The narrow generalist starts this way from the common expert: half its units cost
    half its bytes. Works for bodies that end in a ``Linear`` and a ``ReLU`` (``mlp``,
    ``cnn``).
    """
    layers = list(model.body) if isinstance(model.body, nn.Sequential) else []
    if len(layers) < 2 or not isinstance(layers[-2], nn.Linear) or not isinstance(layers[-1], nn.ReLU):
        raise ValueError("narrowed() needs a body that ends in Linear and ReLU (the mlp and cnn architectures).")
    last = layers[-2]
    if not 1 <= width <= last.out_features:
        raise ValueError(f"width {width} is not in 1..{last.out_features}.")
    importance = last.weight.detach().norm(dim=1) * model.head.weight.detach().norm(dim=0)
    keep = importance.argsort(descending=True)[:width].sort().values
    narrow_last = nn.Linear(last.in_features, width)
    head = nn.Linear(width, model.head.out_features)
    with torch.no_grad():
        narrow_last.weight.copy_(last.weight[keep])
        narrow_last.bias.copy_(last.bias[keep])
        head.weight.copy_(model.head.weight[:, keep])
        head.bias.copy_(model.head.bias)
    body = nn.Sequential(*(copy.deepcopy(layer) for layer in layers[:-2]), narrow_last, nn.ReLU())
    narrow = Classifier(body, width, model.head.out_features)
    narrow.head = head
    return narrow


def build_gate(embedding_dim: int, num_experts: int, hidden: int = 64) -> nn.Module:
    """Build the gate: a two-layer MLP from an embedding to one logit per expert."""
    return nn.Sequential(nn.Linear(embedding_dim, hidden), nn.ReLU(), nn.Linear(hidden, num_experts))


def pick_device() -> torch.device:
    """Return CUDA when available, else the CPU."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")
