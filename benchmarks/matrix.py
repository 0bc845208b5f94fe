"""Every method on every setting: where DDOME helps and where it does not.

    python -m benchmarks.matrix --seeds 0,1,2 --jobs 2 --settings-from docs/img/fair-grouped/results.json \
        --tune-lr 0.01,0.03,0.1

Settings (columns): Fashion-MNIST grouped (the paper's reading), Dirichlet 0.1 and 0.5,
free label sets (4 labels per client), and scikit-learn's digits grouped (an easy dataset
where every method saturates). Every setting runs at the same round budget (the CPU
preset's 40, or ``--rounds``), the same seeds, and every method at one setting for all
columns: its best point from a ``benchmarks.compare --tune`` run (``--settings-from``),
with ``--tune-lr`` its learning rate chosen first on the validation split averaged over
every column, so no baseline is weakened and no method is tuned per column. Writes
``matrix.md`` (a row per method, a column per setting: mean of the last 5 evaluations over
the seeds, ± the spread; then MB per round and wall time; DDOME against the best other
method, on the means and seed by seed; the learning-rate choice) and ``results.json`` with
every run's per-seed figures and curves and the settings chosen (``--settings-from`` of a
later run reads them).
``--versus-best A/results.json B/results.json`` pools finished runs (the same settings on
other seeds; a later file's run of a method, setting and seed replaces an earlier one's)
into the seed-by-seed table. ``--methods ddome --reuse A/results.json`` runs DDOME again
and takes every other row from a finished run of the same seeds and rounds (their code
unchanged), saying so in matrix.md.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from collections import defaultdict
from pathlib import Path

import numpy as np

from benchmarks.compare import (
    METHODS,
    UNTUNED,
    VARIANT_PRESETS,
    best_settings,
    flower_log_level,
    run_tasks,
    summarise,
)
from benchmarks.compare import parse_args as compare_args
from benchmarks.report import NAMES
from ddome_strategy.moe import BLEND_COMMON_WEIGHT, ZERO_SHOT_RULES

# Column name -> (preset, run-config overrides).
SETTINGS = {
    "FMNIST grouped": ("", []),
    "FMNIST Dirichlet 0.1": ("", ["partition-mode=dirichlet", "dirichlet-alpha=0.1"]),
    "FMNIST Dirichlet 0.5": ("", ["partition-mode=dirichlet", "dirichlet-alpha=0.5"]),
    "FMNIST free (4 labels)": ("", ["partition-mode=free"]),
    "digits grouped": ("configs/digits-tiny.yaml", []),
}


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument("--settings", default=",".join(SETTINGS), help="comma-separated columns to run")
    parser.add_argument("--rounds", type=int, default=40, help="round budget of every setting")
    parser.add_argument("--run-config", nargs="*", default=[], help="overrides for every setting (e.g. DDOME options)")
    parser.add_argument(
        "--settings-from",
        default="",
        help="results.json of benchmarks.compare --tune runs, comma-separated (a later one's choice for a method "
        "replaces an earlier one's): each method's chosen setting (default: the config's)",
    )
    parser.add_argument(
        "--tune-lr",
        default="",
        metavar="LRS",
        help="comma-separated learning rates: first run every tuned method at each (its chosen batch size, the "
        "gate's a tenth) on the validation split of every column, keep the best mean over the columns, then "
        "run the matrix on the test split at those settings",
    )
    parser.add_argument("--jobs", type=int, default=1)
    parser.add_argument(
        "--versus-best",
        metavar="RESULTS",
        nargs="+",
        default=[],
        help="only print DDOME against the best other method for finished runs' results.json, pooled (e.g. the "
        "matrix and a run of the same settings on more seeds; a later file's run of a method, setting and seed "
        "replaces an earlier one's), with the per-seed differences",
    )
    parser.add_argument(
        "--reuse",
        metavar="RESULTS",
        default="",
        help="results.json of a finished run of this command at the same seeds and rounds: every method it ran "
        "that is not in --methods keeps its runs from it (a method whose code did not change since), and only "
        "--methods run again",
    )
    parser.add_argument("--out", default="")
    return parser.parse_args(argv)


def chosen_settings(paths: str) -> dict[str, dict]:
    """Each method's setting chosen on the validation split by ``--tune`` runs: a
    comma-separated list of their ``results.json``, a later run's choice replacing an
    earlier one's (a method re-tuned after its default changed)."""
    chosen: dict[str, dict] = {}
    for path in filter(None, paths.split(",")):
        run = json.loads(Path(path).read_text())
        # A tuning run's best rows, or the choices a matrix made with --tune-lr.
        chosen.update(
            {r["method"]: r["setting"] for r in run["results"] + run.get("chosen", []) if r["kind"] == "best"}
        )
    return chosen


def lr_candidates(method: str, chosen: dict[str, dict], lrs: list[float]) -> list[dict]:
    """``method``'s chosen setting at each learning rate of ``lrs`` (the gate's a tenth,
    the spec's ratio, as in the tuning grid)."""
    return [{**setting_of(method, chosen), "lr": lr, "gate-lr": lr / 10} for lr in lrs]


def tuning_table(tuning: list[dict], chosen: dict[str, dict], columns: list[str]) -> str:
    """Validation accuracy of every tuned method at every learning rate: per column and the
    mean over the columns (the choice in bold)."""
    lines = ["| method | lr | " + " | ".join(columns) + " | mean |", "|---" * (len(columns) + 3) + "|"]
    groups = defaultdict(list)
    for r in tuning:
        groups[(r["method"], r["setting"]["lr"])].append(r)
    for (method, lr), runs in groups.items():
        cells = [100 * np.mean([r["zero-shot-acc"] for r in runs if r["column"] == c]) for c in columns]
        mean = f"{100 * np.mean([r['zero-shot-acc'] for r in runs]):.2f}"
        mark = "**" if chosen[method]["lr"] == lr else ""
        row = [f"{c:.2f}" for c in cells] + [f"{mark}{mean}{mark}"]
        lines.append(f"| {NAMES[method]} | {mark}{lr:g}{mark} | " + " | ".join(row) + " |")
    return "\n".join(lines) + "\n"


def setting_of(method: str, chosen: dict[str, dict]) -> dict:
    """``method``'s chosen setting; a tuned DDOME variant the tuning run did not cover
    trains at DDOME's (its preset changes the method, not the local training)."""
    if method in chosen:
        return chosen[method]
    if method in VARIANT_PRESETS and method not in UNTUNED:
        return chosen.get("ddome", {})
    return {}


def matrix_table(results: list[dict], columns: list[str]) -> str:
    """A row per method, a column per setting: mean ± spread over seeds of the mean of the
    last 5 evaluations; then each setting's MB per round, and the total wall time."""
    cells = defaultdict(list)
    for r in results:
        cells[(r["method"], r["column"])].append(r)
    methods = list(dict.fromkeys(r["method"] for r in results))
    header = "| method | " + " | ".join(columns) + " | MB per round (" + ", ".join(columns) + ") | wall time (s) |"
    lines = [header, "|---" * (len(columns) + 3) + "|"]
    for method in methods:
        accs, mbs = [], []
        for column in columns:
            runs = cells[(method, column)]
            values = [100 * r["zero-shot-acc"] for r in runs]
            accs.append(f"{np.mean(values):.2f} ± {np.std(values):.2f}" if runs else "n/a")
            mbs.append(f"{np.mean([r['bytes-per-round'] for r in runs]) / 1e6:.2f}" if runs else "n/a")
        wall = sum(r["wall-seconds"] for column in columns for r in cells[(method, column)])
        lines.append(f"| {NAMES[method]} | " + " | ".join(accs) + f" | {', '.join(mbs)} | {wall:.0f} |")
    return "\n".join(lines) + "\n"


def mean_last_cell(results: list[dict], method: str, column: str, metric: str) -> str:
    """``method``'s ``metric`` in ``column``: the mean over seeds of the mean of the last 5
    evaluations, in %; ``n/a`` where a run did not report it."""
    runs = [r for r in results if r["method"] == method and r["column"] == column]
    values = [summarise(r["history"], metric=metric)["mean-last"] for r in runs]
    return f"{100 * np.mean(values):.2f}" if values and None not in values else "n/a"


def rules_table(results: list[dict], columns: list[str]) -> str:
    """DDOME's zero-shot accuracy under every prediction rule (each evaluation reports them
    all): mean over seeds of the mean of the last 5 evaluations, per setting."""
    lines = ["| DDOME's zero-shot rule | " + " | ".join(columns) + " |", "|---" * (len(columns) + 1) + "|"]
    for rule in ZERO_SHOT_RULES:
        cells = [mean_last_cell(results, "ddome", column, f"{rule}-acc") for column in columns]
        lines.append(f"| {rule} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def blend_control_table(results: list[dict], columns: list[str]) -> str:
    """Every method's predictions blended with the common expert as DDOME's ``blend`` rule
    does (the same runs; each evaluation reports it): how much of that rule's gain any
    method would get from the common expert, beside what DDOME's routing adds."""
    lines = ["| method, blended with the common expert | " + " | ".join(columns) + " |"]
    lines.append("|---" * (len(columns) + 1) + "|")
    for method in dict.fromkeys(r["method"] for r in results):
        cells = [mean_last_cell(results, method, column, "blend-acc") for column in columns]
        if set(cells) != {"n/a"}:
            lines.append(f"| {NAMES[method]} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def best_other_method(results: list[dict], column: str) -> str | None:
    """The method other than DDOME's with the highest mean zero-shot accuracy in ``column``
    (over every seed it ran), or None if there is none."""
    accuracy = defaultdict(list)
    for r in results:
        if r["column"] == column and not r["method"].startswith("ddome"):
            accuracy[r["method"]].append(r["zero-shot-acc"])
    return max(accuracy, key=lambda m: np.mean(accuracy[m]), default=None)


def versus_best_table(results: list[dict], columns: list[str]) -> str:
    """DDOME's rows against the best other method of each column (difference in points),
    and their bytes per round as a share of FedMix's: what issue 10's bar is read against."""

    def mean(method: str, column: str, key: str) -> float | None:
        values = [r[key] for r in results if r["method"] == method and r["column"] == column]
        return float(np.mean(values)) if values else None

    present = list(dict.fromkeys(r["method"] for r in results))
    others = [m for m in present if not m.startswith("ddome")]
    if not others or "fedmix" not in present:
        return ""
    best = {c: best_other_method(results, c) for c in columns}
    fedmix_mb = [mean("fedmix", c, "bytes-per-round") for c in columns]
    lines = ["| | " + " | ".join(columns) + " | MB per round, % of FedMix's |", "|---" * (len(columns) + 2) + "|"]
    cells = [f"{NAMES[best[c]]} {100 * mean(best[c], c, 'zero-shot-acc'):.2f}" for c in columns]
    lines.append(
        "| best other method | " + " | ".join(cells) + f" | FedMix {', '.join(f'{b / 1e6:.2f}' for b in fedmix_mb)} |"
    )
    for method in (m for m in present if m.startswith("ddome")):
        accs = [100 * mean(method, c, "zero-shot-acc") for c in columns]
        gaps = [a - 100 * mean(best[c], c, "zero-shot-acc") for a, c in zip(accs, columns)]
        share = [100 * mean(method, c, "bytes-per-round") / b for c, b in zip(columns, fedmix_mb)]
        row = [f"{a:.2f} ({g:+.2f})" for a, g in zip(accs, gaps)]
        lines.append(f"| {NAMES[method]} | " + " | ".join(row) + f" | {', '.join(f'{x:.1f}%' for x in share)} |")
    return "\n".join(lines) + "\n"


def paired_table(results: list[dict], columns: list[str], method: str = "ddome") -> str:
    """``method`` against the best other method of each column, seed by seed: the mean of the
    per-seed differences ± its standard error, and the seeds on which ``method`` is ahead.

    The seeds change the partition, the common expert and every initialisation, for every
    method alike, so a difference taken within a seed leaves out what they share; the
    standard error says how far a mean over this many seeds can move with other seeds.
    """
    lines = [
        "| setting | best other method | seeds | "
        + f"{NAMES[method]} | best other | difference, mean ± standard error | {NAMES[method]} ahead |",
        "|---|---|---|---|---|---|---|",
    ]
    for column in columns:
        accuracy = defaultdict(dict)
        for r in results:
            if r["column"] == column:
                accuracy[r["method"]][r["seed"]] = 100 * r["zero-shot-acc"]
        best = best_other_method(results, column)
        if method not in accuracy or best is None:
            continue
        seeds = sorted(set(accuracy[method]) & set(accuracy[best]))
        ours = np.array([accuracy[method][s] for s in seeds])
        theirs = np.array([accuracy[best][s] for s in seeds])
        gaps = ours - theirs
        error = gaps.std(ddof=1) / np.sqrt(len(gaps)) if len(gaps) > 1 else float("nan")
        lines.append(
            f"| {column} | {NAMES[best]} | {len(seeds)} | {ours.mean():.2f} | {theirs.mean():.2f} | "
            f"{gaps.mean():+.2f} ± {error:.2f} | {int((gaps > 0).sum())} of {len(seeds)} |"
        )
    return "\n".join(lines) + "\n"


def per_seed_table(results: list[dict], columns: list[str]) -> str:
    """Per seed figures: ``seed: accuracy`` for every method and setting."""
    lines = ["| method | setting | per seed (mean of last 5 evals, %) | setting used |", "|---|---|---|---|"]
    by_cell = defaultdict(list)
    for r in results:
        by_cell[(r["method"], r["column"])].append(r)
    for (method, column), runs in by_cell.items():
        seeds = ", ".join(f"{r['seed']}: {100 * r['zero-shot-acc']:.2f}" for r in runs)
        used = ", ".join(f"{k} {v:g}" for k, v in runs[0]["trained-with"].items()) or "-"
        lines.append(f"| {NAMES[method]} | {column} | {seeds} | {used} |")
    return "\n".join(lines) + "\n"


def pooled_results(paths: list[str]) -> list[dict]:
    """The runs of several results.json files; a later file's run of a method, setting and
    seed replaces an earlier file's (a method re-run on those seeds after its default moved)."""
    runs = {}
    for path in paths:
        for r in json.loads(Path(path).read_text())["results"]:
            runs[(r["method"], r["column"], r["seed"])] = r
    return list(runs.values())


def reused_runs(path: str, methods: list[str], columns: list[str], seeds: list[int], rounds: int) -> dict:
    """The runs of ``path`` (a finished matrix) of every method not in ``methods``, on
    ``columns`` and ``seeds``; each must have run ``rounds`` rounds, and each such method
    every column and seed, or the reuse is refused."""
    if not Path(path).is_file():
        raise SystemExit(f"--reuse {path}: no such results.json.")
    run = json.loads(Path(path).read_text())

    def wanted(r: dict) -> bool:
        return r["method"] not in methods and r["column"] in columns and r["seed"] in seeds

    kept = [r for r in run["results"] if wanted(r)]
    for r in kept:
        if r["history"][-1]["round"] != rounds:
            raise SystemExit(f"--reuse {path}: its {r['method']} ran {r['history'][-1]['round']} rounds, not {rounds}.")
    reused = list(dict.fromkeys(r["method"] for r in kept))
    for method in reused:
        missing = {(c, s) for c in columns for s in seeds} - {
            (r["column"], r["seed"]) for r in kept if r["method"] == method
        }
        if missing:
            column, seed = sorted(missing)[0]
            raise SystemExit(f"--reuse {path}: its {method} has no run of {column!r}, seed {seed}.")
    # The command that ran each reused row: a file that itself reused rows names theirs.
    commands = {m: run.get("commands", {}).get(m, run["command"]) for m in reused}
    chosen = [c for c in run["chosen"] if c["method"] in reused]
    # Their learning-rate choice too, so a re-run with --tune-lr shows every method's.
    tuning = [r for r in run.get("tuning", []) if wanted(r)]
    return {"commands": commands, "results": kept, "chosen": chosen, "tuning": tuning}


def main(argv=None) -> Path:
    """Run the matrix; write matrix.md and results.json."""
    args = parse_args(argv)
    if args.versus_best:
        results = pooled_results(args.versus_best)
        columns = list(dict.fromkeys(r["column"] for r in results))
        # Pooled runs hold other seeds for some rows: only the seed-by-seed table compares like with like.
        versus = versus_best_table(results, columns) + "\n" if len(args.versus_best) == 1 else ""
        print(versus + paired_table(results, columns))
        return Path(args.versus_best[0]).parent
    columns = [c.strip() for c in args.settings.split(",") if c.strip()]
    unknown = sorted(set(columns) - set(SETTINGS))
    if unknown:
        raise SystemExit(f"Unknown setting {unknown[0]!r}; choose from {', '.join(SETTINGS)}.")
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    seeds = [int(s) for s in args.seeds.split(",")]
    chosen = chosen_settings(args.settings_from)
    reuse = reused_runs(args.reuse, methods, columns, seeds, args.rounds) if args.reuse else None
    out = Path(args.out or f"outputs/matrix-{time.strftime('%Y%m%d-%H%M%S')}")
    out.mkdir(parents=True, exist_ok=True)
    column_args = {}
    for column in columns:
        preset, overrides = SETTINGS[column]
        run_config = [*overrides, f"num-server-rounds={args.rounds}", *args.run_config]
        column_args[column] = compare_args(["--config-file", preset, "--run-config", *run_config])

    def run_matrix(settings: dict[str, list[dict]], split: str) -> list[dict]:
        tasks = [
            (column_args[column], seed, method, setting, split, column)
            for column in columns
            for seed in seeds
            for method in methods
            for setting in settings.get(method, [])
        ]
        with flower_log_level(logging.WARNING):
            results = run_tasks(tasks, args.jobs)
        for result, task in zip(results, tasks):
            result["column"] = task[-1]
        return results

    started = time.perf_counter()
    tuning, tuning_text = [], ""
    if args.tune_lr:
        lrs = [float(lr) for lr in args.tune_lr.split(",")]
        # Variants train at DDOME's setting and the untuned methods at their own.
        tuned = [m for m in methods if m not in UNTUNED and m not in VARIANT_PRESETS]
        tuning = run_matrix({m: lr_candidates(m, chosen, lrs) for m in tuned}, "validation")
        chosen = {**chosen, **best_settings(tuning, tuned)}
        if reuse:
            tuning += reuse["tuning"]
            chosen = {**chosen, **{c["method"]: c["setting"] for c in reuse["chosen"]}}
        tuning_text = (
            "\nChoosing the learning rate: validation accuracy (%) of every tuned method at each, mean of the "
            f"last 5 evaluations over seeds {args.seeds} (the validation split, never the test split), per column "
            "and over the columns; the best mean (bold) is the setting the matrix above ran:\n\n"
            + tuning_table(tuning, chosen, columns)
        )
    results = run_matrix({m: [setting_of(m, chosen)] for m in methods}, "test")
    reuse_text = ""
    if reuse:
        order = {m: i for i, m in enumerate(METHODS)}
        results = sorted(results + reuse["results"], key=lambda r: order.get(r["method"], len(order)))
        by_command = defaultdict(list)
        for method, ran in reuse["commands"].items():
            by_command[ran].append(NAMES[method])
        sources = ". ".join(
            f"The rows of {'; '.join(names)} are the runs of `{ran}`" for ran, names in by_command.items()
        )
        reuse_text = f"{sources} (`--reuse {args.reuse}`).\n\n"
    versus = versus_best_table(results, columns)
    versus_text = versus and (
        "\nDDOME against the best other method of each column (baselines and the common expert alone; "
        "difference in points), and its bytes per round as a share of FedMix's:\n\n"
        + versus
        + "\nThe same, seed by seed (pool this run with one of other seeds: `--versus-best A/results.json "
        "B/results.json`):\n\n" + paired_table(results, columns)
    )
    command = " ".join(["python -m benchmarks.matrix", *(argv if argv is not None else sys.argv[1:])])
    minutes = (time.perf_counter() - started) / 60
    text = (
        f"Command: `{command}` ({minutes:.1f} min, {args.jobs} parallel runs)\n\n"
        + reuse_text
        + f"Zero-shot accuracy on unseen clients (%), mean of the last 5 evaluations, mean ± spread over "
        f"seeds {args.seeds}, {args.rounds} rounds:\n\n"
        + matrix_table(results, columns)
        + "\nDDOME under each zero-shot prediction rule (the same runs):\n\n"
        + rules_table(results, columns)
        + "\nControl: each method's predictions blended with the common expert at the blend rule's "
        f"weight ({BLEND_COMMON_WEIGHT:.2f}), the same runs:\n\n"
        + blend_control_table(results, columns)
        + versus_text
        + tuning_text
        + "\nPer seed:\n\n"
        + per_seed_table(results, columns)
    )
    (out / "matrix.md").write_text(text)
    picked = [{"method": m, "kind": "best", "setting": chosen[m]} for m in methods if m in chosen]
    picked += reuse["chosen"] if reuse else []
    commands = {m: command for m in methods} | (reuse["commands"] if reuse else {})
    run = {"command": command, "commands": commands, "chosen": picked, "results": results, "tuning": tuning}
    (out / "results.json").write_text(json.dumps(run, indent=2))
    print(text)
    return out


if __name__ == "__main__":
    main()
