"""How the gate and the experts live in one Flower ``ArrayRecord``.

Keys are ``gate.<param>`` and ``expert.<i>.<param>``, so the server can slice out the
gate and any subset of experts for a client, and merge per-expert results back.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from typing import TYPE_CHECKING

from flwr.app import ArrayRecord

if TYPE_CHECKING:  # the strategy slices records without PyTorch; only these helpers take modules
    import torch
    from torch import nn

GATE_PREFIX = "gate."


def expert_prefix(index: int) -> str:
    """Key prefix of expert ``index``."""
    return f"expert.{index}."


def pack_moe(gate: nn.Module, experts: Iterable[nn.Module]) -> ArrayRecord:
    """Put the gate and all experts into one ``ArrayRecord``."""
    state = {GATE_PREFIX + k: v for k, v in gate.state_dict().items()}
    for i, expert in enumerate(experts):
        state.update({expert_prefix(i) + k: v for k, v in expert.state_dict().items()})
    return ArrayRecord(state)


def select(record: ArrayRecord, prefixes: Iterable[str]) -> ArrayRecord:
    """The part of ``record`` whose keys start with one of ``prefixes``."""
    prefixes = tuple(prefixes)
    return ArrayRecord({k: v for k, v in record.items() if k.startswith(prefixes)}, keep_input=True)


def moe_prefixes(experts: Iterable[int]) -> list[str]:
    """Prefixes of the gate and the given experts: what a client is sent."""
    return [GATE_PREFIX, *(expert_prefix(i) for i in experts)]


def experts_in(record: ArrayRecord) -> list[int]:
    """Indices of the experts present in ``record``, sorted."""
    found = {int(k.split(".")[1]) for k in record if k.startswith("expert.")}
    return sorted(found)


def layout_error(record: ArrayRecord, num_experts: int) -> str | None:
    """Why ``record`` is not a gate plus experts ``0..num_experts-1``, or ``None`` if it is."""
    foreign = [k for k in record if not k.startswith(GATE_PREFIX) and not re.fullmatch(r"expert\.(0|[1-9]\d*)\..+", k)]
    if foreign:
        return f"has a key {foreign[0]!r} that is neither gate.<param> nor expert.<i>.<param>"
    if not any(k.startswith(GATE_PREFIX) for k in record):
        return f"has no gate (no {GATE_PREFIX}* key)"
    found = experts_in(record)
    if found != list(range(num_experts)):
        return f"holds experts {found}, not experts 0..{num_experts - 1} (num_experts={num_experts})"
    return None


def load_part(module: nn.Module, record: ArrayRecord, prefix: str, assign: bool = False) -> None:
    """Load the ``prefix`` part of ``record`` into ``module`` (strict).

    ``assign=True`` makes the loaded tensors the module's own: for a module built on the
    ``meta`` device, which then never pays for a random initialisation.
    """
    import torch  # here, not at the top: the strategy imports this module without PyTorch

    state = {k[len(prefix) :]: torch.from_numpy(v.numpy()) for k, v in record.items() if k.startswith(prefix)}
    module.load_state_dict(state, strict=True, assign=assign)


def pack_part(module: nn.Module, prefix: str) -> dict[str, torch.Tensor]:
    """``module``'s state under ``prefix``, ready to go into an ``ArrayRecord``."""
    return {prefix + k: v.detach().cpu() for k, v in module.state_dict().items()}
