"""The settings x methods matrix: one table, a row per method and a column per setting."""

import json

import numpy as np
import pytest

from benchmarks import matrix


def tiny_matrix(tmp_path, settings: str, methods: str, *extra: str):
    """A 2-round, 1-seed matrix of ``methods`` on ``settings``; ``extra``: run-config
    overrides, then further options."""
    return matrix.main(
        ["--settings", settings, "--methods", methods, "--seeds", "0", "--rounds", "2", "--out", str(tmp_path / "m")]
        + ["--run-config", f"cache-dir={tmp_path / 'cache'}", *extra]
    )


def test_matrix_writes_a_row_per_method_and_a_column_per_setting(tmp_path, monkeypatch):
    # Two digits columns (the real ones are Fashion-MNIST): grouped, and Dirichlet with group anchors.
    monkeypatch.setitem(matrix.SETTINGS, "digits Dirichlet", ("configs/digits-tiny.yaml", ["partition-mode=dirichlet"]))
    tuned = tmp_path / "tuned.json"
    tuned.write_text(
        json.dumps({"results": [{"method": "fedavg", "kind": "best", "setting": {"batch-size": 64, "lr": 0.03}}]})
    )
    out = tiny_matrix(
        tmp_path,
        "digits grouped,digits Dirichlet",
        "ddome,fedavg,common-expert",
        "dirichlet-anchors=group",
        "--settings-from",
        str(tuned),
    )
    table = (out / "matrix.md").read_text()
    rows = [line for line in table.splitlines() if line.startswith("| ") and "---" not in line]
    header, body = rows[0], rows[1:]
    assert "digits grouped" in header and "digits Dirichlet" in header
    assert [r.split("|")[1].strip() for r in body[:3]] == ["DDOME", "FedAvg", "Common expert alone"]
    results = json.loads((out / "results.json").read_text())["results"]
    assert len(results) == 2 * 3
    ddome = next(r for r in results if r["method"] == "ddome" and r["column"] == "digits grouped")
    cell = next(r for r in body[:3] if "DDOME" in r).split("|")[2].strip()
    assert float(cell.split(" ± ")[0]) == pytest.approx(100 * ddome["zero-shot-acc"], abs=0.01)
    # DDOME under every prediction rule: the configured one (blend) is the table's DDOME cell.
    rules = table.split("each zero-shot prediction rule")[1]
    blend = next(line for line in rules.splitlines() if line.startswith("| blend |"))
    assert blend.split("|")[2].strip() == cell.split(" ± ")[0]
    assert all(f"| {rule} |" in rules for rule in ("top1", "mixture", "fallback", "confident"))
    # The control: FedAvg blended with the common expert, from its own evaluations; DDOME's
    # blend is its score; the common expert alone has no such row.
    control = table.split("Control:")[1].split("Per seed")[0]
    control_rows = {line.split("|")[1].strip(): line for line in control.splitlines() if line.startswith("| ")}
    assert set(control_rows) == {"method, blended with the common expert", "DDOME", "FedAvg"}
    assert control_rows["DDOME"].split("|")[2].strip() == cell.split(" ± ")[0]
    fedavg = next(r for r in results if r["method"] == "fedavg" and r["column"] == "digits grouped")
    assert all(0 <= h["test/blend-acc"] <= 1 for h in fedavg["history"])
    assert any(h["test/blend-acc"] != h["test/zero-shot-acc"] for h in fedavg["history"])
    # DDOME against the best other method of each column, and its bytes as a share of FedMix's
    # (FedMix is not in this matrix: no such table); computed on a finished run it matches.
    assert "against the best other method" not in table
    versus = matrix.versus_best_table(results, ["digits grouped"])
    assert versus == ""
    fedmix_like = [
        {**r, "method": "fedmix", "bytes-per-round": 2 * r["bytes-per-round"]}
        for r in results
        if r["method"] == "fedavg"
    ]
    versus = matrix.versus_best_table(results + fedmix_like, ["digits grouped"])
    row = next(line for line in versus.splitlines() if line.startswith("| DDOME |")).split("|")
    others = [
        r for r in results + fedmix_like if not r["method"].startswith("ddome") and r["column"] == "digits grouped"
    ]
    best = max(100 * r["zero-shot-acc"] for r in others)
    assert row[2].strip() == f"{100 * ddome['zero-shot-acc']:.2f} ({100 * ddome['zero-shot-acc'] - best:+.2f})"
    fedavg_bytes = next(r for r in results if r["method"] == "fedavg" and r["column"] == "digits grouped")[
        "bytes-per-round"
    ]
    assert row[-2].strip().split(", ")[0] == f"{100 * ddome['bytes-per-round'] / (2 * fedavg_bytes):.1f}%"
    # Only DDOME's rows record DDOME's options: the baselines run without them.
    assert {r["method"] for r in results if "ddome-options" in r} == {"ddome"}
    # FedAvg runs at the setting its tuning chose, in every column.
    assert {r["trained-with"]["batch-size"] for r in results if r["method"] == "fedavg"} == {64}


def test_the_published_matrix_ran_the_current_default():
    # docs/results.md's table is docs/img/matrix: its DDOME row must be today's defaults
    # (a changed default without a new matrix run fails here), its ablation rows their presets.
    from benchmarks.compare import DDOME_OPTIONS, VARIANT_PRESETS
    from server_app.config import DEFAULTS, load_preset

    results = json.loads(open("docs/img/matrix/results.json", encoding="utf-8").read())["results"]
    options = {r["method"]: r["ddome-options"] for r in results if r["method"].startswith("ddome")}
    assert options["ddome"] == {k: DEFAULTS[k] for k in DDOME_OPTIONS}
    # A variant without the generalist is not made stale by an option of the generalist's
    # (its reused row may predate that option): those are compared only where it has one.
    generalist_only = {"generalist-width", "generalist-proximal-mu", "generalist-lr-scale", "anchor-gate-loss"}
    for variant, preset in VARIANT_PRESETS.items():
        expected = {**{k: DEFAULTS[k] for k in DDOME_OPTIONS}, **load_preset(preset)}
        keys = [k for k in DDOME_OPTIONS if expected["generalist"] or k not in generalist_only]
        assert {k: options[variant].get(k) for k in keys} == {k: expected[k] for k in keys}, variant


def test_a_ddome_variant_trains_at_ddomes_chosen_setting_unless_tuned_itself():
    chosen = {"ddome": {"batch-size": 32, "lr": 0.03}, "fedavg": {"batch-size": 256}}
    assert matrix.setting_of("ddome-no-generalist", chosen) == chosen["ddome"]
    assert matrix.setting_of("ddome-paper", chosen) == {}  # the paper's own training
    assert matrix.setting_of("fedavg", chosen) == chosen["fedavg"]
    assert matrix.setting_of("fedprox", chosen) == {}


def test_a_later_tuning_run_replaces_a_methods_earlier_choice(tmp_path):
    # The matrix takes every method's choice from the first tuning run and DDOME's from a
    # later one that re-tuned it alone after its default changed.
    def tuning_run(name, rows):
        path = tmp_path / name
        path.write_text(json.dumps({"results": rows}))
        return str(path)

    grid = tuning_run(
        "grid.json",
        [
            {"method": "ddome", "kind": "best", "setting": {"batch-size": 32, "lr": 0.03}},
            {"method": "ddome", "kind": "spec", "setting": {"batch-size": 256, "lr": 0.01}},
            {"method": "fedavg", "kind": "best", "setting": {"batch-size": 256, "lr": 0.03}},
        ],
    )
    retuned = tuning_run("ddome.json", [{"method": "ddome", "kind": "best", "setting": {"batch-size": 32, "lr": 0.1}}])
    chosen = matrix.chosen_settings(f"{grid},{retuned}")
    assert chosen == {"ddome": {"batch-size": 32, "lr": 0.1}, "fedavg": {"batch-size": 256, "lr": 0.03}}
    assert matrix.chosen_settings(grid)["ddome"] == {"batch-size": 32, "lr": 0.03}
    assert matrix.chosen_settings("") == {}


def test_tune_lr_chooses_each_methods_rate_on_the_validation_mean_over_columns(tmp_path):
    out = tiny_matrix(
        tmp_path, "digits grouped", "ddome,ddome-no-generalist,fedavg,common-expert", "--tune-lr", "0.01,0.1"
    )
    run = json.loads((out / "results.json").read_text())
    tuning, results = run["tuning"], run["results"]
    # The tuned methods ran at each rate on the validation split; the variant and the
    # common expert were not tuned.
    assert {(r["method"], r["setting"]["lr"]) for r in tuning} == {
        (m, lr) for m in ("ddome", "fedavg") for lr in (0.01, 0.1)
    }
    assert {r["split"] for r in tuning} == {"validation"} and {r["split"] for r in results} == {"test"}
    for method in ("ddome", "fedavg"):
        scores = {r["setting"]["lr"]: r["zero-shot-acc"] for r in tuning if r["method"] == method}
        best = max(scores, key=scores.get)
        tested = next(r for r in results if r["method"] == method)
        assert tested["trained-with"]["lr"] == best
        assert tested["setting"]["gate-lr"] == pytest.approx(best / 10)
    # The variant trains at DDOME's chosen rate; the choices feed a later matrix (--settings-from).
    variant = next(r for r in results if r["method"] == "ddome-no-generalist")
    assert variant["trained-with"]["lr"] == next(r for r in results if r["method"] == "ddome")["trained-with"]["lr"]
    assert matrix.chosen_settings(str(out / "results.json"))["fedavg"]["lr"] in (0.01, 0.1)
    table = (out / "matrix.md").read_text()
    assert "Choosing the learning rate" in table and table.count("**") >= 4
    # DDOME tuned again beside the reused rows: FedAvg's validation runs and choice are kept.
    again = matrix.main(
        ["--settings", "digits grouped", "--methods", "ddome", "--seeds", "0", "--rounds", "2", "--tune-lr", "0.01,0.1"]
        + ["--out", str(tmp_path / "again"), "--reuse", str(out / "results.json")]
        + ["--run-config", f"cache-dir={tmp_path / 'cache'}"]
    )
    rerun = json.loads((again / "results.json").read_text())
    assert [r for r in rerun["tuning"] if r["method"] == "fedavg"] == [r for r in tuning if r["method"] == "fedavg"]
    assert {r["method"] for r in rerun["tuning"]} == {"ddome", "fedavg"}
    fedavg_choice = next(c for c in run["chosen"] if c["method"] == "fedavg")
    assert next(c for c in rerun["chosen"] if c["method"] == "fedavg") == fedavg_choice
    lr = fedavg_choice["setting"]["lr"]
    assert f"| FedAvg | **{lr:g}** |" in (again / "matrix.md").read_text()


def test_the_paired_table_takes_differences_within_each_seed_and_pools_runs(tmp_path, capsys):
    def run(method, seed, acc, column="c"):
        return {"method": method, "column": column, "seed": seed, "zero-shot-acc": acc / 100}

    first = [run("ddome", 0, 90), run("fedavg", 0, 80), run("fedmix", 0, 85), run("ddome", 1, 70), run("fedavg", 1, 75)]
    first += [run("fedmix", 1, 60), run("ddome", 0, 50, "other"), run("fedavg", 0, 55, "other")]
    # FedAvg's mean (77.5) beats FedMix's (72.5): the differences are DDOME's minus FedAvg's, seed by seed.
    table = matrix.paired_table(first, ["c", "other"])
    row = next(line for line in table.splitlines() if line.startswith("| c |")).split("|")
    assert [cell.strip() for cell in row[2:5]] == ["FedAvg", "2", "80.00"]
    gaps = [10.0, -5.0]
    error = float(np.std(gaps, ddof=1) / np.sqrt(2))
    assert row[6].strip() == f"+2.50 ± {error:.2f}" and row[7].strip() == "1 of 2"
    other = next(line for line in table.splitlines() if line.startswith("| other |")).split("|")
    assert other[6].strip() == "-5.00 ± nan" and other[7].strip() == "0 of 1"
    # Pooled from two results.json files on the command line: three seeds now.
    (tmp_path / "a.json").write_text(json.dumps({"results": first}))
    (tmp_path / "b.json").write_text(json.dumps({"results": [run("ddome", 2, 95), run("fedavg", 2, 70)]}))
    matrix.main(["--versus-best", str(tmp_path / "a.json"), str(tmp_path / "b.json")])
    printed = capsys.readouterr().out
    pooled = next(line for line in printed.splitlines() if line.startswith("| c |")).split("|")
    assert pooled[3].strip() == "3" and pooled[7].strip() == "2 of 3"
    assert "MB per round" not in printed  # pooled rows hold other seeds: no unpaired table
    # A later file's DDOME run of seed 1 (re-run after its default moved) replaces the first's.
    (tmp_path / "c.json").write_text(json.dumps({"results": [run("ddome", 1, 85)]}))
    matrix.main(["--versus-best", *(str(tmp_path / f) for f in ("a.json", "b.json", "c.json"))])
    rerun = next(line for line in capsys.readouterr().out.splitlines() if line.startswith("| c |")).split("|")
    assert rerun[3].strip() == "3" and rerun[6].strip().startswith("+15.00") and rerun[7].strip() == "3 of 3"


def test_reuse_runs_only_the_named_methods_and_takes_the_others_rows_from_a_finished_run(tmp_path):
    first = tiny_matrix(tmp_path, "digits grouped", "ddome,fedavg,common-expert")
    old = json.loads((first / "results.json").read_text())
    again = matrix.main(
        ["--settings", "digits grouped", "--methods", "ddome", "--seeds", "0", "--rounds", "2"]
        + ["--out", str(tmp_path / "again"), "--reuse", str(first / "results.json")]
        + ["--run-config", f"cache-dir={tmp_path / 'cache'}", "generalist-width=1.0"]
    )
    run = json.loads((again / "results.json").read_text())
    assert [r["method"] for r in run["results"]] == ["ddome", "fedavg", "common-expert"]
    for method in ("fedavg", "common-expert"):
        assert next(r for r in run["results"] if r["method"] == method) == next(
            r for r in old["results"] if r["method"] == method
        )
    # DDOME ran again, with the new option: its generalist is as wide as the experts now.
    assert next(r for r in run["results"] if r["method"] == "ddome")["ddome-options"]["generalist-width"] == 1.0
    table = (again / "matrix.md").read_text()
    assert f"The rows of FedAvg; Common expert alone are the runs of `{old['command']}`" in table
    rows = [line.split("|")[1].strip() for line in table.split("Control:")[0].splitlines() if line.startswith("| ")]
    assert rows[1:4] == ["DDOME", "FedAvg", "Common expert alone"]
    # Reused again by a later DDOME-only run, the rows still name the command that ran them.
    third = matrix.main(
        ["--settings", "digits grouped", "--methods", "ddome", "--seeds", "0", "--rounds", "2"]
        + ["--out", str(tmp_path / "third"), "--reuse", str(again / "results.json")]
        + ["--run-config", f"cache-dir={tmp_path / 'cache'}"]
    )
    assert (
        f"The rows of FedAvg; Common expert alone are the runs of `{old['command']}`"
        in (third / "matrix.md").read_text()
    )
    commands = json.loads((third / "results.json").read_text())["commands"]
    assert commands["fedavg"] == old["command"] and f"--reuse {again / 'results.json'}" in commands["ddome"]
    # A finished run of another budget, or one that lacks a seed, is refused with the reason.
    with pytest.raises(SystemExit, match="ran 2 rounds, not 3"):
        matrix.main(
            ["--settings", "digits grouped", "--methods", "ddome", "--seeds", "0", "--rounds", "3"]
            + ["--reuse", str(first / "results.json")]
        )
    with pytest.raises(SystemExit, match="has no run of 'digits grouped', seed 1"):
        matrix.main(
            ["--settings", "digits grouped", "--methods", "ddome", "--seeds", "0,1", "--rounds", "2"]
            + ["--reuse", str(first / "results.json")]
        )
