"""The DDOME ClientApp's handlers: the client toolkit (:class:`ddome_strategy.client.DDOMEClient`) on
this project's data and models, and the benchmark's baselines.

- ``query.role``: this node's ``role`` (and ``expert``) from its node config, and its
  ``partition-id`` if it has one; a node with ``data-path`` first checks its folder.
- ``query.route``: the mean gate scores of the gate sent (the routing phase).
- ``train``: joint training of the gate and the experts sent.
- ``evaluate``: zero-shot evaluation with the gate and the experts sent.
- ``train.single``, ``evaluate.single``, ``evaluate.ensemble``: the benchmark's
  baselines (one model; the average of all experts).

A node reads its own folder (node config ``data-path``, :func:`client_app.task.node_data`)
or, in the simulation, its ``partition-id`` of the dataset. A node that cannot read its
folder gets an error reply naming it and the problem; the server logs it and leaves the
node out.
"""

from __future__ import annotations

from flwr.clientapp import ClientApp

from client_app import baselines
from client_app.task import build_expert, build_generalist, build_local_gate, check_node, node_data
from ddome_strategy.client import DDOMEClient, replies_errors

app = ClientApp()

# The four DDOME message types (docs/protocol.md).
DDOMEClient(
    load_data=node_data,
    build_common_expert=build_expert,
    build_gate=build_local_gate,
    build_expert=build_expert,
    check_node=check_node,
    build_generalist=build_generalist,
).register(app)

# The benchmark's baselines (client_app/baselines.py).
app.train("single")(replies_errors(baselines.train_single))
app.evaluate("single")(replies_errors(baselines.evaluate_single))
app.evaluate("ensemble")(replies_errors(baselines.evaluate_ensemble))
