"""A deployed node's worker: one process per node and run that keeps a ClientApp, with
PyTorch, the node's data and its embeddings, loaded between messages.

Flower runs each message of a deployment in a fresh ``flwr-clientapp`` process, so a
ClientApp that imports PyTorch pays for it on every message and keeps nothing in memory.
:func:`worker_clientapp` makes a light ClientApp that imports only Flower: in such a process
it hands each message to the node's worker over a Unix socket only this user can open
(:func:`forward`), starting the worker with the node's first message of a run; elsewhere (a
simulation, a test) it runs the full ClientApp in place::

    # my_app/client.py, the ClientApp named in pyproject.toml
    from ddome_strategy.worker import DDOME_MESSAGE_TYPES, worker_clientapp
    app = worker_clientapp("my_app.handlers:app", DDOME_MESSAGE_TYPES)

The worker leaves with the node's SuperExec or after ``IDLE_SECONDS`` without a message. If
it dies, the message in flight gets an error reply naming the worker's log, and the next
message starts a new worker: it has lost the node's set-up, says so, and the server sends
it again (docs/protocol.md). Messages and contexts cross the socket as Flower's own
protobuf messages (no pickles), each frame prefixed with its length::

    python -m ddome_strategy.worker --app my_app.handlers:app --socket PATH   # started by forward()
"""

from __future__ import annotations

import argparse
import importlib
import os
import socket
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from flwr.app import Context, Error, Message, RecordDict
from flwr.clientapp import ClientApp
from flwr.common.constant import ErrorCode
from flwr.common.serde import (
    context_from_proto,
    context_to_proto,
    error_from_proto,
    error_to_proto,
    message_from_proto,
    message_to_proto,
    recorddict_from_proto,
    recorddict_to_proto,
)
from flwr.proto.error_pb2 import Error as ProtoError  # pylint: disable=no-name-in-module
from flwr.proto.message_pb2 import Context as ProtoContext  # pylint: disable=no-name-in-module
from flwr.proto.message_pb2 import Message as ProtoMessage  # pylint: disable=no-name-in-module
from flwr.proto.recorddict_pb2 import RecordDict as ProtoRecordDict  # pylint: disable=no-name-in-module
from flwr.supercore.task_identity import TaskIdentity

IDLE_SECONDS = 900.0  # a worker with no message for this long leaves (env DDOME_WORKER_IDLE_SECONDS)
START_SECONDS = 120.0  # how long a message waits for a new worker to listen
REPLY, FAILURE = b"R", b"E"
# The message types of the DDOME protocol, as (category, action) for ClientApp registration.
DDOME_MESSAGE_TYPES = (("query", "role"), ("query", "route"), ("train", "default"), ("evaluate", "default"))


def in_message_process() -> bool:
    """Whether this process is one of Flower's per-message ``flwr-clientapp`` processes."""
    return Path(sys.argv[0]).name == "flwr-clientapp"


def uses_worker(context: Context) -> bool:
    """Whether a message goes to the node's worker: in a per-message ``flwr-clientapp``
    process, unless node config ``worker`` (or the environment variable
    ``DDOME_CLIENT_WORKER``) says otherwise (``true``/``false``)."""
    setting = context.node_config.get("worker", os.environ.get("DDOME_CLIENT_WORKER"))
    if setting is None:
        return in_message_process()
    return str(setting).lower() in ("1", "true", "yes", "on")


def load_app(reference: str) -> ClientApp:
    """The ClientApp ``module:attribute`` names (imported on first use)."""
    module, _, attribute = reference.partition(":")
    return getattr(importlib.import_module(module), attribute)


def worker_clientapp(app: str, message_types=DDOME_MESSAGE_TYPES) -> ClientApp:
    """A ClientApp that imports only Flower and answers ``message_types`` (``(category,
    action)`` pairs) with the ClientApp ``app`` (``"module:attribute"``): through the node's
    worker where :func:`uses_worker`, in this process otherwise."""
    light = ClientApp()

    def handle(message: Message, context: Context) -> Message:
        return forward(message, context, app) if uses_worker(context) else load_app(app)(message, context)

    for category, action in message_types:
        getattr(light, category)(action)(handle)
    return light


def socket_path(context: Context) -> Path:
    """The node's worker socket for this run, in a folder only this user can open."""
    folder = Path(tempfile.gettempdir()) / f"ddome-workers-{os.getuid()}"
    folder.mkdir(mode=0o700, exist_ok=True)
    if folder.stat().st_uid != os.getuid() or folder.stat().st_mode & 0o077:
        raise PermissionError(f"{folder} must belong to this user and be private (mode 700).")
    return folder / f"node-{context.node_id}-run-{context.run_id}.sock"


def _send(sock: socket.socket, *frames: bytes) -> None:
    sock.sendall(b"".join(struct.pack("!Q", len(f)) + f for f in frames))


def _receive(sock: socket.socket) -> bytes:
    (size,) = struct.unpack("!Q", _exactly(sock, 8))
    return _exactly(sock, size)


def _exactly(sock: socket.socket, size: int) -> bytes:
    chunks, left = [], size
    while left:
        chunk = sock.recv(min(left, 1 << 20))
        if not chunk:
            raise ConnectionError("the worker closed the connection")
        chunks.append(chunk)
        left -= len(chunk)
    return b"".join(chunks)


def _connect(path: Path) -> socket.socket | None:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.connect(str(path))
    except (FileNotFoundError, ConnectionRefusedError):
        sock.close()
        return None
    return sock


def _start_worker(path: Path, app: str) -> None:
    """Start the worker of ``path`` for ``app``, detached, importing what this process
    imports from (Flower installs the app's bundle on ``sys.path``)."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in sys.path if p)}
    idle = os.environ.get("DDOME_WORKER_IDLE_SECONDS", str(IDLE_SECONDS))
    with open(path.with_suffix(".log"), "ab") as log:
        subprocess.Popen(
            [sys.executable, "-m", "ddome_strategy.worker", "--app", app, "--socket", str(path), "--idle", idle]
            + ["--parent-pid", str(os.getppid())],  # the node's SuperExec: the worker leaves with it
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            env=env,
            start_new_session=True,  # outlives this message's process
        )


def forward(message: Message, context: Context, app: str) -> Message:
    """Answer ``message`` through this node's worker for ``app`` (started if there is none)."""
    path = socket_path(context)
    sock = _connect(path)
    if sock is None:
        _start_worker(path, app)
        deadline = time.monotonic() + START_SECONDS
        while (sock := _connect(path)) is None:
            if time.monotonic() > deadline:
                reason = f"node {context.node_id}: its worker did not start (see {path.with_suffix('.log')})"
                return Message(Error(ErrorCode.CLIENT_APP_RAISED_EXCEPTION, reason), reply_to=message)
            time.sleep(0.05)
    try:
        with sock:
            _send(
                sock,
                message_to_proto(message).SerializeToString(),
                context_to_proto(context).SerializeToString(),
            )
            kind, payload = _exactly(sock, 1), _receive(sock)
    except OSError as err:
        reason = f"node {context.node_id}: its worker failed ({err}; see {path.with_suffix('.log')})"
        return Message(Error(ErrorCode.CLIENT_APP_RAISED_EXCEPTION, reason), reply_to=message)
    if kind == REPLY:
        return Message(recorddict_from_proto(ProtoRecordDict.FromString(payload)), reply_to=message)
    return Message(error_from_proto(ProtoError.FromString(payload)), reply_to=message)


def _running(pid: int | None) -> bool:
    if pid is None:
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def serve(path: Path, app_reference: str, idle: float = IDLE_SECONDS, parent_pid: int | None = None) -> None:
    """Answer messages on ``path`` with the ClientApp ``app_reference`` until ``idle``
    seconds pass without one, or process ``parent_pid`` (the node's SuperExec) is gone. The
    node's state (its set-up, its embeddings) lives here for the run."""
    app = load_app(app_reference)  # PyTorch, the handlers, the data code: once
    # The handlers build reply Messages outside Flower's runtime, which needs these set.
    TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, 1, 1
    state = RecordDict()
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    path.unlink(missing_ok=True)
    listener.bind(str(path))
    os.chmod(path, 0o600)
    listener.listen()
    listener.settimeout(min(idle, 5.0))
    print(f"worker {os.getpid()} listening on {path}", flush=True)
    last = time.monotonic()
    try:
        while True:
            try:
                conn, _ = listener.accept()
            except TimeoutError:
                if not _running(parent_pid):
                    print(f"process {parent_pid} (the node's SuperExec) is gone: leaving", flush=True)
                    return
                if time.monotonic() - last > idle:
                    print(f"no message for {idle:g} s: leaving", flush=True)
                    return
                continue
            last = time.monotonic()
            with conn:
                conn.settimeout(None)
                message = message_from_proto(ProtoMessage.FromString(_receive(conn)))
                context = context_from_proto(ProtoContext.FromString(_receive(conn)))
                context.state = state  # kept here between messages, not in Flower's context
                try:
                    reply = app(message, context)
                except Exception as err:  # pylint: disable=broad-except  # as Flower's runtime: an error reply
                    reason = f"node {context.node_id}: {err!r}"
                    reply = Message(Error(ErrorCode.CLIENT_APP_RAISED_EXCEPTION, reason), reply_to=message)
                if reply.has_error():
                    _send_kind(conn, FAILURE, error_to_proto(reply.error).SerializeToString())
                else:
                    _send_kind(conn, REPLY, recorddict_to_proto(reply.content).SerializeToString())
    finally:
        listener.close()
        path.unlink(missing_ok=True)


def _send_kind(sock: socket.socket, kind: bytes, payload: bytes) -> None:
    sock.sendall(kind)
    _send(sock, payload)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--app", required=True, help="the ClientApp to serve, as module:attribute")
    parser.add_argument("--socket", type=Path, required=True)
    parser.add_argument("--idle", type=float, default=IDLE_SECONDS, help="seconds without a message before leaving")
    parser.add_argument("--parent-pid", type=int, default=None, help="leave when this process is gone")
    args = parser.parse_args(argv)
    serve(args.socket, args.app, args.idle, args.parent_pid)


if __name__ == "__main__":
    main()
