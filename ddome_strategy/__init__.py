"""DDOME: federated mixture of experts with server-side gating and top-K dispatch.

Import the strategy into any Flower ServerApp::

    from ddome_strategy import DDOME, layout_roles, pack_moe

The client side of the protocol (docs/protocol.md) is the toolkit
:mod:`ddome_strategy.client` (``DDOMEClient``), and :mod:`ddome_strategy.worker` keeps it
loaded between a deployment's per-message processes. The PyTorch model builders and losses
(:mod:`~ddome_strategy.models`, :mod:`~ddome_strategy.moe`) are imported on first use, so
that importing the strategy does not load PyTorch.
"""

from importlib import import_module

from .aggregation import aggregate_moe, check_update
from .arrays import expert_prefix, pack_moe, select
from .dispatch import top_k_experts
from .roles import ANCHOR, NORMAL, TEST, layout_roles, role_in_layout
from .strategy import DDOME

# Name -> the submodule that defines it, imported by __getattr__ on first access (PEP 562).
_LAZY = {
    "ARCHITECTURES": "models",
    "Classifier": "models",
    "build_gate": "models",
    "build_model": "models",
    "anchor_loss": "moe",
    "mixture_loss": "moe",
    "zero_shot_predictions": "moe",
}

__all__ = [
    "ANCHOR",
    "ARCHITECTURES",
    "Classifier",
    "DDOME",
    "NORMAL",
    "TEST",
    "aggregate_moe",
    "anchor_loss",
    "build_gate",
    "build_model",
    "check_update",
    "expert_prefix",
    "layout_roles",
    "mixture_loss",
    "pack_moe",
    "role_in_layout",
    "select",
    "top_k_experts",
    "zero_shot_predictions",
]


def __getattr__(name: str) -> object:
    if name not in _LAZY:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(import_module(f".{_LAZY[name]}", __name__), name)
    globals()[name] = value  # later accesses skip __getattr__
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_LAZY})
