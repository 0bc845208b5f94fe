"""The comparison benchmark: every method end to end on digits, table, plots, bytes."""

import json

import pytest
from flwr.app import ArrayRecord, MessageType

from benchmarks import compare
from benchmarks.compare import METHODS, CountingGrid, main, parse_args, resolve_config, run_method, summarise
from client_app.app import app as client_app
from ddome_strategy.arrays import expert_prefix, experts_in, select
from ddome_strategy.models import generalist_hidden
from ddome_strategy.protocol import ARRAYS
from server_app.app import build_common_expert, build_moe
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
            "num-server-rounds=5",
            "eval-every=2",
            "eval-last-rounds=2",
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
    # The generalist (expert M, the default) is DDOME's: FedMix's gate scores the M experts only.
    m = report["config"]["num-experts"]
    widths = [len(results[k]["routing"]["matrix"][0]) for k in ("ddome", "ddome-no-generalist", "fedmix")]
    assert widths == [m + 1, m, m]
    # ... and its heatmap names the generalist's column; the others have none.
    assert [results[k]["routing"].get("generalist") for k in ("ddome", "ddome-no-generalist", "fedmix")] == [
        m,
        None,
        None,
    ]
    # Curves have one point per evaluation round for trained methods: every eval-every
    # rounds (2, 4) and every one of the last eval-last-rounds (4, 5).
    assert [h["round"] for h in results["fedavg"]["history"]] == [2, 4, 5]
    assert [h["round"] for h in results["ddome"]["history"]] == [2, 4, 5]


def test_table_and_plots_are_written_and_parseable(benchmark_run):
    out, report = benchmark_run
    rows = [line for line in (out / "table.md").read_text().splitlines() if line.startswith("| ") and "---" not in line]
    header, body = rows[0], rows[1:]
    assert "zero-shot" in header and len(body) == len(METHODS)
    by_name = {cells[1].strip(): cells for cells in (row.split("|") for row in body)}
    ddome = next(r for r in report["results"] if r["method"] == "ddome")
    assert float(by_name["DDOME"][3]) == pytest.approx(100 * ddome["zero-shot-acc"], abs=0.01)
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
    and reply it carries: ``train`` / ``train.single`` messages, and queries to training
    clients (the routing phase; with ``eval-train-clients=False`` no evaluation query goes
    to them)."""

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
            kind = m.metadata.message_type.split(".")[0]  # the category of a named action
            if m.has_content() and (
                kind == MessageType.TRAIN or (kind == MessageType.QUERY and client in self.train_nodes)
            ):
                self.bytes += sum(r.count_bytes() for r in m.content.array_records.values())
        return replies


@pytest.mark.parametrize("method", ["ddome", "fedavg", "fedprox", "fedmix", "avg-ensembles"])
def test_bytes_per_round_equal_the_arrays_on_the_wire(method, digits_benchmark):
    cfg, dataset, common = digits_benchmark("num-server-rounds=3", "eval-train-clients=false")
    grid = InProcessGrid(client_app, cfg["num-train-clients"] + cfg["num-test-clients"])
    train_nodes = [n for n, c in grid.contexts.items() if c.node_config["partition-id"] < cfg["num-train-clients"]]
    recording = RecordingGrid(grid, train_nodes)
    result = run_method(method, cfg, dataset, common, lambda line: None, recording)
    assert recording.bytes > 0
    assert result["bytes-per-round"] == pytest.approx(recording.bytes / cfg["num-server-rounds"], rel=1e-9)


def test_a_generalist_run_sends_and_trains_the_generalist_in_every_training_message(digits_benchmark):
    cfg, dataset, common = digits_benchmark("num-server-rounds=3", "eval-train-clients=false", "generalist=true")
    grid = InProcessGrid(client_app, cfg["num-train-clients"] + cfg["num-test-clients"])
    train_nodes = [n for n, c in grid.contexts.items() if c.node_config["partition-id"] < cfg["num-train-clients"]]
    recording = RecordingGrid(grid, train_nodes)
    sent = []
    send = recording.send_and_receive

    def spy(messages, *, timeout=None):
        messages = list(messages)
        sent.extend(m.content[ARRAYS] for m in messages if m.metadata.message_type == MessageType.TRAIN)
        return send(messages, timeout=timeout)

    recording.send_and_receive = spy
    result = run_method("ddome", cfg, dataset, common, lambda line: None, recording)
    m, k = cfg["num-experts"], cfg["top-k"]
    sent_experts = [experts_in(arrays) for arrays in sent]
    assert len(sent_experts) == 3 * (cfg["anchors-per-round"] + cfg["normal-per-round"])
    # Anchors: their own expert and the generalist; normal clients: top-K of 0..M-1 and it.
    assert all(e[-1] == m and len(e) in (2, k + 1) and max(e[:-1]) < m for e in sent_experts)
    # The generalist has generalist-width (0.7 by default) of an expert's hidden units,
    # and about that share of its bytes.
    width = cfg["generalist-width"]
    hidden = generalist_hidden(cfg["mlp-hidden"], width)
    assert hidden == round(cfg["mlp-hidden"] * 0.7)
    for arrays in sent:
        assert arrays[f"{expert_prefix(m)}head.weight"].shape == (dataset.num_classes, hidden)
        specialist = next(e for e in experts_in(arrays) if e != m)
        share = (
            select(arrays, [expert_prefix(m)]).count_bytes() / select(arrays, [expert_prefix(specialist)]).count_bytes()
        )
        assert width - 0.05 < share < width + 0.05
    assert result["bytes-per-round"] == pytest.approx(recording.bytes / cfg["num-server-rounds"], rel=1e-9)
    assert result["zero-shot-acc"] > 0.3


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
            "num-server-rounds=5",
            "eval-every=2",
            "eval-last-rounds=2",
            f"cache-dir={report['config']['cache-dir']}",
            "--out",
            str(out),
        ]
    )
    (sim,) = json.loads((out / "results.json").read_text())["results"]
    assert sim["zero-shot-acc"] == pytest.approx(in_process["fedavg"]["zero-shot-acc"], abs=1e-6)
    assert sim["bytes-per-round"] == in_process["fedavg"]["bytes-per-round"]


def test_reported_figures_are_the_last_evaluations_not_the_final_one():
    history = [
        {"round": r, "test/zero-shot-acc": acc} for r, acc in enumerate([0.9, 0.1, 0.5, 0.7, 0.2, 0.4, 0.6, 0.3], 1)
    ]
    figures = summarise(history)
    assert figures["final"] == 0.3
    assert figures["mean-last"] == pytest.approx((0.7 + 0.2 + 0.4 + 0.6 + 0.3) / 5)
    assert figures["best-of-last"] == 0.9  # fewer than 10 evaluations: the best of all
    assert summarise(history * 2)["best-of-last"] == 0.9 and summarise(history[1:] * 2)["best-of-last"] == 0.7


def test_fedmix_is_scored_by_the_mixture_it_was_trained_for(benchmark_run):
    _, report = benchmark_run
    results = {r["method"]: r for r in report["results"]}
    fedmix, ddome = results["fedmix"], results["ddome"]
    assert fedmix["score"] == "mixture-acc" and ddome["score"] == "zero-shot-acc"
    for row in fedmix["history"]:
        assert row["test/zero-shot-acc"] == row["test/mixture-acc"]
    for row in ddome["history"]:  # DDOME: its configured rule, the blend of its mixture and the common expert
        assert row["test/zero-shot-acc"] == row["test/blend-acc"]


def test_every_trained_baseline_also_reports_the_blend_control(benchmark_run):
    # The control of DDOME's blend rule: each baseline's own predictions blended with the
    # common expert, beside (not instead of) its score.
    _, report = benchmark_run
    results = {r["method"]: r for r in report["results"]}
    for method in ("fedavg", "fedprox", "fedmix", "avg-ensembles"):
        for row in results[method]["history"]:
            assert 0 <= row["test/blend-acc"] <= 1 and 0 <= row["train/blend-acc"] <= 1, method
    assert all("test/blend-acc" not in row for row in results["common-expert"]["history"])


def _first_train_arrays(method, cfg, dataset, common):
    grid = InProcessGrid(client_app, cfg["num-train-clients"] + cfg["num-test-clients"])
    sent = []

    class Recording(CountingGrid):
        def send_and_receive(self, messages, *, timeout=None):
            messages = list(messages)
            sent.extend(m for m in messages if m.metadata.message_type.split(".")[0] == MessageType.TRAIN)
            return super().send_and_receive(messages, timeout=timeout)

    run_method(method, cfg, dataset, common, lambda line: None, Recording(grid))
    return sent[0].content["arrays"]


def test_every_method_starts_from_the_same_initialisation_whatever_experts_init(digits_benchmark):
    cfg, dataset, common = digits_benchmark("num-server-rounds=1", "experts-init=random")
    initial = build_moe(cfg, dataset, common)
    expert0 = compare.first_expert(initial)
    fedavg = _first_train_arrays("fedavg", cfg, dataset, common)
    ddome = _first_train_arrays("ddome", cfg, dataset, common)
    common_state = common.state_dict()
    assert set(fedavg) == set(expert0) == set(common_state)
    # FedAvg starts from the experts' initialisation (expert 0), DDOME from the same MoE...
    assert all((fedavg[k].numpy() == expert0[k].numpy()).all() for k in fedavg)
    assert all((ddome[k].numpy() == initial[k].numpy()).all() for k in ddome)
    # ...and with random experts, no longer from the common expert.
    assert any((fedavg[k].numpy() != common_state[k].numpy()).any() for k in fedavg)


def test_counting_grid_returns_replies_in_the_order_the_messages_were_sent(fake_grid_class):
    from flwr.app import Message, RecordDict

    class Reversed(fake_grid_class):
        def send_and_receive(self, messages, *, timeout=None):
            return list(reversed(super().send_and_receive(messages, timeout=timeout)))

    grid = Reversed({n: (lambda m: Message(RecordDict(), reply_to=m)) for n in (5, 3, 9)})
    messages = [Message(RecordDict(), dst_node_id=n, message_type=MessageType.TRAIN) for n in (9, 5, 3)]
    replies = CountingGrid(grid).send_and_receive(messages)
    assert [r.metadata.src_node_id for r in replies] == [9, 5, 3]


def test_explicit_run_config_beats_the_preset_even_at_its_default(tmp_path):
    preset = tmp_path / "preset.yaml"
    preset.write_text("dataset: digits\nbatch-size: 256\n")
    args = parse_args(["--config-file", str(preset), "--run-config", "batch-size=32"])
    assert resolve_config(args, 0)["batch-size"] == 32
    assert resolve_config(parse_args(["--config-file", str(preset)]), 0)["batch-size"] == 256


def test_tuning_chooses_on_the_validation_split_and_reports_best_and_spec(tmp_path, monkeypatch):
    monkeypatch.setattr(compare, "TUNING_GRID", {"batch-size": (16, 256), "lr": (0.01,)})
    monkeypatch.setattr(compare, "FEDPROX_MUS", (0.01, 1.0))
    out = tmp_path / "tuned"
    main(
        [
            "--tune",
            "--jobs",
            "2",
            "--methods",
            "ddome,fedprox,common-expert",
            "--config-file",
            "configs/digits-tiny.yaml",
            "--run-config",
            "num-server-rounds=2",
            f"cache-dir={tmp_path}",
            "--out",
            str(out),
        ]
    )
    saved = json.loads((out / "results.json").read_text())
    tuning, results = saved["tuning"], saved["results"]
    # The whole grid was scored on the validation split; FedProx also over mu.
    assert {r["split"] for r in tuning} == {"validation"}
    assert sum(r["method"] == "fedprox" for r in tuning) == 4 and sum(r["method"] == "ddome" for r in tuning) == 2
    assert {r["split"] for r in results} == {"test"}
    for method in ("ddome", "fedprox"):
        scored = [r for r in tuning if r["method"] == method]
        best = max(scored, key=lambda r: r["zero-shot-acc"])
        (chosen,) = [r for r in results if r["method"] == method and r["kind"] == "best"]
        assert chosen["setting"] == best["setting"]
        # The spec's setting is reported too (a separate run unless it was the best).
        assert any(
            r["method"] == method and r["spec-setting"] and r["trained-with"]["batch-size"] == 256 for r in results
        )
    table = (out / "table.md").read_text()
    assert "own best setting" in table and "spec's local training" in table and "validation split" in table
    # The grid's runs are kept as soon as they end; --tuned chooses from them without re-running.
    assert json.loads((out / "tuning.json").read_text())["tuning"] == tuning
    monkeypatch.setattr(compare, "tuning_points", lambda method: pytest.fail("--tuned must not re-run the grid"))
    again = tmp_path / "again"
    main(
        ["--tune", "--tuned", str(out / "tuning.json"), "--methods", "ddome,fedprox,common-expert"]
        + ["--config-file", "configs/digits-tiny.yaml", "--run-config", "num-server-rounds=2"]
        + [f"cache-dir={tmp_path}", "--out", str(again)]
    )
    rerun = json.loads((again / "results.json").read_text())["results"]
    assert [(r["method"], r["setting"], r["zero-shot-acc"]) for r in rerun] == [
        (r["method"], r["setting"], r["zero-shot-acc"]) for r in results
    ]
