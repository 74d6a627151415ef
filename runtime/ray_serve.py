"""`loraplex serve-ray`: the loraplex HTTP API on Ray Serve, N engine replicas, routed by adapter id.

Two deployments:
- `Ingress` (one replica, thin): takes every HTTP request from Serve's proxy, reads the `model` of a
  completion or chat request and calls the engine deployment with that id as the multiplexed model
  id (the `serve_multiplexed_model_id` of Serve's model multiplexing). The router (below) sends it to
  a replica that already holds the id; other requests (uploads, lists, health, the base model) go to
  the least busy replica.
- `EngineReplica` (N replicas, one GPU each or CPU): one loraplex Service and its FastAPI app from
  http_server, called in-process, so every route, limit and error is the single-process server's.
  Every response carries `x-loraplex-replica` naming the replica.

Adapters live in one store directory (--adapter-dir) every replica reads: an upload is committed
once, by the replica that took it, and the others see it, and every later replace, because the
registry resolves an id through the store's CURRENT version on each request.

Spill-over of a hot adapter (`AdapterRouter`, Serve's router for the engine replicas): a replica
admits at most --max-num-seqs requests at a time (its running batch, Serve's max_ongoing_requests).
A request for an adapter goes to the least busy replica holding it that has room; when none has room
(or none holds it yet), to the least busy one with room among the other replicas holding the fewest
adapters, then among the rest; when no replica has room it waits for one. A replica that takes an
adapter holds it from then on, so a hot adapter spreads over replicas exactly when the batches of
those holding it are full. Serve forgets the least recently used id of a replica beyond
--max-adapters-per-replica; the registry's own LRU decides what stays in accelerator memory.

Streaming: the replica runs the app as an ASGI call and yields the response as the app sends it (the
status and headers, then each body chunk), through a Serve streaming call; the ingress answers an
event stream (`"stream": true`) chunk by chunk and any other response whole. An error found before
the first event (unknown adapter, bad field) is the app's JSON error with its status, as with one server.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import logging
import signal
import sys
import threading

from starlette.requests import Request
from starlette.responses import Response, StreamingResponse

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


def spill_ranks(adapter_id: str, held: dict) -> list[list]:
    """The replicas a request may go to, best rank first: {replica: ids it holds} -> [rank, ...].

    Serve's router takes the least busy replica with room in the first rank that has one, and waits
    and asks again when none has. For an adapter: the replicas holding it, then the other replicas
    holding the fewest adapters, then the rest. Anything else: every replica, as one rank."""
    if not adapter_id:
        return [list(held)]
    holders = [r for r, ids in held.items() if adapter_id in ids]
    others = [r for r, ids in held.items() if adapter_id not in ids]
    fewest = min((len(held[r]) for r in others), default=0)
    return [holders, [r for r in others if len(held[r]) == fewest], [r for r in others if len(held[r]) > fewest]]


def __getattr__(name: str):
    # `AdapterRouter` is made on first use, so that importing this module does not import Ray.
    # Serve looks the router class up by module and name, hence a module attribute.
    if name == "AdapterRouter":
        globals()[name] = _adapter_router_class()
        return globals()[name]
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def _adapter_router_class():
    """`spill_ranks` as the engine deployment's Serve request router (Serve's public extension point)."""
    from ray.serve.request_router import RequestRouter

    class AdapterRouter(RequestRouter):
        async def choose_replicas(self, candidate_replicas, pending_request=None):
            adapter_id = pending_request.metadata.multiplexed_model_id if pending_request else ""
            by_id = {r.replica_id: r for r in candidate_replicas}
            ranks = spill_ranks(adapter_id, {r.replica_id: r.multiplexed_model_ids for r in candidate_replicas})
            if pending_request is not None:
                pending_request.routing_context.should_backoff = True  # no room anywhere: wait before asking again
            return [[by_id[i] for i in rank] for rank in ranks if rank]

    return AdapterRouter


async def call_asgi(app, method: str, path: str, query: str, headers: list, body: bytes):
    """One HTTP request through an ASGI app in this process: yields the messages the app sends, as it
    sends them. The app sees the client leave when the caller stops iterating."""
    sent: asyncio.Queue = asyncio.Queue()
    left = asyncio.Event()
    body_read = False

    async def receive():
        nonlocal body_read
        if not body_read:
            body_read = True
            return {"type": "http.request", "body": body, "more_body": False}
        await left.wait()
        return {"type": "http.disconnect"}

    async def run():
        try:
            await app(scope, receive, sent.put)
        except Exception:
            log.exception("the app failed")  # http_server answers its own errors; this is a bug
        finally:
            sent.put_nowait(None)

    scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": method,
             "scheme": "http", "path": path, "raw_path": path.encode(), "query_string": query.encode(),
             "root_path": "", "headers": [(k.lower().encode("latin-1"), v.encode("latin-1")) for k, v in headers],
             "client": ("127.0.0.1", 0), "server": ("replica", 80)}
    task = asyncio.ensure_future(run())
    try:
        while (message := await sent.get()) is not None:
            yield message
            if message["type"] == "http.response.body" and not message.get("more_body", False):
                break
    finally:
        left.set()  # a stream the caller left: the app's disconnect watch aborts the engine request
        await asyncio.wait([task], timeout=5)
        task.cancel()


async def relay(chunks):
    """An event stream's chunks as the replica yields them (a Serve streaming call); a client that leaves
    cancels the call, which aborts the engine request."""
    finished = False
    try:
        async for chunk in chunks:
            yield chunk
        finished = True
    finally:
        if not finished:
            chunks.cancel()


def build_app(args):
    """The Serve application: N `EngineReplica`s behind one `Ingress`."""
    import torch
    from ray import serve
    from ray.serve.config import RequestRouterConfig

    from .memory_budget import CPU_MAX_NUM_SEQS, MAX_AUTO_NUM_SEQS
    gpu = torch.cuda.is_available() and args.device != "cpu"
    engine_resources = {"num_gpus": 1} if gpu else {"num_cpus": args.replica_cpus}
    # a replica's running batch; the default on a GPU is sized by the replica's engine, at most this
    ongoing = args.max_num_seqs or (MAX_AUTO_NUM_SEQS if gpu else CPU_MAX_NUM_SEQS)

    @serve.deployment(num_replicas=args.replicas, max_ongoing_requests=ongoing,
                      ray_actor_options=engine_resources, graceful_shutdown_timeout_s=args.shutdown_grace,
                      request_router_config=RequestRouterConfig(request_router_class=f"{__name__}.AdapterRouter"))
    class EngineReplica:
        def __init__(self, serve_args):
            from loraplex.runtime.offline import stay_offline  # absolute: Ray ships this class by value
            stay_offline()
            from loraplex.runtime.cli import _key_ring, build_service
            from loraplex.runtime.http_server import create_app
            self.name = serve.get_replica_context().replica_id.unique_id
            self.service = build_service(serve_args, _key_ring(serve_args))
            self.service.start()
            self.app = create_app(self.service)

        @serve.multiplexed(max_num_models_per_replica=args.max_adapters_per_replica)
        async def hold(self, adapter_id: str) -> str:
            # What the replica "loads" for Serve is the id: the registry loads and evicts the weights.
            return adapter_id

        async def forward(self, method: str, path: str, query: str, headers: list, body: bytes):
            """A streaming call: yields (status, headers) once, then the body's chunks as the app sends them."""
            adapter_id = serve.get_multiplexed_model_id()
            if adapter_id:
                await self.hold(adapter_id)
            async for message in call_asgi(self.app, method, path, query, headers, body):
                if message["type"] == "http.response.start":
                    headers = [(k.decode("latin-1"), v.decode("latin-1")) for k, v in message.get("headers", [])]
                    yield message["status"], _forwarded(headers) + [(REPLICA_HEADER, self.name)]
                elif message["type"] == "http.response.body" and message.get("body"):
                    yield message["body"]

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
            chunks = self.engine.options(multiplexed_model_id=adapter_id, stream=True).forward.remote(
                request.method, request.url.path, request.url.query, _forwarded(request.headers.items()), body)
            status, headers = await chunks.__anext__()  # an error before the first event is a whole JSON answer
            if dict((k.lower(), v) for k, v in headers).get("content-type", "").startswith("text/event-stream"):
                response = StreamingResponse(relay(chunks), status_code=status)
            else:
                response = Response(b"".join([chunk async for chunk in chunks]), status_code=status)
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
