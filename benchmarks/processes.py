"""Processes of a federation on this machine (SuperLink, SuperNodes and what they start),
each in its own session, stopped by pid: for the deployment tests and the deployed-round
benchmark. Never stops anything by name."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

# Where this environment's Flower commands are (flwr, flower-superlink, flower-supernode).
BIN = Path(sys.executable).parent


def free_port() -> int:
    """A TCP port on loopback that nothing listens on now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def flwr(env: dict[str, str], *args: str, timeout: float = 120, cwd: Path | None = None) -> subprocess.CompletedProcess:
    """Run this environment's ``flwr`` CLI with ``env``; its output captured, never raising on exit status."""
    return subprocess.run(
        [str(BIN / "flwr"), *args], env=env, capture_output=True, text=True, timeout=timeout, check=False, cwd=cwd
    )


def proc_stat(pid: int) -> list[str] | None:
    """Fields of /proc/<pid>/stat after the command name: [state, ppid, ...]."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat.rsplit(")", 1)[1].split()  # the command name may hold spaces or ")"


def start_time(pid: int) -> str | None:
    fields = proc_stat(pid)
    return fields[19] if fields else None  # field 22 of stat: start time in clock ticks


def process_tree(pids: list[int]) -> dict[int, str | None]:
    """The pids and all their descendants (Flower detaches its SuperExecs into new
    sessions, so a process group does not hold them), each with its start time so that a
    reused pid is never signalled."""
    children: dict[int, list[int]] = {}
    if Path("/proc").is_dir():
        for entry in Path("/proc").iterdir():
            if entry.name.isdigit() and (fields := proc_stat(int(entry.name))):
                children.setdefault(int(fields[1]), []).append(int(entry.name))
    seen: dict[int, str | None] = {}
    stack = list(pids)
    while stack:
        pid = stack.pop()
        if pid not in seen:
            seen[pid] = start_time(pid)
            stack.extend(children.get(pid, []))
    return seen


def alive(pid: int, started: str | None) -> bool:
    fields = proc_stat(pid)
    return fields is not None and fields[0] != "Z" and (started is None or fields[19] == started)


class Processes:
    """Processes started here, each in its own session, logging to ``log_dir/<name>.log``; stopped by pid."""

    def __init__(self, log_dir: Path, env: dict[str, str]) -> None:
        self.log_dir = log_dir
        self.env = env
        self.procs: dict[str, subprocess.Popen] = {}

    def start(self, name: str, args: list[str]) -> subprocess.Popen:
        with open(self.log_dir / f"{name}.log", "wb") as log:
            proc = subprocess.Popen(
                args,
                stdout=log,
                stderr=subprocess.STDOUT,
                env=self.env,
                cwd=self.log_dir,
                start_new_session=True,
            )
        self.procs[name] = proc
        return proc

    def kill(self, name: str) -> None:
        """SIGKILL process ``name`` and everything it started: a machine that is lost."""
        for pid, started in process_tree([self.procs[name].pid]).items():
            if alive(pid, started):
                os.kill(pid, signal.SIGKILL)
        self.procs[name].wait()

    def log(self, name: str, tail: int = 4000) -> str:
        path = self.log_dir / f"{name}.log"
        text = path.read_text(errors="replace") if path.exists() else ""
        return text[-tail:]

    def logs(self) -> str:
        return "\n".join(f"===== {name}\n{self.log(name, 2500)}" for name in self.procs)

    def stop_all(self) -> None:
        """SIGTERM our process groups (Flower shuts its SuperExecs down), then SIGTERM and
        finally SIGKILL whatever of the recorded process tree is left."""
        roots = [p.pid for p in self.procs.values() if p.poll() is None]
        tree = process_tree(roots)
        for pid in roots:
            try:
                os.killpg(pid, signal.SIGTERM)  # the session/group each Popen started
            except (ProcessLookupError, PermissionError):
                pass
        for sig, grace in ((None, 10.0), (signal.SIGTERM, 5.0), (signal.SIGKILL, 3.0)):
            if sig is not None:
                for pid, started in tree.items():
                    if alive(pid, started):
                        try:
                            os.kill(pid, sig)
                        except (ProcessLookupError, PermissionError):
                            pass
            deadline = time.monotonic() + grace
            while time.monotonic() < deadline:
                for proc in self.procs.values():
                    proc.poll()  # reap our direct children
                if not any(alive(pid, started) for pid, started in tree.items()):
                    return
                time.sleep(0.2)
