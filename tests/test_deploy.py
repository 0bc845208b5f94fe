"""Deployment tests (issue 4): compose files and a real multi-process federation.

1. ``docker-compose config`` accepts every compose file and variant, and the variants
   carry the flags they promise (skipped when ``docker-compose`` is not installed; no
   Docker engine is needed).
2. Real deployments on loopback: certificates and SuperNode keys from
   ``deploy/make-certs.sh``, a ``flower-superlink`` with TLS and SuperNode authentication,
   the SuperNodes' public keys registered with ``flwr supernode register``, one
   ``flower-supernode`` per client, runs submitted the way a script does
   (``python -m server_app.launch --superlink``, which exits 1 when a run fails):
   - on node-local folders written by ``data.export``, with a broken sixth node;
   - on partition ids, with an unregistered SuperNode (refused), a failing run (exit 1),
     and a SuperNode killed mid-run and restarted (the run completes);
   - behind ``deploy/fleet_proxy.py``: an outsider with the CA certificate can neither
     register a key nor submit a run.

The flags shared with ``docker-compose.yml`` / ``docker-compose.tls.yml`` are the TLS and
authentication ones below (``SUPERLINK_TLS_FLAGS``, ``SUPERNODE_TLS_FLAGS``); a test
checks that the compose TLS variant uses them. The difference: here the SuperLink and
SuperNodes use the default ``--isolation subprocess`` (they start the ServerApp/ClientApp
SuperExecs themselves), while compose uses ``--isolation process`` with separate
``flower-superexec`` containers.

Every process started here is stopped by pid in a fixture teardown, pass or fail.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
import tomllib
import yaml
from flwr.app import Context, RecordDict

from benchmarks.processes import BIN, Processes, flwr, free_port, process_tree

pytestmark = pytest.mark.deploy

REPO = Path(__file__).resolve().parents[1]
MAKE_CERTS = REPO / "deploy" / "make-certs.sh"

BASE = "docker-compose.yml"
TLS = "docker-compose.tls.yml"
GPU = "docker-compose.gpu.yml"
VARIANTS = {
    "base": [BASE],
    "tls": [BASE, TLS],
    "gpu": [BASE, GPU],
    "tls+gpu": [BASE, TLS, GPU],
}

# Flags shared by this test and docker-compose.tls.yml (paths differ).
SUPERLINK_TLS_FLAGS = ("--ssl-ca-certfile", "--ssl-certfile", "--ssl-keyfile", "--enable-supernode-auth")
SUPERNODE_TLS_FLAGS = ("--root-certificates", "--auth-supernode-private-key", "--superlink", "--node-config")

# A DDOME run small enough for 2 CPU cores: 3 experts (anchor clients 0-2), 1 normal
# client (3) and 1 unseen test client (4); grouped labels: 3 groups of 3 digits, every
# normal/test client holds 2 groups.
NUM_TRAIN, NUM_TEST = 4, 1
NUM_NODES = NUM_TRAIN + NUM_TEST
ROUNDS = 2
RUN_CONFIG = (
    f"num-server-rounds={ROUNDS} dataset='digits' num-experts=3 top-k=1 "
    f"num-train-clients={NUM_TRAIN} num-test-clients={NUM_TEST} labels-per-client=6 "
    "samples-per-client=100 eval-samples-per-client=50 anchors-per-round=2 normal-per-round=1 "
    "mlp-hidden=32 gate-hidden=16 common-expert-target-acc=0.6 common-expert-max-epochs=5 "
    "eval-every=2 eval-train-clients=false round-timeout=120.0"
)
RUN_TIMEOUT_S = 240


# --------------------------------------------------------------------------- compose


def _compose_binary() -> str | None:
    return shutil.which("docker-compose")


def _compose_config(files: list[str]) -> dict:
    binary = _compose_binary()
    if binary is None:
        pytest.skip("docker-compose is not installed (.ci/run apt-installs it)")
    args = [binary]
    for name in files:
        args += ["-f", str(REPO / name)]
    # docker-compose is Debian's Python program: keep this process's Python settings (set
    # by the venv or by Ray after a simulation test) away from it.
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTHON", "LD_LIBRARY_PATH", "LD_PRELOAD"))}
    result = subprocess.run(
        [*args, "config"], cwd=REPO, env=env, capture_output=True, text=True, timeout=60, check=False
    )
    assert result.returncode == 0, f"docker-compose config rejected {files}:\n{result.stderr}"
    return yaml.safe_load(result.stdout)


def _command(service: dict) -> str:
    command = service.get("command", [])
    return " ".join(command) if isinstance(command, list) else str(command)


def _supernodes(config: dict) -> dict[str, dict]:
    return {
        name: svc for name, svc in config["services"].items() if str(svc.get("image", "")).startswith("flwr/supernode:")
    }


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_compose_config_accepts_every_variant(variant: str) -> None:
    config = _compose_config(VARIANTS[variant])
    services = config["services"]

    assert services["superlink"]["image"].startswith("flwr/superlink:1.41.0")
    supernodes = _supernodes(config)
    assert len(supernodes) >= 3
    partition_ids, data_mounts, roles = [], set(), []
    for name, svc in supernodes.items():
        command = _command(svc)
        # The node reads only data-path (its SuperExec's /data) and declares its role.
        assert "--node-config" in command and "data-path='/data'" in command, name
        assert "data-root" not in command, name
        assert "--isolation process" in command, name
        partition_ids.append(int(svc["environment"]["PARTITION_ID"]))
        roles.append(svc["environment"]["NODE_ROLE"])
        # each SuperNode has a SuperExec that runs its ClientApps and holds its own data
        executor = services[f"superexec-clientapp-{partition_ids[-1]}"]
        assert f"{name}:9094" in _command(executor)
        mounts = [str(v) for v in executor["volumes"]]
        assert len(mounts) == 1, f"{name}'s SuperExec must mount only its own folder: {mounts}"
        source, target, mode = mounts[0].rsplit(":", 2)
        assert (target, mode) == ("/data", "ro") and source.endswith(f"/node-{partition_ids[-1]}"), mounts
        data_mounts.add(source)
    assert sorted(partition_ids) == list(range(len(supernodes)))
    assert len(data_mounts) == len(partition_ids), "every node needs its own data folder"
    # The export of num-experts=3, 4 training + 1 test clients: anchors 0-2, one normal, one test.
    by_id = dict(zip(partition_ids, roles))
    assert [by_id[i] for i in sorted(by_id)] == [
        "role='anchor' expert=0",
        "role='anchor' expert=1",
        "role='anchor' expert=2",
        "role='normal'",
        "role='test'",
    ]
    server_volumes = [str(v) for v in services["superexec-serverapp"]["volumes"]]
    assert any("outputs" in v for v in server_volumes)
    # The ServerApp sees the public folder only, never a node's.
    data_like = [v for v in server_volumes if not v.startswith(("outputs:", "cache:")) and "/app/certs/" not in v]
    assert len(data_like) == 1 and data_like[0].endswith("/public:/public:ro"), server_volumes

    superlink = _command(services["superlink"])
    if "tls" in variant:
        assert "--insecure" not in superlink
        for flag in SUPERLINK_TLS_FLAGS:
            assert flag in superlink, flag
        assert "--root-certificates" in _command(services["superexec-serverapp"])
        keys = set()
        for name, svc in supernodes.items():
            command = _command(svc)
            assert "--insecure" not in command, name
            for flag in SUPERNODE_TLS_FLAGS:
                assert flag in command, (name, flag)
            key_mounts = [str(v) for v in svc["volumes"] if "keys/supernode-" in str(v)]
            assert len(key_mounts) == 1, name
            keys.add(key_mounts[0].split(":")[0])
        assert len(keys) == len(supernodes), "every SuperNode needs its own key"
    else:
        assert "--insecure" in superlink
    if "gpu" in variant:
        for i in partition_ids:
            devices = services[f"superexec-clientapp-{i}"]["deploy"]["resources"]["reservations"]["devices"]
            assert devices[0]["capabilities"] == ["gpu"]


# --------------------------------------------------------------------------- processes


def _flwr(env: dict[str, str], *args: str, timeout: float = 60) -> subprocess.CompletedProcess:
    return flwr(env, *args, timeout=timeout, cwd=REPO)


def _json_out(result: subprocess.CompletedProcess) -> dict:
    """The JSON document `flwr ... --format json` prints (after any log lines)."""
    start = result.stdout.find("{")
    assert start >= 0, f"no JSON in output:\n{result.stdout}\n{result.stderr}"
    return json.loads(result.stdout[start:])


def _wait_for(predicate, timeout: float, what: str, procs: Processes, interval: float = 0.5):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    pytest.fail(f"timed out after {timeout:.0f}s waiting for {what}\n{procs.logs()}")


@pytest.fixture
def processes(tmp_path: Path):
    env = dict(os.environ)
    env["PATH"] = f"{BIN}{os.pathsep}{env.get('PATH', '')}"
    env["FLWR_HOME"] = str(tmp_path / "flwr-home")
    env["FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION"] = "1"
    env["PYTHONUNBUFFERED"] = "1"
    env.setdefault("OMP_NUM_THREADS", "1")
    env.setdefault("MKL_NUM_THREADS", "1")
    env["PYTHON"] = sys.executable  # make-certs.sh's fallback when ssh-keygen is missing
    logs = tmp_path / "logs"
    logs.mkdir()
    procs = Processes(logs, env)
    try:
        yield procs
    finally:
        procs.stop_all()


def _require_binaries() -> None:
    for tool in ("flower-superlink", "flower-supernode", "flower-superexec", "flwr"):
        if shutil.which(tool, path=f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}") is None:
            pytest.skip(f"{tool} is not on PATH")
    if shutil.which("openssl") is None:
        pytest.skip("openssl is not installed")


def test_make_certs_writes_ca_server_cert_and_keys(tmp_path: Path) -> None:
    if shutil.which("openssl") is None:
        pytest.skip("openssl is not installed")
    out = tmp_path / "certs"
    env = {**os.environ, "PYTHON": sys.executable, "EXTRA_SANS": "DNS:link.example.org,IP:10.1.2.3"}
    subprocess.run(["bash", str(MAKE_CERTS), str(out), "3"], env=env, check=True, capture_output=True, timeout=120)
    for name in ("ca.crt", "ca.key", "server.pem", "server.key"):
        assert (out / name).is_file(), name
    verify = subprocess.run(
        ["openssl", "verify", "-CAfile", str(out / "ca.crt"), str(out / "server.pem")],
        capture_output=True,
        text=True,
        check=False,
    )
    assert verify.returncode == 0, verify.stderr
    text = subprocess.run(
        ["openssl", "x509", "-in", str(out / "server.pem"), "-noout", "-text"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    for san in (
        "DNS:superlink",
        "DNS:localhost",
        "IP Address:127.0.0.1",
        "DNS:link.example.org",
        "IP Address:10.1.2.3",
    ):
        assert san in text, san
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.hazmat.primitives.serialization import load_ssh_private_key, load_ssh_public_key

    for i in range(3):
        private = load_ssh_private_key((out / "keys" / f"supernode-{i}").read_bytes(), None)
        public = load_ssh_public_key((out / "keys" / f"supernode-{i}.pub").read_bytes())
        assert isinstance(private, ec.EllipticCurvePrivateKey) and private.curve.name == "secp384r1"
        assert private.public_key().public_numbers() == public.public_numbers()
        assert (out / "keys" / f"supernode-{i}").stat().st_mode & 0o077 == 0, "private key must be 0600"
    # refuses to overwrite without FORCE=1
    again = subprocess.run(["bash", str(MAKE_CERTS), str(out), "1"], env=env, capture_output=True, timeout=60)
    assert again.returncode != 0


@dataclass
class Federation:
    """A running TLS + authenticated SuperLink and the flwr connection to it."""

    address: str
    certs: Path
    superlink: subprocess.Popen
    node_ids: list[str]  # of the registered keys, in key order

    @property
    def registered(self) -> set[str]:
        return set(self.node_ids)

    @property
    def ca(self) -> Path:
        return self.certs / "ca.crt"

    def supernode_args(self, key: Path, node_config: str, *extra: str, superlink: str = "") -> list[str]:
        """A ``flower-supernode`` with TLS, its own key and ``node_config``, connecting to
        the SuperLink (or to ``superlink``, a proxy in front of it)."""
        return [
            str(BIN / "flower-supernode"),
            "--root-certificates",
            str(self.ca),
            "--auth-supernode-private-key",
            str(key),
            "--superlink",
            superlink or self.address,
            "--node-config",
            node_config,
            "--host",
            "127.0.0.1",
            "--port",
            str(free_port()),  # its local Runtime API
            *extra,
        ]


def start_federation(tmp_path: Path, processes: Processes, num_registered: int, num_keys: int) -> Federation:
    """Certificates and ``num_keys`` SuperNode keys, a SuperLink with TLS and SuperNode
    authentication, the ``ddome-test`` connection, and the first ``num_registered`` keys
    registered."""
    env = processes.env
    # 1. certificates and one key pair per SuperNode (the last ones are never registered)
    certs = tmp_path / "certs"
    subprocess.run(
        ["bash", str(MAKE_CERTS), str(certs), str(num_keys)], env=env, check=True, capture_output=True, timeout=120
    )
    ca = certs / "ca.crt"

    # 2. the SuperLink: TLS on every API, only registered SuperNodes admitted
    port = free_port()
    address = f"127.0.0.1:{port}"
    superlink = processes.start(
        "superlink",
        [
            str(BIN / "flower-superlink"),
            "--ssl-ca-certfile",
            str(ca),
            "--ssl-certfile",
            str(certs / "server.pem"),
            "--ssl-keyfile",
            str(certs / "server.key"),
            "--enable-supernode-auth",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--database",
            str(tmp_path / "superlink.db"),
            "--disable-runtime-dependency-installation",
        ],
    )

    # 3. the connection the flwr CLI uses, in a private FLWR_HOME
    home = Path(env["FLWR_HOME"])
    home.mkdir(parents=True, exist_ok=True)
    (home / "config.toml").write_text(
        '[superlink]\ndefault = "ddome-test"\n\n'
        f'[superlink.ddome-test]\naddress = "{address}"\nroot-certificates = "{ca}"\n'
    )

    def _superlink_up() -> bool:
        assert superlink.poll() is None, f"flower-superlink exited\n{processes.log('superlink')}"
        result = _flwr(env, "supernode", "list", "ddome-test", "--format", "json")
        return result.returncode == 0 and bool(_json_out(result).get("success"))

    _wait_for(_superlink_up, 60, "the SuperLink's Control API", processes)

    # 4. register the SuperNodes' public keys (not the intruders')
    node_ids: list[str] = []
    for i in range(num_registered):
        result = _flwr(
            env, "supernode", "register", str(certs / "keys" / f"supernode-{i}.pub"), "ddome-test", "--format", "json"
        )
        payload = _json_out(result)
        assert payload.get("success"), payload
        node_ids.append(str(payload["node-id"]))
    assert len(set(node_ids)) == num_registered
    return Federation(address, certs, superlink, node_ids)


def wait_all_online(federation: Federation, processes: Processes) -> list[dict]:
    """Wait until every registered SuperNode is online; the SuperLink's node list."""

    def _nodes() -> list[dict]:
        result = _flwr(processes.env, "supernode", "list", "ddome-test", "--format", "json")
        payload = _json_out(result)
        return payload.get("nodes", []) if payload.get("success") else []

    def _all_online():
        nodes = _nodes()
        online = {n["node-id"] for n in nodes if n["status"] == "online"}
        return nodes if online >= federation.registered else None

    count = len(federation.registered)
    return _wait_for(_all_online, 90, f"{count} registered SuperNodes online", processes, interval=1.0)


def _command_line(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace")
    except OSError:
        return ""


def launch(
    processes: Processes, run_config: str, while_running=None, timeout: float = RUN_TIMEOUT_S
) -> tuple[int, str]:
    """Submit this repository to the ``ddome-test`` SuperLink the way a script does
    (``python -m server_app.launch --superlink``: it streams the run's log and exits 0 only
    if the run completed); its exit status and output. ``while_running()`` is called
    about every second until it ends."""
    log_path = processes.log_dir / "launch.log"
    command = [sys.executable, "-m", "server_app.launch", "--superlink", "ddome-test", "--run-config", run_config]
    with open(log_path, "w") as log:
        run = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=processes.env, cwd=REPO)
    deadline = time.monotonic() + timeout
    while run.poll() is None:
        if time.monotonic() > deadline:
            run.kill()
            pytest.fail(f"the run did not end in {timeout:.0f}s\n{log_path.read_text()[-6000:]}\n{processes.logs()}")
        if while_running is not None:
            while_running()
        time.sleep(1.0)
    return run.returncode, log_path.read_text()


def run_to_completion(processes: Processes, run_config: str, while_running=None, timeout: float = RUN_TIMEOUT_S) -> str:
    """:func:`launch` a run that must complete; its output (the ServerApp's log)."""
    status, text = launch(processes, run_config, while_running, timeout)
    assert status == 0, f"the run failed (exit {status})\n{text[-6000:]}\n{processes.logs()}"
    return text


def metric_rows(outputs: Path) -> list[dict]:
    """The rows of the run's metrics.jsonl under ``outputs`` so far."""
    found = sorted(outputs.rglob("metrics.jsonl"))
    return [json.loads(line) for f in found for line in f.read_text().splitlines() if line.strip()]


def check_results(outputs: Path, rounds: int = ROUNDS) -> Path:
    """metrics for every round, the checkpoints and the summary; the run's folder."""
    metrics = sorted(outputs.rglob("metrics.jsonl"))
    assert len(metrics) == 1, f"no metrics.jsonl under {outputs}: {sorted(outputs.rglob('*'))}"
    run_dir = metrics[0].parent
    records = metric_rows(outputs)
    trained = {r.get("round") for r in records if r.get("stage") == "train"}
    assert trained == set(range(1, rounds + 1)), records
    assert any(r.get("stage") == "evaluate" and r.get("round") == rounds for r in records), records
    checkpoints = sorted(p.name for p in (run_dir / "checkpoints").glob("*.pt"))
    assert "moe.pt" in checkpoints and "common_expert.pt" in checkpoints, checkpoints
    assert (run_dir / "summary.json").is_file()
    return run_dir


def test_tls_authenticated_deployment_on_node_local_folders(tmp_path: Path, processes: Processes) -> None:
    """Issue 11 on real processes: ``python -m data.export`` writes one folder per node; each
    SuperNode is started with only its own folder and declares its role (no partition id);
    the ServerApp pretrains the common expert on public/ and never opens the dataset. One
    extra, registered SuperNode holds a malformed folder: its error is logged and the run
    completes without it. The ServerApp is killed during round 2 (the script sees exit 1)
    and the run resumed from its folder: it ends exactly as the same run uninterrupted, in
    one process, on the same folders and node ids."""
    _require_binaries()
    from data.export import main as export_main

    # 0. the export: the same small setting as above
    out = tmp_path / "export"
    overrides = [item for item in RUN_CONFIG.split() if not item.startswith("num-server-rounds")]
    assert export_main(["--out", str(out), "--run-config", f"num-server-rounds={ROUNDS}", *overrides]) == 0
    nodes = json.loads((out / "nodes.json").read_text())
    assert len(nodes) == NUM_NODES
    broken = tmp_path / "broken-node"
    broken.mkdir()
    (broken / "notes.txt").write_text("not a data folder")

    federation = start_federation(tmp_path, processes, NUM_NODES + 1, NUM_NODES + 1)
    keys = federation.certs / "keys"
    for i, node in enumerate(nodes):
        # The node declares its role; its folder is all it holds.
        declared = f"data-path='{node['path']}' role='{node['role']}'"
        declared += f" expert={node['expert']}" if node["expert"] is not None else ""
        processes.start(f"supernode-{i}", federation.supernode_args(keys / f"supernode-{i}", declared))
    processes.start(
        "supernode-broken",
        federation.supernode_args(keys / f"supernode-{NUM_NODES}", f"data-path='{broken}' role='normal'"),
    )
    wait_all_online(federation, processes)

    # The exported run config, plus where this run writes (the submitter's choice).
    outputs, cache = tmp_path / "outputs", tmp_path / "cache"
    run_config = tmp_path / "run.toml"
    run_config.write_text((out / "run-config.toml").read_text() + f"output-dir = '{outputs}'\ncache-dir = '{cache}'\n")
    killed = []

    def kill_serverapp_in_round_2():
        if not killed and any(r["stage"] == "train" for r in metric_rows(outputs)):
            tree = process_tree([federation.superlink.pid])
            killed.extend(p for p in tree if "flwr-serverapp" in _command_line(p))
            for pid in killed:
                os.kill(pid, signal.SIGKILL)

    status, first = launch(processes, str(run_config), kill_serverapp_in_round_2)
    assert killed and status == 1, first[-3000:]
    (run_dir,) = {path.parent for path in outputs.rglob("metrics.jsonl")}
    resume_config = tmp_path / "resume.toml"
    resume_config.write_text(run_config.read_text() + f"resume = '{run_dir}'\n")
    resumed = run_to_completion(processes, str(resume_config))
    log = first + resumed

    check_results(outputs)
    summary = json.loads((run_dir / "summary.json").read_text())
    # The same run in one process, uninterrupted: same folders, same node ids (they seed
    # the nodes' shuffling when there is no partition id).
    from client_app.app import app as client_app
    from server_app.app import run_ddome
    from server_app.config import DEFAULTS
    from server_app.inprocess import InProcessGrid

    grid = InProcessGrid(client_app, 0)
    for node_id, node in zip(federation.node_ids, nodes):
        config = {"data-path": node["path"], "role": node["role"]}
        config |= {"expert": node["expert"]} if node["expert"] is not None else {}
        grid.contexts[int(node_id)] = Context(
            run_id=1, node_id=int(node_id), node_config=config, state=RecordDict(), run_config={}
        )
    exported = tomllib.loads((out / "run-config.toml").read_text())
    uninterrupted = run_ddome(
        grid, {**DEFAULTS, **exported, "output-dir": str(tmp_path / "one-process"), "cache-dir": str(cache)}
    )
    assert summary["zero-shot-acc"] == uninterrupted["zero-shot-acc"]
    assert summary["zero-shot-acc"] is not None and 0 <= summary["zero-shot-acc"] <= 1
    assert summary["routing-error"] is not None  # anchor-labels came with the run config
    assert "Clients: 3 anchors, 1 normal, 1 unseen test" in log, log[-4000:]
    assert f": data folder {broken}: no recognised layout" in log, log[-4000:]
    for i in range(NUM_NODES):
        assert "Receiving:" in processes.log(f"supernode-{i}", tail=10**7), f"supernode-{i} got no message"


def test_a_lost_supernode_costs_only_its_part_and_rejoins_after_a_restart(tmp_path: Path, processes: Processes) -> None:
    """A DDOME run on real processes with TLS and SuperNode authentication (one SuperNode per
    partition id): a SuperNode whose key was not registered is refused; a run that fails is
    seen by a script (exit 1). Then the normal client's SuperNode is killed with its
    ClientApp processes after round 1 and started again, with nothing kept, two rounds
    later: the run goes on without it, finds it again, resends it the common expert, and
    completes with its results and checkpoints."""
    _require_binaries()
    federation = start_federation(tmp_path, processes, NUM_NODES, NUM_NODES + 1)
    keys = federation.certs / "keys"

    def start_node(i: int, name: str) -> subprocess.Popen:
        return processes.start(name, federation.supernode_args(keys / f"supernode-{i}", f"partition-id={i}"))

    for i in range(NUM_NODES):
        start_node(i, f"supernode-{i}")
    intruder = processes.start(
        "supernode-unregistered",
        federation.supernode_args(keys / f"supernode-{NUM_NODES}", "partition-id=0", "--max-retries", "3"),
    )
    nodes = wait_all_online(federation, processes)
    # The unregistered SuperNode is refused: it exits non-zero and never shows up.
    try:
        intruder.wait(timeout=60)
    except subprocess.TimeoutExpired:
        pytest.fail(f"the unregistered SuperNode is still running\n{processes.log('supernode-unregistered')}")
    assert intruder.returncode != 0, processes.log("supernode-unregistered")
    assert {n["node-id"] for n in nodes} == federation.registered
    outputs, cache = tmp_path / "outputs", tmp_path / "cache"
    where = f"output-dir='{outputs}' cache-dir='{cache}'"

    # A ServerApp that raises (top-k above num-experts): the script's exit status says so.
    status, text = launch(processes, f"{RUN_CONFIG} top-k=7 {where}")
    assert status == 1 and "failed" in text.strip().splitlines()[-1], text[-3000:]

    lost, rounds = 3, 6  # partition 3: the only normal client, trained every round
    done = {}

    def kill_then_restart():
        trained = max((r["round"] for r in metric_rows(outputs) if r["stage"] == "train"), default=0)
        if "killed" not in done and trained >= 1:
            processes.kill(f"supernode-{lost}")  # the machine is gone, its ClientApp processes too
            done["killed"] = trained
        elif "killed" in done and "restarted" not in done and trained >= done["killed"] + 2:
            start_node(lost, f"supernode-{lost}-restarted")
            done["restarted"] = trained

    config = RUN_CONFIG.replace(f"num-server-rounds={ROUNDS}", f"num-server-rounds={rounds}")
    log = run_to_completion(processes, f"{config} {where}", kill_then_restart, timeout=3 * RUN_TIMEOUT_S)

    assert "restarted" in done, done
    check_results(outputs, rounds)
    assert any(cache.rglob("*")), "the common expert was not cached in cache-dir"
    assert federation.superlink.poll() is None  # still serving
    replies = {r["round"]: r["num-replies"] for r in metric_rows(outputs) if r["stage"] == "train"}
    full = replies[1]  # 2 anchors + the normal client
    assert min(replies.values()) == full - 1, replies  # rounds without the lost node: its part only
    assert replies[rounds] == full, replies  # back, and trained again
    assert f"normal, partition-id {lost}]" in log, log[-4000:]  # its loss was logged, by role and partition
    assert "no common-expert embeddings" not in log, log[-4000:]
    assert "Receiving:" in processes.log(f"supernode-{lost}-restarted", tail=10**7)


def test_only_the_operator_submits_runs_and_registers_keys(tmp_path: Path, processes: Processes) -> None:
    """The SuperLink listens on loopback only; deploy/fleet_proxy.py serves its Fleet API on
    the address the SuperNodes reach. An outsider holding the CA certificate (every node has
    it) cannot register a key or submit a run there (403); a registered SuperNode connects
    through the proxy; the operator, on the SuperLink's own address, can do both."""
    _require_binaries()
    federation = start_federation(tmp_path, processes, 1, 2)
    keys = federation.certs / "keys"
    proxy_address = f"127.0.0.1:{free_port()}"
    processes.start(
        "fleet-proxy",
        [
            sys.executable,
            str(REPO / "deploy" / "fleet_proxy.py"),
            "--listen",
            proxy_address,
            "--superlink",
            federation.address,
            "--certs",
            str(federation.certs),
        ],
    )
    config = Path(processes.env["FLWR_HOME"]) / "config.toml"
    config.write_text(
        config.read_text()
        + f'\n[superlink.outsider]\naddress = "{proxy_address}"\nroot-certificates = "{federation.ca}"\n'
    )
    node = processes.start(
        "supernode-0", federation.supernode_args(keys / "supernode-0", "partition-id=0", superlink=proxy_address)
    )
    nodes = wait_all_online(federation, processes)  # the registered SuperNode came in through the proxy
    assert node.poll() is None and len(nodes) == 1

    register = _flwr(processes.env, "supernode", "register", str(keys / "supernode-1.pub"), "outsider")
    assert register.returncode != 0 and "403" in register.stdout + register.stderr, register
    submit = _flwr(processes.env, "run", str(REPO), "outsider", "--format", "json", timeout=180)
    assert not _json_out(submit).get("success") and "403" in submit.stdout, submit
    listing = _flwr(processes.env, "ls", "outsider", "--format", "json")
    assert not _json_out(listing).get("success"), listing
    # The operator's view: one SuperNode, no run, no second key.
    assert len(_json_out(_flwr(processes.env, "supernode", "list", "ddome-test", "--format", "json"))["nodes"]) == 1
    assert _json_out(_flwr(processes.env, "ls", "ddome-test", "--format", "json")).get("runs") == []
