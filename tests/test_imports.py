"""What importing the strategy loads: a ServerApp that only runs DDOME needs neither
PyTorch nor torchvision."""

import subprocess
import sys

import pytest


@pytest.mark.parametrize(
    ("statement", "unloaded"),
    [
        ("import ddome_strategy", "torchvision"),
        ("from ddome_strategy import DDOME, layout_roles, pack_moe", "torch"),
        ("import ddome_strategy.strategy", "torch"),
    ],
)
def test_importing_the_strategy_loads_neither_torch_nor_torchvision(statement, unloaded):
    # A fresh interpreter: in this one, other tests have imported PyTorch already.
    code = f"import sys; {statement}; print({unloaded!r} in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"


def test_the_torch_helpers_are_still_importable_from_the_package():
    code = (
        "import sys; from ddome_strategy import build_model, zero_shot_predictions; "
        "import ddome_strategy as d; print(build_model('mlp', (1, 4, 4), 3).head.out_features, "
        "'build_gate' in dir(d), 'torchvision' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.split() == ["3", "True", "False"]
