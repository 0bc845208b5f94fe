"""A SuperNode's own data folder: export of a run's partition, loading it back, refusals."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from client_app.task import load_local_data
from data.export import main as export_main
from data.export import raw_images
from data.node_data import DataSpec, NodeDataError, load_node_data
from data.settings import partitioned
from server_app.config import resolve

PRESET = "configs/digits-tiny.yaml"
ATOL = 1e-5
# (format, --run-config overrides): both layouts, and evaluation on the validation slice
# (eval samples then come from the training split).
EXPORTS = {
    "npz": ("npz", ["seed=3"]),
    "imagefolder": ("imagefolder", []),
    "npz-validation": ("npz", ["evaluation-split='validation'"]),
}


def _cfg(overrides: list[str]) -> dict:
    from data.export import _value

    explicit = {"config-file": PRESET, **{k: _value(v) for k, v in (o.split("=", 1) for o in overrides)}}
    return resolve(explicit, explicit)


@pytest.fixture(scope="module", params=list(EXPORTS))
def exported(request, tmp_path_factory):
    fmt, overrides = EXPORTS[request.param]
    out = tmp_path_factory.mktemp(request.param) / "export"
    argv = ["--config-file", PRESET, "--out", str(out), "--format", fmt]
    assert export_main([*argv, "--run-config", *overrides] if overrides else argv) == 0
    return out, fmt, _cfg(overrides)


def _same(actual: torch.Tensor, expected: torch.Tensor) -> None:
    assert actual.shape == expected.shape
    assert actual.dtype == expected.dtype
    if expected.is_floating_point():
        assert torch.allclose(actual, expected, rtol=0, atol=ATOL)
    else:
        assert torch.equal(actual, expected)


def test_every_node_reads_back_its_simulated_partition(exported):
    out, fmt, cfg = exported
    dataset, plan = partitioned(cfg)
    spec = DataSpec.from_json(out / "run-config.json")
    nodes = json.loads((out / "nodes.json").read_text())
    assert [n["partition-id"] for n in nodes] == list(range(plan.num_partitions))
    for node in nodes:
        pid = node["partition-id"]
        role = plan.role(pid)
        expert = pid if role == "anchor" else None
        assert (node["role"], node["expert"]) == (role, expert)
        assert (
            node["node-config"]
            == f"data-path='{out / f'node-{pid}'}' role='{role}'"
            + (f" expert={pid}" if expert is not None else "")
            + f" partition-id={pid}"
        )
        loaded = load_node_data(node["path"], spec)
        assert loaded.layout == fmt
        local = load_local_data(cfg, pid, data_root="")
        for name in ("train_x", "train_y", "eval_x", "eval_y"):
            _same(getattr(loaded, name), getattr(local, name))
        # Only its own samples: the plan's counts, and nothing else in the folder.
        n_train = len(plan.train_indices[pid]) if role != "test" else 0
        assert (len(loaded.train_y), len(loaded.eval_y)) == (n_train, len(plan.eval_indices[pid]))
        assert (node["num-train"], node["num-eval"]) == (n_train, len(plan.eval_indices[pid]))
        files = sorted(p.relative_to(node["path"]) for p in Path(node["path"]).rglob("*") if p.is_file())
        if fmt == "npz":
            assert files == [Path("eval.npz")] + ([Path("train.npz")] if n_train else [])
        else:
            assert len(files) == n_train + len(plan.eval_indices[pid])
        if role == "test":
            assert not (Path(node["path"]) / "train").exists() and not (Path(node["path"]) / "train.npz").exists()


def test_public_folder_holds_the_public_split(exported):
    out, _, cfg = exported
    dataset, plan = partitioned(cfg)
    spec = DataSpec.from_json(out / "run-config.json")
    public = load_node_data(out, spec, subpath="public")
    _same(public.train_x, dataset.train_x[plan.public_indices])
    _same(public.train_y, dataset.train_y[plan.public_indices])
    assert len(public.eval_y) == 0


def test_run_config_json_tells_nodes_what_to_agree_on(exported):
    out, _, cfg = exported
    dataset, _ = partitioned(cfg)
    stored = json.loads((out / "run-config.json").read_text())
    assert stored["labels"] == stored["num-classes"] == dataset.num_classes
    assert tuple(stored["input-shape"]) == dataset.input_shape
    assert stored["pixel-scale"] == 16.0  # data.datasets scales scikit-learn's digits by 1/16
    assert len(stored["mean"]) == len(stored["std"]) == dataset.input_shape[0]


def test_recovered_pixels_give_the_simulation_tensors_exactly():
    dataset, _ = partitioned(_cfg([]))
    raw = raw_images(dataset, "digits")
    assert raw.train_x.dtype == np.uint8 and raw.train_x.max() == 16
    mean = torch.tensor(raw.spec.mean).view(1, -1, 1, 1)
    std = torch.tensor(raw.spec.std).view(1, -1, 1, 1)
    assert torch.equal((torch.as_tensor(raw.test_x).float() / 16.0 - mean) / std, dataset.test_x)


# --- layouts written by hand -------------------------------------------------------------

SPEC = DataSpec.make(10, 0.5, 0.25, input_shape=(1, 4, 4))


def _png(path: Path, value: int = 0, size: int = 4) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((size, size), value, dtype=np.uint8)).save(path)


def _npz(path: Path, x, y) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    np.savez(path, x=np.asarray(x), y=np.asarray(y))


def test_class_folders_map_to_the_run_labels_not_alphabetical_order(tmp_path):
    node = tmp_path / "node"
    _png(node / "train" / "7" / "a.png", 255)
    _png(node / "train" / "3" / "b.png", 0)
    _png(node / "eval" / "7" / "c.png", 51)
    data = load_node_data(node, SPEC)
    assert data.train_y.tolist() == [7, 3]  # ordered by file name across classes
    assert data.train_labels == (3, 7)
    assert torch.allclose(data.train_x[0], torch.full((1, 4, 4), (1.0 - 0.5) / 0.25))
    assert data.eval_y.tolist() == [7] and torch.allclose(data.eval_x, torch.full((1, 1, 4, 4), (0.2 - 0.5) / 0.25))
    # Class names, or indices, of a named label space.
    named = DataSpec.make(["airplane", "bird", "frog"], 0.0, 1.0)
    _png(tmp_path / "named" / "train" / "frog" / "a.png")
    _png(tmp_path / "named" / "train" / "1" / "b.png")
    assert load_node_data(tmp_path / "named", named).train_y.tolist() == [2, 1]


def test_npz_layout_scales_integers_and_takes_floats_as_intensities(tmp_path):
    _npz(tmp_path / "a" / "train.npz", np.full((2, 4, 4), 255, np.uint8), [1, 2])  # N x H x W
    _npz(tmp_path / "a" / "eval.npz", np.full((1, 1, 4, 4), 0.75, np.float32), np.array(["9"]))
    data = load_node_data(tmp_path / "a", SPEC)
    assert data.train_x.shape == (2, 1, 4, 4) and torch.allclose(data.train_x, torch.full((2, 1, 4, 4), 2.0))
    assert torch.allclose(data.eval_x, torch.ones(1, 1, 4, 4)) and data.eval_y.tolist() == [9]
    # A test client: eval only.
    _npz(tmp_path / "t" / "eval.npz", np.zeros((3, 1, 4, 4), np.uint8), [0, 1, 2])
    test_client = load_node_data(tmp_path / "t", SPEC)
    assert test_client.train_x.shape == (0, 1, 4, 4) and len(test_client.eval_y) == 3


def _bad_cases(root: Path):
    """(node folder, fragment of the message) for each malformed folder."""
    cases = [(root / "missing", "does not exist")]
    (root / "empty").mkdir()
    cases.append((root / "empty", "empty"))
    (root / "stray").mkdir()
    (root / "stray" / "notes.txt").write_text("hello")
    cases.append((root / "stray", "no recognised layout"))
    _png(root / "frog" / "train" / "frog" / "a.png")
    cases.append((root / "frog", "holds label 'frog' which is not in the run's label space [0..9]"))
    _npz(root / "label12" / "train.npz", np.zeros((1, 1, 4, 4), np.uint8), [12])
    cases.append((root / "label12", "holds label 12 which is not in the run's label space"))
    _npz(root / "lengths" / "train.npz", np.zeros((3, 1, 4, 4), np.uint8), [0, 1])
    cases.append((root / "lengths", "3 inputs but 2 labels"))
    _npz(root / "dims" / "train.npz", np.zeros((3, 16), np.uint8), [0, 1, 2])
    cases.append((root / "dims", "N x C x H x W"))
    _npz(root / "channels" / "train.npz", np.zeros((1, 3, 4, 4), np.uint8), [0])
    cases.append((root / "channels", "3 channels"))
    _npz(root / "shape" / "eval.npz", np.zeros((1, 1, 8, 8), np.uint8), [0])
    cases.append((root / "shape", "1x8x8 samples, the run's input shape is 1x4x4"))
    (root / "nox").mkdir()
    np.savez(root / "nox" / "train.npz", y=np.zeros(1, np.int64))
    cases.append((root / "nox", "no array 'x'"))
    (root / "garbled").mkdir()
    (root / "garbled" / "train.npz").write_bytes(b"PK\x03\x04 not really a zip")
    cases.append((root / "garbled", "cannot read train.npz"))
    _png(root / "badpng" / "train" / "1" / "a.png")
    (root / "badpng" / "train" / "1" / "b.png").write_bytes(b"not a png")
    cases.append((root / "badpng", "cannot read image train/1/b.png"))
    _png(root / "sizes" / "train" / "1" / "a.png")
    _png(root / "sizes" / "train" / "1" / "b.png", size=5)
    cases.append((root / "sizes", "image train/1/b.png is 1x5x5"))
    _png(root / "both" / "train" / "1" / "a.png")
    _npz(root / "both" / "train.npz", np.zeros((1, 1, 4, 4), np.uint8), [0])
    cases.append((root / "both", "both"))
    return cases


def test_malformed_folders_raise_one_sentence_naming_the_folder(tmp_path):
    for node, fragment in _bad_cases(tmp_path):
        with pytest.raises(NodeDataError) as info:
            load_node_data(node, SPEC)
        message = str(info.value)
        assert message.startswith(f"data folder {node}"), message
        assert fragment in message, message
        assert isinstance(info.value, ValueError)


def test_a_run_config_value_cannot_make_a_node_read_outside_its_folder(tmp_path):
    node, secret = tmp_path / "node", tmp_path / "secret"
    _npz(node / "own" / "eval.npz", np.zeros((1, 1, 4, 4), np.uint8), [0])
    _npz(secret / "eval.npz", np.zeros((5, 1, 4, 4), np.uint8), [1] * 5)
    (node / "to-secret").symlink_to(secret, target_is_directory=True)
    (node / "linked").mkdir()
    (node / "linked" / "eval.npz").symlink_to(secret / "eval.npz")
    _png(node / "images" / "train" / "1" / "a.png")
    _png(secret / "b.png")
    (node / "images" / "train" / "1" / "b.png").symlink_to(secret / "b.png")

    assert len(load_node_data(node, SPEC, subpath="own").eval_y) == 1
    run_config = {"node-data-subpath": "../secret"}  # what a hostile or careless run could send
    escapes = [run_config["node-data-subpath"], str(secret), "own/../../secret", "to-secret"]
    for subpath in escapes:
        with pytest.raises(NodeDataError, match="outside the node's folder|absolute path") as info:
            load_node_data(node, SPEC, subpath=subpath)
        assert str(node) in str(info.value)
    # Links inside the folder pointing out are refused too.
    for subpath in ("linked", "images"):
        with pytest.raises(NodeDataError, match="links outside the node's folder"):
            load_node_data(node, SPEC, subpath=subpath)


def test_spec_reads_flower_scalar_run_config_values():
    spec = DataSpec.make("3", "0.49, 0.48,0.45", "0.2,0.2,0.2", 255, "3,32,32")
    assert spec.labels == ("0", "1", "2") and spec.mean == (0.49, 0.48, 0.45) and spec.input_shape == (3, 32, 32)
    assert DataSpec.from_dict(spec.to_dict()) == spec
    named = DataSpec.make("cat,dog", 0.5, 0.5)
    assert DataSpec.from_dict(named.to_dict()) == named
    with pytest.raises(ValueError, match="std"):
        DataSpec.make(10, "0.5", "0.5,0.5")
