"""Work that must happen once per client, never per round; polling kept short."""

import inspect

from flwr.superlink.grid import InMemoryGrid

from client_app import task
from client_app.app import app as client_app
from data import settings
from ddome_strategy import client as toolkit
from server_app.app import run_ddome
from server_app.config import DEFAULTS
from server_app.inprocess import InProcessGrid


def test_embeddings_and_data_are_computed_once_per_client(tmp_path, monkeypatch):
    calls = []
    real_embed = toolkit.embed

    def counting_embed(model, x, *args, **kwargs):
        calls.append(len(x))
        return real_embed(model, x, *args, **kwargs)

    monkeypatch.setattr(toolkit, "embed", counting_embed)
    settings.load_partitioned.cache_clear()
    task._local_data.cache_clear()
    config = {
        **DEFAULTS,
        "config-file": "configs/digits-tiny.yaml",
        "num-server-rounds": 6,
        "eval-every": 2,
        "output-dir": str(tmp_path),
        "cache-dir": str(tmp_path / "cache"),
    }
    grid = InProcessGrid(client_app, 13)
    grid.pull_interval = 0.1  # as Flower's simulation grid
    polled_every = []
    real_send = grid.send_and_receive
    grid.send_and_receive = lambda *a, **kw: polled_every.append(grid.pull_interval) or real_send(*a, **kw)
    run_ddome(grid, config)
    # Each of the 13 clients embeds its training and its evaluation data exactly once,
    # although most of them took part in 6 training rounds and 3 evaluations.
    assert len(calls) == 2 * 13
    # The dataset is loaded and partitioned once for the whole process, and each client's
    # slice of it is cut once.
    assert settings.load_partitioned.cache_info().misses == 1
    assert task._local_data.cache_info().misses == 13
    assert task._local_data.cache_info().hits > 13
    # Replies are polled for every 10 ms, not every 100 ms (two exchanges per round), and
    # the grid gets its own interval back after the run.
    assert set(polled_every) == {0.01}
    assert grid.pull_interval == 0.1


def test_simulation_grid_still_has_a_pull_interval():
    # DDOME.start shortens it; if Flower renames it, the shortening silently stops.
    assert "pull_interval" in inspect.signature(InMemoryGrid).parameters
