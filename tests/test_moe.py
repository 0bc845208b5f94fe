"""The MoE maths: mixture and anchor losses, top-K, zero-shot prediction, routing error."""

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from ddome_strategy.dispatch import top_k_experts
from ddome_strategy.moe import (
    anchor_generalist_loss,
    anchor_loss,
    mixture_log_probs,
    mixture_loss,
    routing_error,
    zero_shot_predictions,
)


def test_mixture_is_gate_weighted_average_of_expert_probabilities():
    torch.manual_seed(0)
    gate_logits, expert_logits = torch.randn(4, 2), torch.randn(4, 2, 3)
    weights = torch.softmax(gate_logits, 1)
    expected = (weights.unsqueeze(2) * torch.softmax(expert_logits, 2)).sum(1)
    assert torch.allclose(mixture_log_probs(gate_logits, expert_logits).exp(), expected, atol=1e-6)


def test_mixture_loss_rewards_routing_to_the_right_expert():
    labels = torch.tensor([0, 0])
    right, wrong = torch.tensor([10.0, -10.0]), torch.tensor([-10.0, 10.0])
    expert_logits = torch.stack([right, wrong]).unsqueeze(0).expand(2, 2, 2).clone()
    good = mixture_loss(torch.tensor([[5.0, -5.0]] * 2), expert_logits, labels)
    bad = mixture_loss(torch.tensor([[-5.0, 5.0]] * 2), expert_logits, labels)
    assert good < 0.01 < 5 < bad


def test_anchor_loss_is_expert_ce_plus_one_hot_gate_ce():
    torch.manual_seed(0)
    expert_logits, gate_logits = torch.randn(5, 3), torch.randn(5, 4)
    labels = torch.tensor([0, 1, 2, 0, 1])
    expected = F.cross_entropy(expert_logits, labels) + F.cross_entropy(gate_logits, torch.full((5,), 2))
    assert torch.isclose(anchor_loss(expert_logits, gate_logits, labels, 2), expected)


def test_anchor_loss_gradient_pulls_gate_towards_its_expert():
    gate_logits = torch.zeros(1, 3, requires_grad=True)
    anchor_loss(torch.zeros(1, 2), gate_logits, torch.tensor([0]), 1).backward()
    assert gate_logits.grad[0, 1] < 0 < gate_logits.grad[0, 0]


@pytest.mark.parametrize("better", ["specialist", "generalist"])
def test_anchor_generalist_loss_moves_the_gate_towards_whichever_fits_the_anchors_data(better):
    # Anchor of expert 1, generalist 3: the one that predicts the labels takes gate mass
    # from the other; no other gate output and neither expert is trained by this term.
    labels = torch.tensor([0, 1, 0])
    right, wrong = 5 * F.one_hot(labels, 2).float(), 5 * F.one_hot(1 - labels, 2).float()
    own = (right if better == "specialist" else wrong).requires_grad_()
    general = (wrong if better == "specialist" else right).requires_grad_()
    gate_logits = torch.zeros(3, 4, requires_grad=True)
    anchor_generalist_loss(gate_logits, own, general, labels, 1, 3).backward()
    winner, loser = (1, 3) if better == "specialist" else (3, 1)
    assert (gate_logits.grad[:, winner] < 0).all() and (gate_logits.grad[:, loser] > 0).all()
    assert gate_logits.grad[:, [0, 2]].abs().sum() == 0
    assert own.grad is None and general.grad is None


def test_top_k_picks_highest_scores_in_order():
    assert top_k_experts(np.array([0.1, 0.5, 0.2, 0.9]), 2) == [3, 1]
    assert top_k_experts(np.array([0.25, 0.25, 0.25, 0.25]), 3) == [0, 1, 2]
    with pytest.raises(ValueError, match="top-k"):
        top_k_experts(np.array([0.5, 0.5]), 3)


def test_zero_shot_uses_the_selected_expert_with_highest_gate_score():
    # Expert 3 says class 1, expert 0 says class 0; the gate prefers 3 for sample 0
    # and 0 for sample 1. Expert 2 is not selected even though the gate likes it most.
    gate_probs = torch.tensor([[0.2, 0.0, 0.5, 0.3], [0.3, 0.0, 0.5, 0.2]])
    expert_logits = torch.tensor([[[5.0, 0.0], [0.0, 5.0]], [[5.0, 0.0], [0.0, 5.0]]])
    top1, mixture = zero_shot_predictions(gate_probs, expert_logits, [0, 3])
    assert top1.tolist() == [1, 0]
    assert mixture.tolist() == [1, 0]


def test_routing_error_counts_samples_sent_away_from_their_anchor_expert():
    gate_probs = torch.tensor([[0.9, 0.1], [0.2, 0.8], [0.6, 0.4], [0.5, 0.5]])
    labels = torch.tensor([0, 1, 1, 7])  # label 7 is in no anchor group: ignored
    assert routing_error(gate_probs, labels, {0: 0, 1: 1}) == pytest.approx(1 / 3)
    assert math.isnan(routing_error(gate_probs, torch.tensor([7, 7, 7, 7]), {0: 0}))


def test_adaptive_dispatch_sends_the_fewest_experts_that_carry_the_gate_mass():
    from ddome_strategy.dispatch import adaptive_experts

    scores = np.array([0.05, 0.40, 0.30, 0.20, 0.05])
    assert adaptive_experts(scores, 4, 1, 0.0) == [1, 2, 3, 0]  # off: plain top-K
    assert adaptive_experts(scores, 4, 1, 0.35) == [1]
    assert adaptive_experts(scores, 4, 1, 0.70) == [1, 2]
    assert adaptive_experts(scores, 4, 1, 0.85) == [1, 2, 3]
    assert adaptive_experts(scores, 2, 1, 0.85) == [1, 2]  # capped at K max
    assert adaptive_experts(scores, 4, 2, 0.35) == [1, 2]  # at least K min
    assert adaptive_experts(scores, 5, 1, 1.0) == [1, 2, 3, 0, 4]


def test_fallback_gives_the_unsent_experts_mass_to_the_common_expert():
    from ddome_strategy.moe import fallback_predictions

    expert_logits = torch.tensor([[[5.0, 0.0, 0.0], [0.0, 5.0, 0.0]]] * 3)  # experts 0, 2 say 0 and 1
    common_logits = torch.tensor([[0.0, 0.0, 5.0]] * 3)  # the common expert says 2
    gate = torch.tensor(
        [
            [0.9, 0.05, 0.05],  # mass on the sent experts: they decide
            [0.1, 0.8, 0.1],  # mass on expert 1, which was not sent: the common expert decides
            [0.05, 0.05, 0.9],
        ]
    )
    assert fallback_predictions(gate, expert_logits, [0, 2], common_logits).tolist() == [0, 2, 1]
    # The spec's top-1 of K picks a sent expert even where the gate has little mass on it.
    top1, _ = zero_shot_predictions(gate, expert_logits, [0, 2])
    assert top1.tolist() == [0, 0, 1]


def test_confident_rule_uses_the_sent_experts_where_the_gate_trusts_them_and_the_common_expert_elsewhere():
    from ddome_strategy.moe import confident_predictions

    expert_logits = torch.tensor([[[5.0, 0.0, 0.0], [0.0, 5.0, 0.0]]] * 3)  # experts 0, 2 say 0 and 1
    common_logits = torch.tensor([[0.0, 0.0, 5.0]] * 3)  # the common expert says 2
    gate = torch.tensor([[0.9, 0.05, 0.05], [0.3, 0.6, 0.1], [0.05, 0.4, 0.55]])
    # Mass on the sent experts 0.95, 0.4 and 0.6: the mixture, the common expert, the mixture.
    assert confident_predictions(gate, expert_logits, [0, 2], common_logits).tolist() == [0, 2, 1]


def test_blend_rule_keeps_a_confident_mixture_and_lets_the_common_expert_break_a_split_vote():
    from ddome_strategy.moe import blend_predictions, zero_shot_predictions

    # Three sent experts say classes 0, 1 and 2; the common expert says 3.
    expert_logits = torch.tensor([[[9.0, 0, 0, 0], [0, 9.0, 0, 0], [0, 0, 9.0, 0]]] * 2)
    common_logits = torch.tensor([[0, 0, 0, 9.0]] * 2)
    gate = torch.tensor([[0.9, 0.05, 0.05], [1 / 3, 1 / 3, 1 / 3]])
    # The gate trusts expert 0 (kept), or splits its vote three ways (the common expert decides).
    assert blend_predictions(gate, expert_logits, [0, 1, 2], common_logits).tolist() == [0, 3]
    # Its two ends: no weight is the mixture, all the weight is the common expert.
    _, mixture = zero_shot_predictions(gate, expert_logits, [0, 1, 2])
    assert blend_predictions(gate, expert_logits, [0, 1, 2], common_logits, weight=0.0).tolist() == mixture.tolist()
    assert blend_predictions(gate, expert_logits, [0, 1, 2], common_logits, weight=1.0).tolist() == [3, 3]
