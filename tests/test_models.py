"""Model builders and the common expert's pretraining and cache."""

import pytest
import torch

from data import load_dataset
from ddome_strategy import common_expert
from ddome_strategy.common_expert import load_or_pretrain, split_public
from ddome_strategy.models import ARCHITECTURES, build_gate, build_model


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_every_architecture_classifies_and_embeds(arch):
    shape = (3, 32, 32) if arch.startswith("resnet") else (1, 28, 28)
    model = build_model(arch, shape, 10, hidden=32)
    x = torch.randn(2, *shape)
    assert model(x).shape == (2, 10)
    assert model.embed(x).shape == (2, model.feature_dim)
    if arch.startswith("resnet"):
        # CIFAR adaptation: 3x3 stride-1 stem and no max-pool.
        assert model.body.conv1.kernel_size == (3, 3) and model.body.conv1.stride == (1, 1)
        assert isinstance(model.body.maxpool, torch.nn.Identity)


def test_unknown_architecture_is_refused():
    with pytest.raises(ValueError, match="vit"):
        build_model("vit", (1, 8, 8), 10)


def test_gate_outputs_one_logit_per_expert():
    assert build_gate(16, 7, hidden=8)(torch.randn(3, 16)).shape == (3, 7)


def test_common_expert_reaches_its_target_and_is_cached(tmp_path, monkeypatch):
    dataset = load_dataset("digits")
    public = torch.arange(0, 600).numpy()
    settings = {"dataset": "digits", "arch": "mlp", "hidden": 32, "target_acc": 0.8, "max_epochs": 30, "seed": 0}
    model, accuracy, path = load_or_pretrain(settings, dataset, public, tmp_path)
    assert accuracy >= 0.8 and path.exists()
    # Stopped near the target, not trained to convergence (the paper's checkpoints).
    assert accuracy < 0.97

    def no_training(*args, **kwargs):
        raise AssertionError("a cached common expert must not be retrained")

    monkeypatch.setattr("ddome_strategy.common_expert.pretrain", no_training)
    again, cached_accuracy, same_path = load_or_pretrain(settings, dataset, public, tmp_path)
    assert same_path == path and cached_accuracy == accuracy
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), again.state_dict().values()))
    with pytest.raises(AssertionError, match="retrained"):
        load_or_pretrain({**settings, "target_acc": 0.7}, dataset, public, tmp_path)


class _TrainSplitOnly:
    """A dataset whose test split may not be read (it holds the unseen clients' images)."""

    def __init__(self, dataset):
        self.train_x, self.train_y = dataset.train_x, dataset.train_y
        self.input_shape, self.num_classes = dataset.input_shape, dataset.num_classes

    @property
    def test_x(self):
        raise AssertionError("the common expert's pretraining read the test split")

    test_y = test_x


def test_common_expert_stops_on_a_validation_slice_of_the_public_split(tmp_path):
    dataset = load_dataset("digits")
    public = torch.arange(0, 600).numpy()
    settings = {"dataset": "digits", "arch": "mlp", "hidden": 32, "target_acc": 0.8, "max_epochs": 30, "seed": 0}
    model, accuracy, _ = load_or_pretrain(settings, _TrainSplitOnly(dataset), public, tmp_path)
    fit, validation = split_public(public, seed=0)
    assert len(validation) == 120 and not set(fit) & set(validation) and set(fit) | set(validation) == set(public)
    # The accuracy it stopped on is the one on that slice, and it reached the target there.
    assert accuracy == pytest.approx(
        common_expert.accuracy(model, dataset.train_x[validation], dataset.train_y[validation])
    )
    assert accuracy >= 0.8
