"""DDOME ClientApp (``client_app.app:app``): this project's handlers
(:mod:`client_app.handlers`), run where they are cheapest.

In Flower's simulation, and wherever the app is imported once, a message runs the handlers
in place. A deployed SuperNode starts a fresh ``flwr-clientapp`` process per message;
importing PyTorch and the handlers there would cost every message seconds, and the node's
data and embeddings would not survive it. There each message goes to the node's worker
(:mod:`ddome_strategy.worker`), which stays up for the run with everything loaded; this
module imports nothing but Flower. Node config ``worker=false`` (or the environment
variable ``DDOME_CLIENT_WORKER=0``) runs the handlers in the message's own process.
"""

from ddome_strategy.worker import DDOME_MESSAGE_TYPES, worker_clientapp

# The DDOME protocol's message types and the benchmark's baselines (client_app/handlers.py).
MESSAGE_TYPES = (*DDOME_MESSAGE_TYPES, ("train", "single"), ("evaluate", "single"), ("evaluate", "ensemble"))

app = worker_clientapp("client_app.handlers:app", MESSAGE_TYPES)
