"""A deployed node's worker: one process per node and run that keeps PyTorch, the handlers,
the node's data and its embeddings loaded between messages.

Flower runs each message of a deployment in a fresh ``flwr-clientapp`` process. The
ClientApp (:mod:`client_app.app`) hands the message to this node's worker over a Unix
socket that only this user can open (:func:`forward`) and replies with what the worker
answered; the first message of a run starts the worker. The worker leaves after
``IDLE_SECONDS`` without a message. If it dies, the message in flight gets an error reply
naming the worker's log, and the next message starts a new worker: it has lost the node's
set-up, says so, and the server sends it again (docs/protocol.md).

Messages and contexts cross the socket as Flower's own protobuf messages (no pickles), each
frame prefixed with its length::

    python -m client_app.worker --socket PATH     # started by forward(), not by hand
"""

from __future__ import annotations

import argparse
import os
import socket
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from flwr.app import Context, Error, Message, RecordDict
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

IDLE_SECONDS = 900.0  # a worker with no message for this long leaves (env DDOME_WORKER_IDLE_SECONDS)
START_SECONDS = 120.0  # how long a message waits for a new worker to listen
REPLY, FAILURE = b"R", b"E"


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


def _start_worker(path: Path) -> None:
    """Start the worker of ``path``, detached, importing this app from where it was installed."""
    app_root = str(Path(__file__).resolve().parent.parent)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([app_root, os.environ.get("PYTHONPATH", "")])}
    idle = os.environ.get("DDOME_WORKER_IDLE_SECONDS", str(IDLE_SECONDS))
    with open(path.with_suffix(".log"), "ab") as log:
        subprocess.Popen(
            [sys.executable, "-m", "client_app.worker", "--socket", str(path), "--idle", idle]
            + ["--parent-pid", str(os.getppid())],  # the node's SuperExec: the worker leaves with it
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            env=env,
            cwd=app_root,
            start_new_session=True,  # outlives this message's process
        )


def forward(message: Message, context: Context) -> Message:
    """Answer ``message`` through this node's worker (started if there is none)."""
    path = socket_path(context)
    sock = _connect(path)
    if sock is None:
        _start_worker(path)
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


def serve(path: Path, idle: float = IDLE_SECONDS, parent_pid: int | None = None) -> None:
    """Answer messages on ``path`` with the project's handlers until ``idle`` seconds pass
    without one, or process ``parent_pid`` (the node's SuperExec) is gone. The node's
    state (its set-up, its embeddings) lives here for the run."""
    from client_app.handlers import app  # PyTorch, the toolkit, the data code: once
    from server_app.inprocess import ensure_task_identity

    ensure_task_identity()  # the handlers build reply Messages outside Flower's runtime
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
    parser.add_argument("--socket", type=Path, required=True)
    parser.add_argument("--idle", type=float, default=IDLE_SECONDS, help="seconds without a message before leaving")
    parser.add_argument("--parent-pid", type=int, default=None, help="leave when this process is gone")
    args = parser.parse_args(argv)
    serve(args.socket, args.idle, args.parent_pid)


if __name__ == "__main__":
    main()
