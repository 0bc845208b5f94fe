"""The team's ClientApp: DDOME's client toolkit on their data and models."""

from flwr.clientapp import ClientApp
from torch import nn

from ddome_strategy.client import ClientData, DDOMEClient
from digits_team.team import GROUPS, Net, client_samples, role_of


def load_data(cfg, context) -> ClientData:
    """This node's partition: a test node evaluates on all of it, others train on 3/4 of it."""
    partition_id = int(context.node_config["partition-id"])
    x, y = client_samples(partition_id)
    cut = 0 if role_of(partition_id)[0] == "test" else len(y) * 3 // 4
    label_to_expert = {label: e for e, group in enumerate(GROUPS) for label in group}
    return ClientData(x[:cut], y[:cut], x[cut:], y[cut:], label_to_expert)


app = DDOMEClient(
    load_data=load_data,
    build_common_expert=lambda cfg, data: Net(),
    build_gate=lambda cfg, embedding_dim: nn.Linear(embedding_dim, len(GROUPS)),
    build_expert=lambda cfg, data: Net(),
).register(ClientApp())
