"""The comparison benchmark: every method end to end on digits, table, plots, bytes."""

import json

import pytest
from flwr.app import ArrayRecord

from benchmarks.compare import METHODS, main
from server_app.app import build_common_expert


@pytest.fixture(scope="module")
def benchmark_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench")
    cache = tmp_path_factory.mktemp("cache")
    main(
        [
            "--config-file",
            "configs/digits-tiny.yaml",
            "--run-config",
            "num-server-rounds=4",
            "eval-every=2",
            f"cache-dir={cache}",
            "--out",
            str(out),
        ]
    )
    return out, json.loads((out / "results.json").read_text())


def test_every_method_runs_and_reports(benchmark_run):
    _, report = benchmark_run
    results = {r["method"]: r for r in report["results"]}
    assert set(results) == set(METHODS)
    for method, r in results.items():
        assert 0.0 <= r["zero-shot-acc"] <= 1.0, method
        assert r["zero-shot-acc"] > 0.3, method  # well above chance on 4-label clients
        assert r["train-clients-acc"] is not None, method
    assert results["common-expert"]["bytes-per-round"] == 0
    # Curves have one point per evaluation round (2 and 4) for trained methods.
    assert [h["round"] for h in results["fedavg"]["history"]] == [2, 4]
    assert [h["round"] for h in results["ddome"]["history"]] == [2, 4]


def test_table_and_plots_are_written_and_parseable(benchmark_run):
    out, report = benchmark_run
    rows = [line for line in (out / "table.md").read_text().splitlines() if line.startswith("| ") and "---" not in line]
    header, body = rows[0], rows[1:]
    assert "zero-shot" in header and len(body) == len(METHODS)
    by_name = {cells[1].strip(): cells for cells in (row.split("|") for row in body)}
    ddome = next(r for r in report["results"] if r["method"] == "ddome")
    assert float(by_name["DDOME"][2]) == pytest.approx(100 * ddome["zero-shot-acc"], abs=0.01)
    for png in ("accuracy.png", "routing-seed0.png"):
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    routing = ddome["routing"]
    assert len(routing["matrix"]) == len(routing["clients"]) == 13
    assert all(abs(sum(row) - 1) < 1e-4 for row in routing["matrix"])


def test_byte_accounting_matches_the_arrays_sent(benchmark_run, tmp_path):
    _, report = benchmark_run
    cfg = report["config"]
    results = {r["method"]: r for r in report["results"]}
    _, common, _ = build_common_expert({**cfg, "seed": 0})
    model_bytes = ArrayRecord(common.state_dict()).count_bytes()
    per_round = cfg["anchors-per-round"] + cfg["normal-per-round"]
    # FedAvg: the model goes down to and back from every sampled client.
    assert results["fedavg"]["bytes-per-round"] == 2 * per_round * model_bytes
    # FedMix sends all M experts, DDOME at most K (+ the gate and the routing scores).
    assert results["fedmix"]["bytes-per-round"] > results["ddome"]["bytes-per-round"]


def test_replot_redraws_from_saved_results(benchmark_run):
    out, report = benchmark_run
    (out / "accuracy.png").unlink()
    (out / "table.md").unlink()
    main(["--replot", str(out)])
    assert (out / "accuracy.png").read_bytes()[:4] == b"\x89PNG"
    assert report["command"] in (out / "table.md").read_text()
