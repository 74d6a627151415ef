"""`loraplex serve-ray`: the loraplex HTTP API on Ray Serve, N engine replicas, routed by adapter id.

Two deployments:
- `Ingress` (one replica, thin): takes every HTTP request from Serve's proxy, reads the `model` of a
  completion or chat request and calls the engine deployment with that id as the multiplexed model
  id (the `serve_multiplexed_model_id` of Serve's model multiplexing). Serve's router sends it to a
  replica that already holds the id; other requests (uploads, lists, health, the base model) go to
  any replica.
- `EngineReplica` (N replicas, one GPU each or CPU): one loraplex Service and its FastAPI app from
  http_server, called in-process, so every route, limit and error is the single-process server's.
  Every response carries `x-loraplex-replica` naming the replica.

Adapters live in one store directory (--adapter-dir) every replica reads: an upload is committed
once, by the replica that took it, and the others see it, and every later replace, because the
registry resolves an id through the store's CURRENT version on each request.

Spill-over of a hot adapter: each replica admits at most --max-num-seqs requests at a time (its
running batch, Serve's max_ongoing_requests). Serve routes a request to the replicas holding its
adapter while one of them has room; when all are full it routes to the replica holding the fewest
adapters, which loads the adapter and from then on holds it too (a new adapter goes there as well). So a hot adapter spreads over replicas exactly when one
replica's batch is full. Serve forgets the least recently used id of a replica beyond
--max-adapters-per-replica; the registry's own LRU decides what stays in accelerator memory.

Responses are returned whole: a streamed (`"stream": true`) answer reaches the client complete, in
the same SSE format, after the last token.
"""
from __future__ import annotations

import argparse
import json
import logging
import signal
import sys
import threading

from starlette.requests import Request
from starlette.responses import Response

log = logging.getLogger("loraplex.ray")
ROUTED_PATHS = ("/v1/completions", "/v1/chat/completions")  # bodies that name an adapter in `model`
HOP_HEADERS = {"host", "content-length", "transfer-encoding", "connection"}
REPLICA_HEADER = "x-loraplex-replica"


def add_ray_arguments(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("Ray Serve")
    g.add_argument("--replicas", type=int, default=1, help="engine replicas (one GPU each, or CPU)")
    g.add_argument("--ray-address", default=None,
                   help="Ray cluster to join ('auto': the one running here; default: start a local Ray instance)")
    g.add_argument("--max-adapters-per-replica", type=int, default=64,
                   help="adapter ids Serve routes to one replica before it forgets the least recently used")
    g.add_argument("--replica-cpus", type=float, default=1.0, help="CPUs reserved per engine replica on a CPU-only node")
    p.set_defaults(grpc_port=0)  # serve-ray serves HTTP only


def routing_id(path: str, body: bytes) -> str:
    """The adapter id a request is routed by; "" (any replica) for the base model and other routes."""
    if path not in ROUTED_PATHS:
        return ""
    try:
        model = json.loads(body).get("model")
    except (ValueError, AttributeError):
        return ""  # the replica answers the 400
    return model if isinstance(model, str) and model != "base" else ""


def _forwarded(headers) -> list[tuple[str, str]]:
    return [(k, v) for k, v in headers if k.lower() not in HOP_HEADERS]


def build_app(args):
    """The Serve application: N `EngineReplica`s behind one `Ingress`."""
    import torch
    from ray import serve

    engine_resources = {"num_gpus": 1} if torch.cuda.is_available() and args.device != "cpu" else {
        "num_cpus": args.replica_cpus}

    @serve.deployment(num_replicas=args.replicas, max_ongoing_requests=args.max_num_seqs,
                      ray_actor_options=engine_resources, graceful_shutdown_timeout_s=args.shutdown_grace)
    class EngineReplica:
        def __init__(self, serve_args):
            import httpx

            from loraplex.runtime.cli import _key_ring, build_service  # absolute: Ray ships this class by value
            from loraplex.runtime.http_server import create_app
            self.name = serve.get_replica_context().replica_id.unique_id
            self.service = build_service(serve_args, _key_ring(serve_args))
            self.service.start()
            self.client = httpx.AsyncClient(transport=httpx.ASGITransport(app=create_app(self.service)),
                                            base_url="http://replica", timeout=None)

        @serve.multiplexed(max_num_models_per_replica=args.max_adapters_per_replica)
        async def hold(self, adapter_id: str) -> str:
            # What the replica "loads" for Serve is the id: the registry loads and evicts the weights.
            return adapter_id

        async def forward(self, method: str, path: str, query: str, headers: list, body: bytes):
            adapter_id = serve.get_multiplexed_model_id()
            if adapter_id:
                await self.hold(adapter_id)
            r = await self.client.request(method, path + (f"?{query}" if query else ""), headers=headers, content=body)
            return r.status_code, _forwarded(r.headers.multi_items()) + [(REPLICA_HEADER, self.name)], r.content

        def check_health(self) -> None:
            if not self.service.engine.alive:  # Serve replaces a replica whose engine died
                raise RuntimeError(f"the engine died: {self.service.engine.error}")

        def __del__(self):
            service = getattr(self, "service", None)
            if service is not None:
                service.stop()

    @serve.deployment(num_replicas=1, ray_actor_options={"num_cpus": 0}, max_ongoing_requests=100_000)
    class Ingress:
        def __init__(self, engine):
            self.engine = engine

        async def __call__(self, request: Request) -> Response:
            body = await request.body()
            adapter_id = routing_id(request.url.path, body)
            status, headers, content = await self.engine.options(multiplexed_model_id=adapter_id).forward.remote(
                request.method, request.url.path, request.url.query, _forwarded(request.headers.items()), body)
            response = Response(content, status_code=status)
            for k, v in headers:
                response.headers.append(k, v)
            return response

    return Ingress.bind(EngineReplica.bind(args))


def serve_ray(args) -> None:
    from .cli import LOOPBACK, _check_port_free, _key_ring
    if args.grpc_port:
        sys.exit("loraplex serve-ray: --grpc-port is not supported (serve-ray serves the HTTP API only)")
    if args.replicas < 1:
        sys.exit("loraplex serve-ray: --replicas must be at least 1")
    keys = _key_ring(args)  # a bad key file fails here, before Ray starts
    host = args.host or LOOPBACK
    if keys is None:
        log.warning("no API keys (--api-keys / --api-key): open mode, every caller manages every adapter")
    _check_port_free(host, args.port, "HTTP")

    import ray
    from ray import serve
    ray.init(address=args.ray_address, include_dashboard=False,
             **({} if args.ray_address else {"_node_ip_address": LOOPBACK}))
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    try:
        serve.start(http_options={"host": host, "port": args.port})
        serve.run(build_app(args), name="loraplex", route_prefix="/")
        log.info("serving on http://%s:%d with %d replicas on Ray Serve", host, args.port, args.replicas)
        stop.wait()
        log.info("stopping: in-flight requests get %g s", args.shutdown_grace)
    finally:
        serve.shutdown()
        ray.shutdown()
