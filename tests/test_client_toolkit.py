"""The client toolkit (ddome_strategy.client) on modules and data the project never uses:
every reply follows the protocol, embeddings are computed once, a node that cannot work
answers with an error naming it."""

import copy

import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, RecordDict
from flwr.clientapp import ClientApp
from torch import nn

from ddome_strategy import client as toolkit
from ddome_strategy.arrays import moe_prefixes, pack_moe, select
from ddome_strategy.client import ClientData, DDOMEClient
from ddome_strategy.moe import proximal_term
from ddome_strategy.protocol import (
    CLIENT_CONFIG,
    COMMON_EXPERT,
    CONFIG,
    EVALUATE,
    ROLE_QUERY,
    ROUTE_QUERY,
    TRAIN,
    NodeSetup,
    reply_problem,
)

M = 3


class Conv(nn.Module):
    """A common expert unlike the project's: 1-d convolutions, 6 features, 4 classes."""

    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(nn.Conv1d(1, 6, 3), nn.ReLU(), nn.AdaptiveAvgPool1d(1), nn.Flatten())
        self.classify = nn.Linear(6, 4)

    def embed(self, x):
        return self.features(x.unsqueeze(1))

    def forward(self, x):
        return self.classify(self.embed(x))


def data(train=40, evaluate=20) -> ClientData:
    g = torch.Generator().manual_seed(train)
    return ClientData(
        torch.randn(train, 10, generator=g),
        torch.randint(0, 4, (train,), generator=g),
        torch.randn(evaluate, 10, generator=g),
        torch.randint(0, 4, (evaluate,), generator=g),
        {0: 0, 1: 1, 2: 2},
    )


def make_app(loads: list, check_node=None) -> ClientApp:
    def load_data(cfg, context):
        loads.append(context.node_id)
        return data(train=0 if context.node_config.get("role") == "test" else 40)

    return DDOMEClient(
        load_data=load_data,
        build_common_expert=lambda cfg, d: Conv(),
        build_gate=lambda cfg, dim: nn.Sequential(nn.Linear(dim, 5), nn.Tanh(), nn.Linear(5, M)),
        build_expert=lambda cfg, d: nn.Sequential(nn.Linear(10, 8), nn.ReLU(), nn.Linear(8, 4)),
        check_node=check_node,
    ).register(ClientApp())


def global_arrays() -> ArrayRecord:
    torch.manual_seed(0)
    gate = nn.Sequential(nn.Linear(6, 5), nn.Tanh(), nn.Linear(5, M))
    experts = [nn.Sequential(nn.Linear(10, 8), nn.ReLU(), nn.Linear(8, 4)) for _ in range(M)]
    return pack_moe(gate, experts)


def context(node_config=None) -> Context:
    return Context(run_id=1, node_id=7, node_config=node_config or {}, state=RecordDict(), run_config={})


def message(message_type, arrays=None, setup=None, **config) -> Message:
    content = RecordDict({CONFIG: ConfigRecord(config)})
    if arrays is not None:
        content["arrays"] = arrays
    if setup is not None:
        setup.attach(7, content)
    return Message(content=content, dst_node_id=7, message_type=message_type)


def test_a_clientapp_from_own_modules_answers_every_message_by_the_protocol(monkeypatch):
    embedded = []
    real_embed = toolkit.embed
    monkeypatch.setattr(toolkit, "embed", lambda model, x: embedded.append(len(x)) or real_embed(model, x))
    loads = []
    app = make_app(loads)
    ctx = context({"partition-id": 4})
    setup = NodeSetup({"lr": 0.1, "batch-size": 8}, ArrayRecord(Conv().state_dict()))
    arrays = global_arrays()

    role = app(message(ROLE_QUERY), ctx)
    assert reply_problem(ROLE_QUERY, role.content, num_experts=M) is None
    assert dict(role.content[CONFIG]) == {"partition-id": 4}

    route = app(message(ROUTE_QUERY, select(arrays, ["gate."]), setup, **{"server-round": 1}), ctx)
    assert reply_problem(ROUTE_QUERY, route.content, num_experts=M) is None

    sent = select(arrays, moe_prefixes([0, 2]))
    train = app(message(TRAIN, sent, setup, **{"server-round": 1, "experts": [0, 2], "role": "normal"}), ctx)
    assert reply_problem(TRAIN, train.content, num_experts=M, sent=sent) is None
    trained = train.content["arrays"]
    assert any(
        not torch.equal(torch.from_numpy(trained[k].numpy()), torch.from_numpy(sent[k].numpy()))
        for k in sent
        if k.startswith("expert.2.")
    )
    assert train.content["metrics"]["num-examples"] == 40

    anchor_sent = select(arrays, moe_prefixes([1]))
    anchor = app(message(TRAIN, anchor_sent, setup, **{"server-round": 2, "experts": [1], "role": "anchor"}), ctx)
    assert reply_problem(TRAIN, anchor.content, num_experts=M, sent=anchor_sent) is None
    assert 0 <= anchor.content["metrics"]["routing-acc"] <= 1

    evaluate = app(message(EVALUATE, sent, setup, **{"server-round": 2, "experts": [0, 2]}), ctx)
    assert reply_problem(EVALUATE, evaluate.content, num_experts=M) is None
    metrics = evaluate.content["metrics"]
    # The default rule is the mixture blended with the common expert; every rule is
    # reported, and the routing error.
    assert metrics["zero-shot-acc"] == metrics["blend-acc"] and 0 <= metrics["mixture-acc"] <= 1
    assert 0 <= metrics["routing-error"] <= 1 and metrics["num-examples"] == 20
    # The common expert came once: train and eval inputs were embedded once for four messages.
    assert embedded == [40, 20]
    assert COMMON_EXPERT not in message(EVALUATE, sent, setup).content


def test_a_test_node_routes_on_its_unlabelled_data():
    app = make_app([])
    setup = NodeSetup({}, ArrayRecord(Conv().state_dict()))
    ctx = context({"role": "test"})
    route = app(message(ROUTE_QUERY, select(global_arrays(), ["gate."]), setup, **{"server-round": 1}), ctx)
    assert reply_problem(ROUTE_QUERY, route.content, num_experts=M) is None


@pytest.mark.parametrize(
    ("node_config", "refusal"),
    [
        ({"role": "boss"}, "role='boss' is not one of anchor, normal, test"),
        ({"role": "anchor"}, "needs expert=<i>"),
        ({"partition-id": 1, "data-path": "/nowhere"}, "no data at /nowhere"),
    ],
)
def test_a_node_that_cannot_take_part_says_so_on_the_role_query(node_config, refusal):
    def check_node(ctx):
        if "data-path" in ctx.node_config:
            raise ValueError(f"no data at {ctx.node_config['data-path']}")

    reply = make_app([], check_node)(message(ROLE_QUERY), context(node_config))
    assert reply.has_error() and reply.error.reason.startswith("node 7: ") and refusal in reply.error.reason


def test_a_node_that_lost_its_setup_asks_for_it_with_an_error_reply():
    app = make_app([])
    ctx = context({"partition-id": 4})
    gate = select(global_arrays(), ["gate."])
    # A restarted node: neither the client configuration nor the common expert.
    reply = app(message(ROUTE_QUERY, gate, **{"server-round": 3}), ctx)
    assert reply.has_error() and "node 7: no client configuration" in reply.error.reason
    # The client configuration came back but not the common expert: no embeddings.
    setup = NodeSetup({})
    reply = app(message(ROUTE_QUERY, gate, setup, **{"server-round": 3}), ctx)
    assert reply.has_error() and "resend the common expert" in reply.error.reason
    assert CLIENT_CONFIG in ctx.state  # kept: the next message needs only the common expert


@pytest.mark.parametrize("anchor", [0, None])
def test_every_client_trains_the_generalist_on_its_own_loss(anchor):
    # Expert 2 is the generalist: an anchor of expert 0 and a normal client (sent 1 and 2)
    # both move it, and a normal client's mixture loss alone would leave the anchor's
    # generalist untouched (an anchor's loss is its own expert's and the gate's).
    torch.manual_seed(0)
    x, y = torch.randn(64, 6), torch.randint(0, 3, (64,))
    gate = nn.Linear(4, 3)
    experts = {e: nn.Linear(6, 3) for e in ([0, 2] if anchor == 0 else [1, 2])}
    before = {e: m.weight.detach().clone() for e, m in experts.items()}
    cfg = {**toolkit.TRAINING_DEFAULTS, "local-epochs": 1}
    loss = toolkit.train_local(cfg, gate, experts, x, torch.randn(64, 4), y, anchor, seed=0, generalist=2)
    assert torch.isfinite(torch.tensor(loss))
    assert all(not torch.equal(before[e], m.weight) for e, m in experts.items())
    without = {e: nn.Linear(6, 3) for e in experts}
    for e in without:
        without[e].load_state_dict({"weight": before[e], "bias": torch.zeros(3)})
    toolkit.train_local(cfg, nn.Linear(4, 3), without, x, torch.randn(64, 4), y, anchor, seed=0)
    assert torch.equal(without[2].weight, before[2]) == (anchor == 0)


@pytest.mark.parametrize("anchor_gate_loss", ["one-hot", "weigh-generalist"])
def test_an_anchor_tells_the_gate_its_specialist_and_weighs_the_generalist_only_if_asked(anchor_gate_loss):
    # The one-hot gate loss of an anchor of expert 0 is over experts 0..M-1: alone, it leaves
    # the gate's generalist output (row 2) to the normal clients' mixture loss, which moves it;
    # with weigh-generalist the anchor moves that row too.
    torch.manual_seed(0)
    x, y, e = torch.randn(64, 6), torch.randint(0, 3, (64,)), torch.randn(64, 4)
    cfg = {**toolkit.TRAINING_DEFAULTS, "local-epochs": 1, "anchor-gate-loss": anchor_gate_loss}
    for anchor, sent in ((0, [0, 2]), (None, [1, 2])):
        gate = nn.Linear(4, 3)
        before = gate.weight.detach().clone()
        toolkit.train_local(cfg, gate, {k: nn.Linear(6, 3) for k in sent}, x, e, y, anchor, seed=0, generalist=2)
        anchor_leaves_it = anchor == 0 and anchor_gate_loss == "one-hot"
        assert torch.equal(gate.weight[2], before[2]) == anchor_leaves_it
        assert not torch.equal(gate.weight[sent[0]], before[sent[0]])  # its specialist's row moves


def test_the_proximal_term_holds_the_generalist_near_its_sent_weights_and_nothing_else():
    # An anchor of expert 0 sent the generalist 2: with generalist-proximal-mu its
    # generalist ends nearer the weights it was sent than without, while its specialist
    # and the gate (whose one-hot loss does not involve the generalist) train exactly as without.
    torch.manual_seed(0)
    x, y, e = torch.randn(64, 6), torch.randint(0, 3, (64,)), torch.randn(64, 4)
    gate0, experts0 = nn.Linear(4, 3), {0: nn.Linear(6, 3), 2: nn.Linear(6, 3)}
    sent = [p.detach().clone() for p in experts0[2].parameters()]
    trained = {}
    for mu in (0.0, 20.0):
        gate, experts = copy.deepcopy(gate0), copy.deepcopy(experts0)
        cfg = {
            **toolkit.TRAINING_DEFAULTS,
            "batch-size": 4,
            "generalist-proximal-mu": mu,
            "anchor-gate-loss": "one-hot",
        }
        toolkit.train_local(cfg, gate, experts, x, e, y, 0, seed=0, generalist=2)
        trained[mu] = (gate, experts, proximal_term(experts[2], sent).item())
    assert 0 < trained[20.0][2] < trained[0.0][2] / 2
    assert torch.equal(trained[20.0][1][0].weight, trained[0.0][1][0].weight)
    assert torch.equal(trained[20.0][0].weight, trained[0.0][0].weight)


def test_the_generalist_steps_at_its_scaled_learning_rate_and_the_specialists_at_lr():
    # One plain SGD step (one mini-batch, no momentum, no proximal term) of a routed
    # client sent specialist 0 and generalist 2: with generalist-lr-scale 3 the
    # generalist moves three times as far as at scale 1, the specialist and gate the same.
    torch.manual_seed(0)
    x, y, e = torch.randn(8, 6), torch.randint(0, 3, (8,)), torch.randn(8, 4)
    gate0, experts0 = nn.Linear(4, 3), {0: nn.Linear(6, 3), 2: nn.Linear(6, 3)}
    moved = {}
    for scale in (1.0, 3.0):
        gate, experts = copy.deepcopy(gate0), copy.deepcopy(experts0)
        cfg = {**toolkit.TRAINING_DEFAULTS, "batch-size": 8, "momentum": 0.0}
        cfg.update({"generalist-proximal-mu": 0.0, "generalist-lr-scale": scale})
        toolkit.train_local(cfg, gate, experts, x, e, y, None, seed=0, generalist=2)
        moved[scale] = {k: experts[k].weight - experts0[k].weight for k in experts}
        moved[scale]["gate"] = gate.weight - gate0.weight
    assert torch.allclose(moved[3.0][2], 3 * moved[1.0][2], atol=1e-7)
    assert moved[1.0][2].abs().max() > 0
    assert torch.equal(moved[3.0][0], moved[1.0][0])
    assert torch.equal(moved[3.0]["gate"], moved[1.0]["gate"])


def test_the_proximal_term_is_the_squared_distance_from_the_sent_weights():
    model = nn.Linear(2, 1)
    sent = [p.detach().clone() for p in model.parameters()]
    assert proximal_term(model, sent).item() == 0.0
    with torch.no_grad():
        model.weight.add_(torch.tensor([[1.0, 2.0]]))
    assert proximal_term(model, sent).item() == pytest.approx(5.0)
