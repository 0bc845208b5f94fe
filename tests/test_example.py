"""The plug-in example (examples/digits-team): another team's federation on DDOME, end to
end through Flower's simulation engine, built only from the strategy and the client toolkit."""

import ast
import os
import sys
from pathlib import Path

import pytest
from flwr.serverapp import ServerApp
from flwr.simulation import run_simulation

EXAMPLE = Path(__file__).resolve().parent.parent / "examples" / "digits-team"
FILES = sorted(EXAMPLE.rglob("*.py")) + [EXAMPLE / "pyproject.toml"]


def test_example_is_short_and_uses_only_the_strategy_and_the_toolkit():
    assert sum(len(f.read_text().splitlines()) for f in FILES) < 150
    project = {"client_app", "server_app", "data", "benchmarks"}
    for file in FILES[:-1]:
        for node in ast.walk(ast.parse(file.read_text())):
            if isinstance(node, ast.ImportFrom | ast.Import):
                names = [node.module] if isinstance(node, ast.ImportFrom) else [a.name for a in node.names]
                assert not {n.split(".")[0] for n in names} & project, f"{file.name} imports {names}"


@pytest.mark.simulation
def test_example_federation_runs_in_flower_simulation(monkeypatch):
    monkeypatch.syspath_prepend(str(EXAMPLE))
    # Ray's workers import the example's ClientApp: they inherit this path.
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(EXAMPLE), *sys.path]))
    from digits_team.client_app import app as client_app
    from digits_team.server_app import run

    results = []
    server_app = ServerApp()

    @server_app.main()
    def main(grid, context):
        results.append(run(grid, num_rounds=30))

    run_simulation(
        server_app=server_app,
        client_app=client_app,
        num_supernodes=11,
        backend_config={"client_resources": {"num_cpus": 1, "num_gpus": 0.0}},
    )
    assert results, "the example's ServerApp did not finish"
    result = results[0]
    assert sorted(result.train_metrics_clientapp) == list(range(1, 31))
    # Every round aggregated the 3 anchors and 4 normal clients; each of the 3 experts trained.
    assert all(m["num-replies"] == 7 and m["experts-trained"] == 3 for m in result.train_metrics_clientapp.values())
    last = result.evaluate_metrics_clientapp[30]
    # The two unseen test clients, zero-shot: better than the common expert they all hold.
    assert last["test/zero-shot-acc"] > last["test/common-expert-acc"] + 0.02
    assert last["test/routing-error"] < 0.5  # 3 experts: routing at random errs 2/3 of the time
