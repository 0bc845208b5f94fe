"""Run configuration: pyproject defaults, presets, overrides and clear errors."""

from pathlib import Path

import pytest
import tomllib

from server_app.config import DEFAULTS, ConfigError, resolve

ROOT = Path(__file__).resolve().parent.parent


def test_defaults_match_pyproject():
    with (ROOT / "pyproject.toml").open("rb") as handle:
        app_config = tomllib.load(handle)["tool"]["flwr"]["app"]["config"]
    assert app_config == DEFAULTS


def test_every_preset_resolves():
    presets = sorted((ROOT / "configs").glob("*.yaml"))
    assert presets
    for preset in presets:
        cfg = resolve({**DEFAULTS, "config-file": str(preset.relative_to(ROOT))})
        assert cfg["config-file"]


def test_preset_applies_and_explicit_override_wins(tmp_path):
    preset = tmp_path / "p.yaml"
    preset.write_text("num-experts: 4\nanchors-per-round: 4\ntop-k: 1\nnum-server-rounds: 99\n")
    cfg = resolve({**DEFAULTS, "config-file": str(preset), "num-server-rounds": 3})
    assert (cfg["num-experts"], cfg["top-k"], cfg["num-server-rounds"]) == (4, 1, 3)


@pytest.mark.parametrize(
    ("overrides", "key"),
    [
        ({"top-k": 6}, "top-k"),
        ({"num-train-clients": 3}, "num-train-clients"),
        ({"anchors-per-round": 6}, "anchors-per-round"),
        ({"normal-per-round": 16}, "normal-per-round"),
        ({"dataset": "mnist"}, "dataset"),
        ({"arch": "vit"}, "arch"),
        ({"partition-mode": "iid"}, "partition-mode"),
        ({"data-root": "/no/such/dir"}, "data-root"),
        ({"lr": "fast"}, "lr"),
        ({"generalist-width": 0.0}, "generalist-width"),
        ({"generalist-width": 1.5}, "generalist-width"),
        ({"generalist-proximal-mu": -0.1}, "generalist-proximal-mu"),
        ({"generalist-lr-scale": 0.0}, "generalist-lr-scale"),
        ({"anchor-gate-loss": "two-hot"}, "anchor-gate-loss"),
    ],
)
def test_bad_config_names_the_key(overrides, key):
    with pytest.raises(ConfigError, match=key):
        resolve({**DEFAULTS, **overrides})


def test_preset_with_a_typo_names_the_key(tmp_path):
    preset = tmp_path / "typo.yaml"
    preset.write_text("num-expert: 4\n")
    with pytest.raises(ConfigError, match="num-expert"):
        resolve({**DEFAULTS, "config-file": str(preset)})
    with pytest.raises(ConfigError, match="not found"):
        resolve({**DEFAULTS, "config-file": "configs/nope.yaml"})


def test_integer_for_a_float_key_is_accepted():
    assert resolve({**DEFAULTS, "lr": 1})["lr"] == 1.0


def test_explicit_override_equal_to_the_default_beats_the_preset(tmp_path):
    preset = tmp_path / "p.yaml"
    preset.write_text("batch-size: 256\nlr: 0.05\n")
    run_config = {**DEFAULTS, "config-file": str(preset), "batch-size": 32}
    # Flower's override_config: exactly the keys given with --run-config.
    cfg = resolve(run_config, explicit={"config-file": str(preset), "batch-size": 32})
    assert (cfg["batch-size"], cfg["lr"]) == (32, 0.05)
    # Without it, 32 (the default) looks like no override and the preset wins, as before.
    assert resolve(run_config)["batch-size"] == 256
    # An empty override_config behaves as none: values differing from the default still win.
    assert resolve({**run_config, "batch-size": 64}, explicit={})["batch-size"] == 64
    with pytest.raises(ConfigError, match="bogus"):
        resolve(run_config, explicit={"bogus": 1})
