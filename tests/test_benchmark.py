"""The comparison benchmark: every method end to end on digits, table, plots, bytes."""

import json

import pytest
from flwr.app import ArrayRecord, MessageType

from benchmarks.compare import METHODS, main, parse_args, resolve_config, run_method
from client_app.app import app as client_app
from server_app.app import build_common_expert
from server_app.inprocess import InProcessGrid


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
    for png in ("accuracy.png", "routing-seed0.png", "routing-fedmix-seed0.png"):
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


class RecordingGrid:
    """Wraps a grid and sums ``ArrayRecord.count_bytes`` of every training-phase message
    and reply it carries: TRAIN messages, and QUERY messages to training clients (the
    routing phase; with ``eval-train-clients=False`` no evaluation query goes to them)."""

    def __init__(self, grid, train_nodes):
        self.grid, self.train_nodes, self.bytes = grid, set(train_nodes), 0

    def get_node_ids(self):
        return self.grid.get_node_ids()

    def send_and_receive(self, messages, *, timeout=None):
        messages = list(messages)
        replies = list(self.grid.send_and_receive(messages, timeout=timeout))
        sent = [(m, m.metadata.dst_node_id) for m in messages]
        received = [(r, r.metadata.src_node_id) for r in replies]
        for m, client in [*sent, *received]:
            kind = m.metadata.message_type
            if m.has_content() and (
                kind == MessageType.TRAIN or (kind == MessageType.QUERY and client in self.train_nodes)
            ):
                self.bytes += sum(r.count_bytes() for r in m.content.array_records.values())
        return replies


@pytest.mark.parametrize("method", ["ddome", "fedavg", "fedprox", "fedmix", "avg-ensembles"])
def test_bytes_per_round_equal_the_arrays_on_the_wire(method, tmp_path):
    args = parse_args(
        ["--config-file", "configs/digits-tiny.yaml", "--run-config", "num-server-rounds=3", f"cache-dir={tmp_path}"]
    )
    cfg = {**resolve_config(args, 0), "eval-train-clients": False}
    dataset, common, _ = build_common_expert(cfg)
    grid = InProcessGrid(client_app, cfg["num-train-clients"] + cfg["num-test-clients"])
    train_nodes = [n for n, c in grid.contexts.items() if c.node_config["partition-id"] < cfg["num-train-clients"]]
    recording = RecordingGrid(grid, train_nodes)
    result = run_method(method, cfg, dataset, common, lambda line: None, recording)
    assert recording.bytes > 0
    assert result["bytes-per-round"] == pytest.approx(recording.bytes / cfg["num-server-rounds"], rel=1e-9)


@pytest.mark.simulation
def test_simulation_engine_gives_the_in_process_result(benchmark_run, tmp_path):
    """``--engine simulation`` (Ray) runs the same strategy and gets the same figures."""
    _, report = benchmark_run
    in_process = {r["method"]: r for r in report["results"]}
    out = tmp_path / "sim"
    main(
        [
            "--engine",
            "simulation",
            "--methods",
            "fedavg",
            "--config-file",
            "configs/digits-tiny.yaml",
            "--run-config",
            "num-server-rounds=4",
            "eval-every=2",
            f"cache-dir={report['config']['cache-dir']}",
            "--out",
            str(out),
        ]
    )
    (sim,) = json.loads((out / "results.json").read_text())["results"]
    assert sim["zero-shot-acc"] == pytest.approx(in_process["fedavg"]["zero-shot-acc"], abs=1e-6)
    assert sim["bytes-per-round"] == in_process["fedavg"]["bytes-per-round"]
