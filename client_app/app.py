"""DDOME ClientApp (``client_app.app:app``): this project's handlers
(:mod:`client_app.handlers`), run where they are cheapest.

In Flower's simulation, and wherever the app is imported once, a message runs the handlers
in this process. A deployed SuperNode starts a fresh ``flwr-clientapp`` process per
message; importing PyTorch and the handlers there would cost every message seconds, and
the node's data and embeddings would not survive it. There, each message is forwarded to
the node's worker (:mod:`client_app.worker`), a process that stays up for the run with
everything loaded, so this module imports nothing but Flower.

Node config ``worker=false`` (or the environment variable ``DDOME_CLIENT_WORKER=0``)
runs the handlers in the message's own process; ``worker=true`` (or ``=1``) forces the
worker.
"""

from __future__ import annotations

import importlib
import os
import sys
from pathlib import Path

from flwr.app import Context, Message
from flwr.clientapp import ClientApp

from client_app import worker

app = ClientApp()

# Every message type the handlers answer (client_app/handlers.py).
MESSAGE_TYPES = {
    "query": ("role", "route"),
    "train": ("default", "single"),
    "evaluate": ("default", "single", "ensemble"),
}


def uses_worker(context: Context) -> bool:
    """Whether this message goes to the node's worker: in a per-message ``flwr-clientapp``
    process, unless the node config or the environment says otherwise."""
    setting = context.node_config.get("worker", os.environ.get("DDOME_CLIENT_WORKER"))
    if setting is None:
        return Path(sys.argv[0]).name == "flwr-clientapp"
    return str(setting).lower() in ("1", "true", "yes", "on")


def handle(message: Message, context: Context) -> Message:
    """Answer ``message`` with the project's handlers, in the node's worker or here."""
    if uses_worker(context):
        return worker.forward(message, context)
    return importlib.import_module("client_app.handlers").app(message, context)


for category, actions in MESSAGE_TYPES.items():
    for action in actions:
        getattr(app, category)(action)(handle)
