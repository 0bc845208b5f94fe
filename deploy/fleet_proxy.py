"""Expose only a SuperLink's Fleet API (the SuperNodes' door), not its Control API.

Flower 1.41 serves the Fleet API (SuperNodes), the Control API (``flwr run``,
``flwr supernode register``) and the Runtime API on one port, and the open-source SuperLink
does not authenticate Control API callers: anyone who can reach that port with the CA
certificate (which every node holds) can submit runs and register SuperNode keys. So keep
the SuperLink on the loopback interface and put this TLS proxy on the address the
SuperNodes reach; it forwards the Fleet API's routes (taken from Flower's own router) and
answers everything else with 403::

    flower-superlink --host 127.0.0.1 --port 9093 --ssl-certfile deploy/certs/server.pem \\
        --ssl-keyfile deploy/certs/server.key --ssl-ca-certfile deploy/certs/ca.crt --enable-supernode-auth ...
    python deploy/fleet_proxy.py --listen 0.0.0.0:9092 --superlink 127.0.0.1:9093 --certs deploy/certs

SuperNodes then use ``--superlink <host>:9092``; the operator runs ``flwr`` on the SuperLink
host (or through an SSH tunnel) against ``127.0.0.1:9093``. See docs/deploy.md, "Who may
submit runs".
"""

from __future__ import annotations

import argparse
from pathlib import Path

import httpx
import uvicorn
from flwr.superlink.routers.fleet.router import router as fleet_router
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

# Hop-by-hop and length headers: the proxy sets its own.
DROPPED_HEADERS = {"host", "content-length", "transfer-encoding", "content-encoding", "connection"}


def fleet_routes() -> set[tuple[str, str]]:
    """``(method, path)`` of every Fleet API route of the installed Flower."""
    return {(method, route.path) for route in fleet_router.routes for method in route.methods}


def proxy_app(superlink: str, ca_certfile: Path) -> Starlette:
    """An app forwarding the Fleet API's routes to ``https://<superlink>``; 403 for the rest."""
    allowed = fleet_routes()
    upstream = httpx.AsyncClient(base_url=f"https://{superlink}", verify=str(ca_certfile), timeout=None)

    async def forward(request: Request) -> Response:
        if (request.method, request.url.path) not in allowed:
            return Response(b"only the Fleet API is served here\n", status_code=403)
        headers = {k: v for k, v in request.headers.items() if k.lower() not in DROPPED_HEADERS}
        reply = await upstream.request(request.method, request.url.path, content=await request.body(), headers=headers)
        headers = {k: v for k, v in reply.headers.items() if k.lower() not in DROPPED_HEADERS}
        return Response(reply.content, status_code=reply.status_code, headers=headers)

    methods = ["GET", "POST", "PUT", "PATCH", "DELETE"]
    return Starlette(routes=[Route("/{path:path}", forward, methods=methods)])


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--listen", required=True, help="host:port the SuperNodes connect to")
    parser.add_argument("--superlink", required=True, help="host:port of the SuperLink (on loopback)")
    parser.add_argument("--certs", type=Path, required=True, help="folder of ca.crt, server.pem, server.key")
    args = parser.parse_args(argv)
    host, port = args.listen.rsplit(":", 1)
    uvicorn.run(
        proxy_app(args.superlink, args.certs / "ca.crt"),
        host=host,
        port=int(port),
        ssl_certfile=str(args.certs / "server.pem"),
        ssl_keyfile=str(args.certs / "server.key"),
        log_level="warning",
    )


if __name__ == "__main__":
    main()
