"""The main job's launcher: `flwr run` on the local simulation, with an exit status that
tells a script whether the run completed."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from server_app.launch import RUN_STARTED, federation_config, superlink_pids

REPO = Path(__file__).resolve().parent.parent


def test_federation_has_one_supernode_per_client():
    assert federation_config("") == "num-supernodes=25 client-resources-num-cpus=1"
    tiny = federation_config("config-file='configs/digits-tiny.yaml' num-test-clients=2")
    assert tiny == "num-supernodes=12 client-resources-num-cpus=1"
    assert RUN_STARTED.search("🎊 Successfully started run 1931720526470734444").group(1) == "1931720526470734444"


def launch(tmp_path, run_config: str) -> subprocess.CompletedProcess:
    """``python -m server_app.launch`` as a user runs it, with a home folder of its own."""
    env = {**os.environ, "HOME": str(tmp_path / "home")}
    command = [sys.executable, "-m", "server_app.launch", "--run-config", run_config]
    return subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=600, check=False)


@pytest.mark.simulation
def test_a_completed_run_exits_zero_and_a_failed_one_non_zero_with_the_reason_last(tmp_path):
    before = superlink_pids()
    done = launch(
        tmp_path,
        f"config-file='configs/digits-tiny.yaml' num-server-rounds=2 output-dir='{tmp_path / 'out'}' "
        f"cache-dir='{tmp_path / 'cache'}'",
    )
    assert done.returncode == 0, done.stdout[-3000:]
    (run_dir,) = (tmp_path / "out").iterdir()
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["rounds"] == 2 and summary["zero-shot-acc"] > 0.3
    assert "round 2/2 | train loss" in done.stdout and "Aggregated MetricRecord" not in done.stdout

    (tmp_path / "empty").mkdir()
    failed = launch(tmp_path, f"resume='{tmp_path / 'empty'}' cache-dir='{tmp_path / 'cache'}'")
    assert failed.returncode == 1
    last = failed.stdout.strip().splitlines()[-1]
    assert last.startswith("DDOME run ") and "failed" in last and "no checkpoint" in last
    # The local SuperLinks these runs started are stopped again.
    assert superlink_pids() <= before


def test_a_config_error_stops_before_any_run(tmp_path):
    refused = launch(tmp_path, "top-k=9")
    assert refused.returncode == 2
    assert refused.stdout.strip().splitlines()[-1] == (
        "DDOME run not started: top-k=9 must be between 1 and num-experts=5."
    )


def test_the_app_bundle_leaves_out_results_and_stays_under_flowers_cap():
    # `flwr run` bundles the app with every .md/.json file under it and refuses a bundle
    # over 10 MB: docs/ (benchmark results, over 10 MB) and a user's outputs/ (run
    # folders, here one of 12 MB of incompressible JSON) must stay out, the app's code in.
    import base64
    import io
    import zipfile

    from flwr.cli.build import build_fab_from_files
    from flwr.cli.utils import collect_files

    files = collect_files(REPO)
    files["outputs/run/metrics.jsonl"] = base64.b64encode(os.urandom(9 * 2**20))
    fab, _ = build_fab_from_files(files)  # raises above the cap
    names = zipfile.ZipFile(io.BytesIO(fab)).namelist()
    assert "server_app/app.py" in names and "client_app/app.py" in names
    assert not [n for n in names if n.startswith(("docs/", "outputs/"))]
