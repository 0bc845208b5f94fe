"""A run's pictures: accuracy per round, the routing heatmap, traffic per round."""

from __future__ import annotations

import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # no display on servers: write files only
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402

# Heatmap rows: anchors, then normal training clients, then unseen test clients.
ROLE_ORDER = {"anchor": 0, "normal": 1, "test": 2}


def plot_routing(routing: dict, path: Path, method: str = "DDOME", top_k: int | None = None) -> None:
    """Heatmap of the mean gate probability per client (rows) and expert (columns).

    Parameters
    ----------
    routing : dict
        ``matrix`` (clients x experts), ``clients`` (row labels) and optionally
        ``chosen`` (per row, the experts the server sent that client) and
        ``generalist`` (the generalist's column, named so).
    path : Path
        The PNG to write.
    method : str
        Method name shown in the title.
    top_k : int, optional
        Frame each row's ``top_k`` highest scores (the experts the server would send)
        when ``chosen`` is absent; no frames when both are absent.
    """
    matrix = np.asarray(routing["matrix"], dtype=float).reshape(len(routing["clients"]), -1)
    chosen = routing.get("chosen")
    if chosen is None and top_k:
        chosen = [np.argsort(-scores, kind="stable")[:top_k] for scores in matrix]
    fig, ax = plt.subplots(figsize=(1.2 + 0.7 * matrix.shape[1], 1 + 0.28 * matrix.shape[0]))
    image = ax.imshow(matrix, cmap="viridis", vmin=0, vmax=1, aspect="auto")
    for row, experts in enumerate(chosen or []):
        for col in experts:
            ax.add_patch(plt.Rectangle((col - 0.5, row - 0.5), 1, 1, fill=False, ec="white", lw=1.2))
    names = [
        f"expert {i}" + (" (generalist)" if i == routing.get("generalist") else "") for i in range(matrix.shape[1])
    ]
    ax.set_xticks(range(matrix.shape[1]), names, rotation=45, ha="right")
    ax.set_yticks(range(matrix.shape[0]), routing["clients"], fontsize=7)
    picks = f", frames: top-{top_k}" if top_k else (", frames: experts sent" if chosen else "")
    ax.set_title(f"{method} gate: mean routing probability per client{picks}", fontsize=9)
    fig.colorbar(image, ax=ax, fraction=0.05)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def routing_rows(last_routing: dict) -> dict:
    """The heatmap's data from :attr:`DDOME.last_routing`.

    Parameters
    ----------
    last_routing : dict
        Partition id -> ``{"role", "expert", "scores", "chosen"}``.

    Returns
    -------
    dict
        ``matrix`` (clients x experts), ``clients`` (labels such as ``"anchor p0 (e0)"``,
        ``"normal p7"``, ``"test p23"``) and ``chosen``, rows sorted by role then
        partition id.
    """
    order = sorted(last_routing, key=lambda pid: (ROLE_ORDER.get(last_routing[pid]["role"], 3), int(pid)))
    labels = []
    for pid in order:
        entry = last_routing[pid]
        suffix = f" (e{entry['expert']})" if entry["role"] == "anchor" else ""
        labels.append(f"{entry['role']} p{pid}{suffix}")
    return {
        "matrix": [list(last_routing[pid]["scores"]) for pid in order],
        "clients": labels,
        "chosen": [[int(e) for e in last_routing[pid]["chosen"]] for pid in order],
    }


def _series(rows: list[dict], key: str) -> tuple[list[int], list[float]]:
    points = [(r["round"], r[key]) for r in rows if r.get(key) is not None]
    return [x for x, _ in points], [y for _, y in points]


def plot_accuracy(history: list[dict], path: Path) -> None:
    """Zero-shot accuracy per evaluated round: unseen test clients, the common expert
    alone on the same clients, and the training clients when they were evaluated."""
    evaluations = [r for r in history if r["stage"] == "evaluate"]
    fig, ax = plt.subplots(figsize=(7, 4.5))
    curves = [
        ("test/zero-shot-acc", "DDOME zero-shot, unseen test clients", "-"),
        ("test/common-expert-acc", "common expert alone, same clients", "--"),
        ("train/zero-shot-acc", "DDOME zero-shot, training clients", ":"),
    ]
    for key, label, style in curves:
        rounds, values = _series(evaluations, key)
        if rounds:
            ax.plot(rounds, 100 * np.asarray(values), style, marker="o", ms=3, label=label)
    _save_per_round(fig, ax, "accuracy (%)", path)


def _save_per_round(fig, ax, ylabel: str, path: Path) -> None:
    """Label a per-round figure's axes, add its legend and write it to ``path``."""
    ax.set_xlabel("round")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # rounds are whole numbers
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_bytes(history: list[dict], path: Path) -> None:
    """Training traffic per round in MB: total, and server-to-client / client-to-server."""
    trained = [r for r in history if r["stage"] == "train"]
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for key, label in (("bytes-total", "total"), ("bytes-down", "sent to clients"), ("bytes-up", "received")):
        rounds, values = _series(trained, key)
        if rounds:
            ax.plot(rounds, np.asarray(values) / 1e6, marker="o", ms=3, label=label)
    ax.set_ylim(bottom=0)
    _save_per_round(fig, ax, "MB per round", path)


def write_plots(
    run_dir: Path, history: list[dict], last_routing: dict, generalist: int | None = None
) -> dict[str, str]:
    """Write ``accuracy.png``, ``bytes.png`` and (after an evaluation) ``routing.png``
    with its data ``routing.json`` into ``run_dir``.

    Parameters
    ----------
    run_dir : Path
        The run's output folder.
    history : list[dict]
        The run's metric rows (:attr:`RunWriter.history`).
    last_routing : dict
        :attr:`DDOME.last_routing`: the last evaluation's routing; empty when no
        evaluation ran (e.g. a resumed run that had already finished its rounds).
    generalist : int, optional
        The generalist's expert index (:attr:`DDOME.generalist`), named on the heatmap.

    Returns
    -------
    dict[str, str]
        Picture name -> path relative to ``run_dir``.
    """
    run_dir = Path(run_dir)
    written = {}
    plot_accuracy(history, run_dir / "accuracy.png")
    written["accuracy"] = "accuracy.png"
    if last_routing:
        routing = routing_rows(last_routing)
        if generalist is not None:
            routing["generalist"] = generalist
        (run_dir / "routing.json").write_text(json.dumps(routing, indent=1), encoding="utf-8")
        plot_routing(routing, run_dir / "routing.png")
        written["routing"] = "routing.png"
    plot_bytes(history, run_dir / "bytes.png")
    written["bytes"] = "bytes.png"
    return written
