"""Model builders and the common expert's pretraining and cache."""

import pytest
import torch

from data import load_dataset
from ddome_strategy import common_expert
from ddome_strategy.common_expert import load_or_pretrain, split_public
from ddome_strategy.models import ARCHITECTURES, NARROWABLE, build_gate, build_model, generalist_hidden, narrowed


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


@pytest.mark.parametrize("arch", ["mlp", "cnn"])
def test_narrowed_keeps_the_units_that_matter_most(arch):
    torch.manual_seed(0)
    model = build_model(arch, (1, 28, 28), 10, hidden=16)
    last = model.body[-2]
    with torch.no_grad():  # units 3 and 7 carry nothing out: they must be the ones dropped
        model.head.weight[:, [3, 7]] = 0
    narrow = narrowed(model, 14)
    # Built like an expert of that width, so a client loads it with the same builder.
    reference = build_model(arch, (1, 28, 28), 10, hidden=14).state_dict()
    assert {k: v.shape for k, v in narrow.state_dict().items()} == {k: v.shape for k, v in reference.items()}
    kept = [i for i in range(16) if i not in (3, 7)]
    assert torch.equal(narrow.body[-2].weight, last.weight[kept])
    assert torch.equal(narrow.head.weight, model.head.weight[:, kept])
    # Dropping units that carry nothing out changes no prediction.
    x = torch.randn(4, 1, 28, 28)
    assert torch.allclose(narrow(x), model(x), atol=1e-5)
    assert torch.allclose(narrowed(model, 16)(x), model(x), atol=1e-5)


def test_narrowed_refuses_what_it_cannot_narrow():
    with pytest.raises(ValueError, match="Linear and ReLU"):
        narrowed(build_model("resnet18", (3, 32, 32), 10), 8)
    with pytest.raises(ValueError, match="width 0"):
        narrowed(build_model("mlp", (1, 8, 8), 10, hidden=16), 0)
    assert generalist_hidden(128, 0.5) == 64
    assert generalist_hidden(3, 0.1) == 1


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


@pytest.mark.parametrize("arch", ["mlp", "cnn", "resnet18"])
def test_the_server_starts_the_generalist_the_clients_build(arch):
    from types import SimpleNamespace

    from client_app.task import build_generalist
    from ddome_strategy.arrays import expert_prefix, load_part
    from server_app.app import build_moe
    from server_app.config import DEFAULTS, resolve

    cfg = resolve({**DEFAULTS, "arch": arch})
    data = SimpleNamespace(input_shape=(3, 32, 32), num_classes=10)
    common = build_model(arch, data.input_shape, data.num_classes, cfg["mlp-hidden"])
    arrays = build_moe(cfg, data, common)
    generalist = build_generalist(cfg, data)
    load_part(generalist, arrays, expert_prefix(cfg["num-experts"]))  # strict: every shape fits
    size = sum(p.numel() for p in generalist.parameters())
    full = sum(p.numel() for p in common.parameters())
    # generalist-width of the hidden units: about that share of the bytes for mlp and cnn
    # (their other layers are small beside the last hidden one); a ResNet's is as wide.
    width = cfg["generalist-width"]
    assert (width <= size / full < width + 0.03) if arch in NARROWABLE else (size == full)
