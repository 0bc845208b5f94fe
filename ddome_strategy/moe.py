"""The mixture-of-experts maths of DDOME: losses and zero-shot prediction (top-K dispatch
is :mod:`ddome_strategy.dispatch`)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

# How a new client predicts from the experts it was sent: the spec's top-1 of K, the
# gate-weighted mixture of the K, that mixture with the common expert standing in for the
# experts it was not sent (``fallback_predictions``), the mixture where the gate puts
# most of a sample's mass on the sent experts and the common expert elsewhere
# (``confident_predictions``), or the mixture blended with the common expert at a fixed
# weight (``blend_predictions``).
ZERO_SHOT_RULES = ("top1", "mixture", "fallback", "confident", "blend")

# What an anchor's loss teaches the gate: which specialist owns its data (``one-hot``, the
# spec's), and also how far to trust the generalist against that specialist
# (``weigh-generalist``: ``anchor_generalist_loss``).
ANCHOR_GATE_LOSSES = ("one-hot", "weigh-generalist")

# The common expert's share of the ``blend`` rule: the best mean over the matrix's five
# columns on the validation split among 1/4, 1/3, 0.4, 0.45 and 1/2 (more helps Dirichlet
# 0.1 and costs the grouped partition; docs/img/exploration).
BLEND_COMMON_WEIGHT = 1 / 3


def mixture_log_probs(gate_logits: torch.Tensor, expert_logits: torch.Tensor) -> torch.Tensor:
    """Log-probabilities of the gated mixture of the selected experts.

    The gate's probabilities are renormalised over the K selected experts (a softmax
    over their logits) and mix the experts' class probabilities (the spec's choice).

    Parameters
    ----------
    gate_logits : torch.Tensor
        ``[batch, K]`` gate logits of the selected experts.
    expert_logits : torch.Tensor
        ``[batch, K, classes]`` logits of the selected experts.

    Returns
    -------
    torch.Tensor
        ``[batch, classes]`` log of ``sum_k p_k * softmax(expert_k)``.
    """
    log_weights = F.log_softmax(gate_logits, dim=1).unsqueeze(2)
    return torch.logsumexp(log_weights + F.log_softmax(expert_logits, dim=2), dim=1)


def mixture_loss(gate_logits: torch.Tensor, expert_logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Cross-entropy of the gated mixture: the normal clients' joint loss."""
    return F.nll_loss(mixture_log_probs(gate_logits, expert_logits), labels)


def anchor_loss(
    expert_logits: torch.Tensor,
    gate_logits: torch.Tensor,
    labels: torch.Tensor,
    expert_index: int,
) -> torch.Tensor:
    """Anchor loss: the expert's cross-entropy plus the one-hot gate loss.

    The gate term pulls every sample of anchor ``i`` towards expert ``i``, which is
    what makes experts specialise on the anchors' label groups.
    """
    target = torch.full_like(labels, expert_index)
    return F.cross_entropy(expert_logits, labels) + F.cross_entropy(gate_logits, target)


def anchor_generalist_loss(
    gate_logits: torch.Tensor,
    own_logits: torch.Tensor,
    generalist_logits: torch.Tensor,
    labels: torch.Tensor,
    expert_index: int,
    generalist: int,
) -> torch.Tensor:
    """An anchor's lesson on the generalist: the mixture loss of its own expert and the
    generalist, with both held fixed, so that it trains the gate only.

    The one-hot anchor loss says which specialist owns the anchor's data and says nothing
    of the generalist; this term tells the gate how far to trust the generalist against
    that specialist on such data. Where the specialist fits its group better (labels in
    groups) the gate learns to send little to the generalist; where it does not (an
    anchor holding a mix of labels) the generalist keeps its share.
    """
    pair = torch.stack([own_logits, generalist_logits], dim=1).detach()
    return mixture_loss(gate_logits[:, [expert_index, generalist]], pair, labels)


def zero_shot_predictions(
    gate_probs: torch.Tensor, expert_logits: torch.Tensor, selected: list[int]
) -> tuple[torch.Tensor, torch.Tensor]:
    """Zero-shot predictions from the K selected experts.

    Parameters
    ----------
    gate_probs : torch.Tensor
        ``[batch, M]`` gate probabilities over all experts.
    expert_logits : torch.Tensor
        ``[batch, K, classes]`` logits of the selected experts, in ``selected`` order.
    selected : list[int]
        The expert indices the server sent.

    Returns
    -------
    tuple[torch.Tensor, torch.Tensor]
        Top-1-of-K predictions (per sample, the selected expert with the highest gate
        score decides) and weighted-mixture predictions.
    """
    selected_logits = torch.log(gate_probs[:, selected].clamp_min(1e-12))
    best = selected_logits.argmax(dim=1)
    top1 = expert_logits[torch.arange(len(best)), best].argmax(dim=1)
    mixture = mixture_log_probs(selected_logits, expert_logits).argmax(dim=1)
    return top1, mixture


def fallback_predictions(
    gate_probs: torch.Tensor, expert_logits: torch.Tensor, selected: list[int], common_logits: torch.Tensor
) -> torch.Tensor:
    """Predictions of the selected experts with the common expert standing in for the rest.

    ``p(y|x) = sum_{k in selected} g_k(x) p_k(y|x) + (1 - sum_{k in selected} g_k(x)) p_c(y|x)``:
    the gate's mass on the experts the client was not sent goes to the common expert,
    which every client already holds (no bytes). A sample whose label belongs to no sent
    expert's group is then predicted by the common expert rather than by a stranger.
    """
    weights = gate_probs[:, selected]
    mixed = (weights.unsqueeze(2) * torch.softmax(expert_logits, dim=2)).sum(1)
    rest = (1 - weights.sum(1, keepdim=True)).clamp_min(0)
    return (mixed + rest * torch.softmax(common_logits, dim=1)).argmax(dim=1)


def confident_predictions(
    gate_probs: torch.Tensor,
    expert_logits: torch.Tensor,
    selected: list[int],
    common_logits: torch.Tensor,
    threshold: float = 0.5,
) -> torch.Tensor:
    """The sent experts' gated mixture for the samples on which the gate puts at least
    ``threshold`` of its mass on them; the common expert for the others (their label
    most likely belongs to an expert the client was not sent)."""
    weights = gate_probs[:, selected]
    mixture = mixture_log_probs(torch.log(weights.clamp_min(1e-12)), expert_logits).argmax(dim=1)
    return torch.where(weights.sum(1) >= threshold, mixture, common_logits.argmax(dim=1))


def blend_predictions(
    gate_probs: torch.Tensor,
    expert_logits: torch.Tensor,
    selected: list[int],
    common_logits: torch.Tensor,
    weight: float = BLEND_COMMON_WEIGHT,
) -> torch.Tensor:
    """The sent experts' gated mixture blended with the common expert at a fixed weight.

    ``p(y|x) = (1 - w) p_mixture(y|x) + w p_c(y|x)``. The gate was trained on the
    training clients, where the experts fit the data better than the frozen common
    expert; on a new client the experts' fit is not that good and the common expert
    (trained on the public data, held by every client: no bytes) is a safer share of
    the vote. A gate column for the common expert, trained like an expert's, learns
    to give it almost nothing (docs/results.md), hence the fixed weight.
    """
    weights = torch.log(gate_probs[:, selected].clamp_min(1e-12))
    return blend_with_common(mixture_log_probs(weights, expert_logits).exp(), common_logits, weight).argmax(dim=1)


def blend_with_common(
    probs: torch.Tensor, common_logits: torch.Tensor, weight: float = BLEND_COMMON_WEIGHT
) -> torch.Tensor:
    """``(1 - weight) probs + weight softmax(common_logits)``: any model's class
    probabilities (``[batch, classes]``, rows summing to 1) blended with the common expert."""
    return (1 - weight) * probs + weight * torch.softmax(common_logits, dim=1)


def proximal_term(model: torch.nn.Module, start: list[torch.Tensor]) -> torch.Tensor:
    """FedProx's proximal term without its mu/2: the squared distance of ``model``'s
    parameters from ``start`` (the weights it was sent this round)."""
    return sum(((p - s) ** 2).sum() for p, s in zip(model.parameters(), start))


def routing_error(gate_probs: torch.Tensor, labels: torch.Tensor, label_to_expert: dict[int, int]) -> float:
    """Share of samples whose top-1 gate expert is not the anchor expert of their label.

    Samples whose label belongs to no anchor group are ignored; ``nan`` if none is left.
    """
    known = [i for i, y in enumerate(labels.tolist()) if y in label_to_expert]
    if not known:
        return float("nan")
    expected = torch.tensor([label_to_expert[int(labels[i])] for i in known])
    return float((gate_probs[known].argmax(dim=1) != expected).float().mean())
