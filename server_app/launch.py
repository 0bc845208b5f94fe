"""Run the app with ``flwr run`` and end like a command should: non-zero when the run failed.

    python -m server_app.launch                                   # the main job, local simulation
    python -m server_app.launch --run-config "num-server-rounds=10 top-k=1"
    python -m server_app.launch --superlink my-deployment         # a SuperLink named in ~/.flwr

``flwr run --stream`` exits 0 even when the ServerApp raised; this wrapper streams the
same log, then asks the SuperLink for the run's final status (``flwr ls --run-id``) and
exits 1 with the reason as the last line if the run did not complete. For the local
simulation it sizes the federation from the run config (one SuperNode per client), makes
the SuperLink use this environment (no per-run dependency install), and stops the local
SuperLink it started (by its pid) when the run is over.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

from flwr.common.config import parse_config_args

from server_app.config import DEFAULTS, ConfigError, resolve

APP_DIR = Path(__file__).resolve().parent.parent
RUN_STARTED = re.compile(r"Successfully started run (\d+)")
FINISHED = "finished:completed"


def superlink_pids() -> set[int]:
    """Pids of the ``flower-superlink`` processes running now."""
    pids = set()
    for entry in Path("/proc").glob("[0-9]*"):
        try:
            argv = (entry / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if any(Path(arg.decode(errors="replace")).name == "flower-superlink" for arg in argv[:2]):
            pids.add(int(entry.name))
    return pids


def stop_superlinks(pids: set[int], grace: float = 10.0) -> None:
    """Stop the SuperLinks ``pids`` and their children (each leads its own process group)."""
    for pid in pids:
        try:
            os.killpg(pid, signal.SIGTERM)
        except (ProcessLookupError, PermissionError):
            continue
    deadline = time.monotonic() + grace
    while pids & superlink_pids() and time.monotonic() < deadline:
        time.sleep(0.2)
    for pid in pids & superlink_pids():
        os.killpg(pid, signal.SIGKILL)


def federation_config(run_config: str) -> str:
    """One simulated SuperNode per client of the configured run, one CPU each."""
    explicit = parse_config_args([run_config]) if run_config else {}
    cfg = resolve({**DEFAULTS, **explicit}, explicit=explicit)
    return f"num-supernodes={cfg['num-train-clients'] + cfg['num-test-clients']} client-resources-num-cpus=1"


def run_status(run_id: str, superlink: str | None, env: dict) -> tuple[str, str]:
    """The run's status (``finished:completed``, ``finished:failed``...) and its details."""
    command = ["flwr", "ls", *([superlink] if superlink else []), "--run-id", run_id, "--format", "json"]
    listing = subprocess.run(command, capture_output=True, text=True, env=env, check=False)
    try:
        (run,) = json.loads(listing.stdout)["runs"]
    except (ValueError, KeyError, TypeError):
        return "unknown", f"`{' '.join(command)}` gave no status ({listing.stderr.strip() or listing.stdout.strip()})"
    return run["status"], run.get("status-details", "")


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run-config", default="", help="run-config overrides, as for flwr run")
    parser.add_argument("--superlink", default=None, help="SuperLink connection name (default: the local simulation)")
    parser.add_argument(
        "--federation-config", default=None, help="as for flwr run (default: one SuperNode per client, 1 CPU each)"
    )
    return parser.parse_args(argv)


def main(argv=None) -> int:
    """Run the app; return 0 if the run completed, 1 otherwise (the reason printed last)."""
    args = parse_args(argv)
    try:
        fed_config = args.federation_config or (None if args.superlink else federation_config(args.run_config))
    except (ConfigError, ValueError) as err:
        print(f"DDOME run not started: {err}", flush=True)
        return 2
    command = ["flwr", "run", str(APP_DIR), *([args.superlink] if args.superlink else []), "--stream"]
    command += ["--run-config", args.run_config] if args.run_config else []
    command += ["--federation-config", fed_config] if fed_config else []
    # This environment's flwr, and the SuperLink it starts, find their commands on PATH.
    bin_dir = str(Path(sys.executable).parent)
    env = {
        **os.environ,
        "PATH": os.pathsep.join([bin_dir, os.environ.get("PATH", "")]),
        "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
    }
    before = superlink_pids()
    run_id = None
    with subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env) as flwr:
        for line in flwr.stdout:
            sys.stdout.write(line)
            sys.stdout.flush()
            run_id = run_id or (match.group(1) if (match := RUN_STARTED.search(line)) else None)
    status, details = run_status(run_id, args.superlink, env) if run_id else ("not started", "")
    started_here = superlink_pids() - before
    if started_here and not args.superlink:
        print(f"Stopping the local SuperLink this command started (pid {', '.join(map(str, started_here))}).")
        stop_superlinks(started_here)
    elif not args.superlink and before:
        print(
            "A local SuperLink was already running (pids "
            f"{', '.join(map(str, before))}); it was left running. If it was not started with "
            "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION=1 it installs the app's dependencies for every run."
        )
    if status == FINISHED:
        return 0
    reason = details or (f"flwr run exited with {flwr.returncode}" if not run_id else f"status {status}")
    print(f"DDOME run {run_id or ''} failed: {reason}".replace("  ", " "), flush=True)
    return 1


if __name__ == "__main__":
    sys.exit(main())
