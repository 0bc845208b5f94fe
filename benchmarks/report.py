"""The benchmark's outputs: a Markdown table and PNG plots."""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # no display: write files only
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402

from client_app.task import build_local_gate  # noqa: E402
from data.settings import partitioned  # noqa: E402
from ddome_strategy.arrays import GATE_PREFIX, load_part  # noqa: E402
from ddome_strategy.client import embed  # noqa: E402
from server_app.plots import plot_routing  # noqa: E402

NAMES = {
    "ddome": "DDOME",
    "ddome-paper": "DDOME, paper config",
    "ddome-no-generalist": "DDOME, no generalist",
    "fedavg": "FedAvg",
    "fedprox": "FedProx",
    "fedmix": "FedMix",
    "avg-ensembles": "Avg-Ensembles",
    "common-expert": "Common expert alone",
}


@torch.no_grad()
def routing_matrix(cfg: dict, dataset, common, arrays) -> dict:
    """Mean gate probabilities per client (rows) and expert (columns), from each
    client's own data: the routing a client would report."""
    _, plan = partitioned(cfg)
    gate = build_local_gate(cfg, common.feature_dim)
    load_part(gate, arrays, GATE_PREFIX)
    rows, labels = [], []
    for pid in range(plan.num_partitions):
        role = plan.role(pid)
        # A test client routes on its unlabeled evaluation data (the validation split when tuning).
        unlabeled = dataset.train_x if plan.eval_split == "train" else dataset.test_x
        x = dataset.train_x[plan.train_indices[pid]] if role != "test" else unlabeled[plan.eval_indices[pid]]
        rows.append(torch.softmax(gate(embed(common, x)), 1).mean(0).tolist())
        name = f"anchor {pid}" if role == "anchor" else ("unseen" if role == "test" else "client") + f" {pid}"
        labels.append(f"{name} {list(plan.client_labels[pid])}")
    generalist = {"generalist": cfg["num-experts"]} if cfg.get("generalist") else {}
    return {"matrix": rows, "clients": labels, **generalist}


def _fmt(value, percent=True) -> str:
    if value is None:
        return "n/a"
    return f"{100 * value:.2f}" if percent else f"{value:.1f}"


def _setting(run: dict) -> str:
    names = {"batch-size": "batch", "lr": "lr", "fedprox-mu": "mu"}
    return ", ".join(f"{names[k]} {v:g}" for k, v in run.get("trained-with", {}).items()) or "-"


def table(results: list[dict]) -> str:
    """One row per method (and setting): means over the seeds run, the spread (standard
    deviation over seeds) of the headline figure, and the per-seed values."""
    by_method = defaultdict(list)
    for r in results:
        by_method[(r["method"], _setting(r))].append(r)
    lines = [
        "| method | setting | zero-shot acc. on unseen clients, mean of last 5 evals (%) | final eval (%) | "
        "best of last 10 (%) | training clients (%) | MB sent per round | wall time (s) | per seed (mean of last 5, %) |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for (method, setting), runs in by_method.items():
        mean = lambda key: float(np.mean([r[key] for r in runs])) if all(r.get(key) is not None for r in runs) else None  # noqa: E731
        spread = f" ± {100 * np.std([r['zero-shot-acc'] for r in runs]):.2f}" if len(runs) > 1 else ""
        seeds = ", ".join(f"{r['seed']}: {_fmt(r['zero-shot-acc'])}" for r in runs)
        lines.append(
            f"| {NAMES[method]} | {setting} | {_fmt(mean('zero-shot-acc'))}{spread} | {_fmt(mean('final-acc'))} | "
            f"{_fmt(mean('best-of-last-10-acc'))} | {_fmt(mean('train-clients-acc'))} | "
            f"{mean('bytes-per-round') / 1e6:.2f} | {_fmt(mean('wall-seconds'), False)} | {seeds} |"
        )
    return "\n".join(lines) + "\n"


def tuning_table(tuning: list[dict]) -> str:
    """Validation score (mean of the last 5 evaluations, mean over seeds) of every grid
    point, one row per method and point; the chosen point of each method in bold."""
    by_point = defaultdict(list)
    for r in tuning:
        by_point[(r["method"], _setting(r))].append(r["zero-shot-acc"])
    best = {}
    for (method, setting), scores in by_point.items():
        if method not in best or np.mean(scores) > best[method][1]:
            best[method] = (setting, np.mean(scores))
    lines = ["| method | setting | validation acc., mean of last 5 evals (%) | per seed |", "|---|---|---|---|"]
    for (method, setting), scores in by_point.items():
        mark = "**" if best[method][0] == setting else ""
        values = ", ".join(_fmt(v) for v in scores)
        lines.append(f"| {NAMES[method]} | {mark}{setting}{mark} | {mark}{_fmt(np.mean(scores))}{mark} | {values} |")
    return "\n".join(lines) + "\n"


def plot_accuracy(results: list[dict], path: Path) -> None:
    """Zero-shot accuracy on the unseen clients per round: mean over seeds per method,
    shaded between the worst and the best seed."""
    fig, ax = plt.subplots(figsize=(7, 4.5))
    by_method = defaultdict(list)
    for r in results:
        by_method[r["method"]].append(
            {h["round"]: h["test/zero-shot-acc"] for h in r["history"] if h.get("test/zero-shot-acc") is not None}
        )
    for method, curves in by_method.items():
        label = f"{NAMES[method]} ({len(curves)} seed{'s' if len(curves) > 1 else ''})"
        if method == "common-expert":
            ax.axhline(100 * np.mean([list(c.values())[-1] for c in curves]), ls="--", color="gray", label=label)
            continue
        rounds = sorted(set.intersection(*(set(c) for c in curves)))
        values = 100 * np.array([[c[x] for x in rounds] for c in curves])
        style = "--" if method == "fedprox" else "-"  # FedProx often overlaps FedAvg
        (line,) = ax.plot(rounds, values.mean(0), style, marker="o", ms=3, label=label)
        if len(curves) > 1:
            ax.fill_between(rounds, values.min(0), values.max(0), color=line.get_color(), alpha=0.15)
    ax.set_xlabel("round")
    ax.set_ylabel("zero-shot accuracy on unseen clients (%)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_report(out: Path, results: list[dict], config: dict, command: str, tuning: list[dict] | None = None) -> None:
    """Write ``table.md``, ``accuracy.png`` and ``routing-seed<s>.png`` into ``out``.

    With ``tuning`` (``--tune``): the table of each method at its own best setting, the
    table at the spec's setting, and the validation scores of the whole grid; the plots
    show the best settings.
    """
    header = f"Command: `{command}`\n\nDataset {config['dataset']}, {config['num-server-rounds']} rounds, M={config['num-experts']}, K={config['top-k']}, partition {config['partition-mode']}.\n\n"
    if tuning:
        best = [r for r in results if r["kind"] == "best"]
        spec = [r for r in results if r.get("spec-setting")]
        body = (
            "Each method at its own best setting (chosen on the validation split):\n\n"
            + table(best)
            + "\nEvery method at the spec's local training (batch 256, lr 0.01, gate lr 0.001):\n\n"
            + table(spec)
            + "\nTuning on the validation split (never the test split):\n\n"
            + tuning_table(tuning)
        )
        results = best
    else:
        body = table(results)
    (out / "table.md").write_text(header + body)
    plot_accuracy(results, out / "accuracy.png")
    for r in results:
        if "routing" in r:
            name = "routing" if r["method"] == "ddome" else f"routing-{r['method']}"
            top_k = config["top-k"] if r["method"] == "ddome" else None  # FedMix sends all M
            title = NAMES.get(r["method"], r["method"])
            plot_routing(r["routing"], out / f"{name}-seed{r['seed']}.png", title, top_k)
