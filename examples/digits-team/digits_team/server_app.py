"""The team's ServerApp: the DDOME strategy with their role layout and models."""

from flwr.app import ArrayRecord, Context
from flwr.serverapp import Grid, ServerApp
from flwr.serverapp.strategy import Result
from torch import nn

from ddome_strategy import DDOME, pack_moe
from digits_team.team import GROUPS, Net, pretrained_common_expert, role_of

app = ServerApp()


def run(grid: Grid, num_rounds: int) -> Result:
    """Train the gate and one expert per digit group; zero-shot evaluation every 5 rounds."""
    common = pretrained_common_expert()
    experts = [Net() for _ in GROUPS]
    for expert in experts:  # start every expert from the common expert
        expert.load_state_dict(common.state_dict())
    strategy = DDOME(
        num_experts=len(GROUPS),
        role_of=role_of,
        top_k=2,
        anchors_per_round=3,
        normal_per_round=4,
        common_expert=ArrayRecord(common.state_dict()),
        client_config={"lr": 0.05, "gate-lr": 0.1, "batch-size": 16, "local-epochs": 2},
        min_nodes=11,
    )
    return strategy.start(grid, pack_moe(nn.Linear(32, len(GROUPS)), experts), num_rounds)


@app.main()
def main(grid: Grid, context: Context) -> None:
    result = run(grid, int(context.run_config.get("num-server-rounds", 30)))
    print(result.evaluate_metrics_clientapp[max(result.evaluate_metrics_clientapp)])
