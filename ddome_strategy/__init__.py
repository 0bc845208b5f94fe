"""DDOME: federated mixture of experts with server-side gating and top-K dispatch.

Import the strategy into any Flower ServerApp::

    from ddome_strategy import DDOME, layout_roles, pack_moe
"""

from .aggregation import aggregate_moe, check_update
from .arrays import expert_prefix, pack_moe, select
from .models import ARCHITECTURES, Classifier, build_gate, build_model
from .moe import anchor_loss, mixture_loss, top_k_experts, zero_shot_predictions
from .roles import ANCHOR, NORMAL, TEST, layout_roles, role_in_layout
from .strategy import DDOME

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
