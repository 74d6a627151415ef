"""The `loraplex` command: serve, train, adapters upload|list|delete.

A command prints its progress and its result, nothing else: loraplex's own log lines (INFO: what it is
doing; WARNING: the one deliberate notice, open mode without API keys), its own progress bars and its
answer. `--verbose` adds the libraries' progress bars and INFO logs (uvicorn's access log included)."""
from __future__ import annotations

import argparse
import atexit
import json
import logging
import os
import sys
from pathlib import Path

from .offline import stay_offline


def _serve(args) -> None:
    import asyncio

    from .gc_timer import enable_heap_freezing

    log = logging.getLogger("loraplex")
    keys = _key_ring(args)
    host = args.host or LOOPBACK
    if keys is None:
        log.warning("no API keys (--api-keys / --api-key): open mode, every caller manages every adapter%s",
                    "" if args.host else f"; listening on {LOOPBACK} only (give --host to listen elsewhere)")
    ports = [("HTTP", args.port)] + ([("gRPC", args.grpc_port)] if args.grpc_port else [])
    for what, port in ports:  # before the model loads: a clash fails in a second, not after a minute
        _check_port_free(host, port, what)
    _check_adapter_dir(args.adapter_dir)
    for source in args.adapter_source or ():
        if not source.is_dir():
            sys.exit(f"loraplex serve: --adapter-source {source}: not a directory")

    service = build_service(args, keys)
    service.start()
    enable_heap_freezing()
    try:
        _run_event_loop(_serve_http_and_grpc(service, host, args))
    except OSError as e:
        sys.exit(f"loraplex serve: {e}")
    finally:
        service.stop()


def _run_event_loop(main) -> None:
    """Run `main` on uvloop where it is installed (a dependency except on Windows), else on asyncio's loop. The
    event loop's thread receives every uploaded byte and bounds an upload's speed: uvloop's transports cost it a
    third less (78 MB uploads to the CPU server: 77 ms of that thread's CPU per upload, 115 ms on asyncio's)."""
    import asyncio
    try:
        import uvloop
    except ImportError:
        asyncio.run(main)
    else:
        uvloop.run(main)


def build_service(args, keys):
    """The Service the serve flags describe (not started)."""
    from .base_model import load_base_model
    from .engine import EngineConfig
    from .service import Service, ServiceConfig
    base = load_base_model(args.model, quantization=args.quantization, dtype=args.dtype, device=args.device)
    engine_config = EngineConfig(max_gpu_adapters=args.max_gpu_adapters, adapter_memory=args.adapter_memory,
                                 max_num_seqs=args.max_num_seqs, max_batched_tokens=args.max_batched_tokens,
                                 kv_cache_tokens=args.kv_cache_tokens, adapter_ops=args.adapter_ops,
                                 cuda_graphs=not args.enforce_eager, merge_policy=args.merge_policy,
                                 merge_format=args.merge_format, prefix_caching=not args.no_prefix_caching,
                                 fold_prefill_adapters=args.fold_prefill_adapters)
    config = ServiceConfig(adapter_dir=args.adapter_dir, adapter_sources=tuple(getattr(args, "adapter_source", None) or ()),
                           max_lora_rank=args.max_lora_rank,
                           max_adapter_bytes=args.max_adapter_mb << 20, max_host_adapters=args.max_cpu_adapters,
                           max_host_adapter_bytes=None if args.host_adapter_memory is None
                           else int(args.host_adapter_memory * (1 << 30)),
                           max_waiting=args.max_waiting, max_concurrent=args.max_concurrent,
                           max_prompt_tokens=args.max_prompt_tokens, max_tokens=args.max_tokens_limit,
                           max_body_bytes=args.max_body_kb << 10, max_adapters_per_tenant=args.max_adapters_per_tenant,
                           request_timeout=args.request_timeout)
    return Service(base, engine_config, config, keys=keys)


LOOPBACK = "127.0.0.1"


def _key_ring(args):
    from .tenants import KeyFileError, KeyRing
    if args.api_keys and args.api_key:
        sys.exit("loraplex serve: give --api-keys FILE or --api-key KEY, not both")
    try:
        if args.api_keys:
            return KeyRing.from_file(args.api_keys)
    except (OSError, KeyFileError) as e:
        sys.exit(f"loraplex serve: --api-keys: {e}")
    return KeyRing.single(args.api_key) if args.api_key else None


def _check_port_free(host: str, port: int, what: str) -> None:
    import socket
    try:
        family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
        with socket.socket(family, kind, proto) as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as the servers bind: TIME_WAIT is no clash
            s.bind(address)
    except OSError as e:
        sys.exit(f"loraplex serve: cannot listen for {what} on {host}:{port}: {e.strerror or e} "
                 f"(is another server running? pick another --{'grpc-' if what == 'gRPC' else ''}port)")


def _check_adapter_dir(adapter_dir: Path | None) -> None:
    """An unusable --adapter-dir (a file, an unwritable place) is an error before the model loads."""
    from .adapters.store import check_store_root
    from .base_model import cache_dir
    try:
        check_store_root(adapter_dir or cache_dir() / "adapters")
    except OSError as e:
        sys.exit(f"loraplex serve: --adapter-dir {e}")


async def _serve_http_and_grpc(service, host: str, args) -> None:
    """HTTP (uvicorn) and gRPC on one event loop, sharing the one Service. SIGTERM / SIGINT drain:
    admission stops (503 / UNAVAILABLE), requests in flight get --shutdown-grace seconds, then both stop."""
    import asyncio

    import uvicorn

    from .grpc_server import start_grpc_server
    from .http_server import create_app

    log = logging.getLogger("loraplex")
    loop, tasks = asyncio.get_running_loop(), []
    grpc_server = None
    if args.grpc_port:
        grpc_server = await start_grpc_server(service, host, args.grpc_port)
        log.info("serving %s over gRPC on %s:%d", service.base.name, host, args.grpc_port)

    class DrainingServer(uvicorn.Server):
        draining = False

        def handle_exit(self, sig, frame) -> None:  # replaces uvicorn's: drain first, exit 0 after
            if self.draining:  # a second signal: stop now
                self.should_exit = self.force_exit = True
                return
            log.info("signal %d: draining (grace %g s)", sig, args.shutdown_grace)
            self.draining = True
            loop.call_soon_threadsafe(lambda: tasks.append(loop.create_task(drain())))

    async def drain() -> None:
        await service.drain(args.shutdown_grace)
        if grpc_server is not None:
            await grpc_server.stop(grace=1)
        http.should_exit = True

    async def watch_engine() -> None:  # a dead engine never recovers: the process ends, non-zero
        while service.engine.alive:
            await asyncio.sleep(0.5)
        log.critical("the engine died (%s): stopping the server", service.engine.error)
        engine_died.append(service.engine.error)
        http.should_exit = True

    engine_died: list[str] = []
    tasks.append(loop.create_task(watch_engine()))
    log.info("serving %s on http://%s:%d", service.base.name, host, args.port)
    http = DrainingServer(uvicorn.Config(create_app(service), host=host, port=args.port, log_level=uvicorn_log_level(args),
                                         timeout_graceful_shutdown=5))
    try:
        await http.serve()
    finally:
        if grpc_server is not None:
            await grpc_server.stop(grace=1)
    if engine_died:
        raise SystemExit(f"loraplex serve: the engine died: {engine_died[0]}")


def _adapters(args) -> None:
    from loraplex.client import ClientError, GrpcClient, HttpClient, adapter_dict
    from loraplex.client.http import quiet_transport_logs
    quiet_transport_logs(args.verbose)
    try:
        if args.grpc:
            with GrpcClient(args.grpc_target, api_key=args.api_key) as client:
                if args.action == "upload":
                    result = adapter_dict(client.upload_adapter(args.dir, args.id))
                elif args.action == "list":
                    result = [adapter_dict(a) for a in client.list_adapters()]
                else:
                    result = {**adapter_dict(client.delete_adapter(args.id)), "deleted": True}
        else:
            client = HttpClient(args.url, api_key=args.api_key)
            if args.action == "upload":
                result = client.upload_adapter(args.dir, args.id)
            elif args.action == "list":
                result = client.list_adapters()
            else:
                result = client.delete_adapter(args.id)
    except ClientError as e:
        sys.exit(f"loraplex adapters {args.action}: {e}")
    print(json.dumps(result, indent=2))


def _memory_amount(text: str) -> float:
    """--adapter-memory: a fraction (0 < f <= 1) of free memory, or gigabytes (> 1), as bytes."""
    value = float(text)
    if not value > 0:
        raise argparse.ArgumentTypeError("must be a positive fraction or a number of GB")
    return value if value <= 1 else value * (1 << 30)


def add_serve_arguments(p: argparse.ArgumentParser) -> None:
    """The flags of `loraplex serve` (`serve-ray` takes the same)."""
    p.add_argument("--host", default=None,
                   help=f"address to listen on (default {LOOPBACK}; without API keys only an explicit --host "
                        "listens beyond loopback)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--grpc-port", type=int, default=50051, help="gRPC port on the same host (0: no gRPC)")
    p.add_argument("--api-keys", type=Path, default=None, metavar="FILE",
                   help="tenants and their keys: one 'TENANT KEY' pair a line (KEY plain or sha256:<hex>); "
                        "tenant 'admin' manages every adapter")
    p.add_argument("--api-key", default=os.environ.get("LORAPLEX_API_KEY"),
                   help="one key (the admin tenant), sent as 'Authorization: Bearer KEY' on HTTP and gRPC "
                        "(default: $LORAPLEX_API_KEY)")
    p.add_argument("--model", default=None, help="local Hugging Face Llama-family checkpoint (default: SmolLM2-135M-Instruct)")
    p.add_argument("--quantization", choices=["nf4", "none"], default=None,
                   help="base weights: nf4 (bitsandbytes, default on a GPU) or none (default on the CPU)")
    p.add_argument("--dtype", choices=["auto", "float32", "bfloat16", "float16"], default="auto",
                   help="compute/activation dtype (auto: bfloat16 on a GPU or a CPU with native bf16, else float32)")
    p.add_argument("--device", default=None, help="cuda or cpu (default: cuda when available)")
    p.add_argument("--adapter-dir", type=Path, default=None, help="adapter store (default: user cache dir)")
    p.add_argument("--adapter-source", type=Path, action="append", default=None, metavar="DIR",
                   help="repeatable: a directory whose folders DIR/<id>/ hold PEFT adapters (adapter_config.json + "
                        "adapter_model.safetensors); a request for an id not in the store loads DIR/<id>/ on first "
                        "use, validated like an upload and cached, not copied into the store")
    p.add_argument("--max-lora-rank", type=int, default=64)
    p.add_argument("--adapter-memory", type=_memory_amount, default=None,
                   help="accelerator memory for resident adapters: GB (e.g. 12) or a fraction of what is free "
                        "after weights and KV (e.g. 0.5, the default)")
    p.add_argument("--max-gpu-adapters", type=int, default=None,
                   help="optional cap on the number of adapters resident in accelerator memory")
    p.add_argument("--host-adapter-memory", type=float, default=None,
                   help="GB of host memory for parsed adapter weights (LRU; an upload larger than this is refused; "
                        "default: a quarter of the machine's memory, at least 4)")
    p.add_argument("--max-cpu-adapters", type=int, default=None,
                   help="optional cap on the number of adapters cached in host memory")
    p.add_argument("--max-adapter-mb", type=int, default=512, help="largest accepted adapter upload")
    p.add_argument("--max-num-seqs", type=int, default=None,
                   help="requests in the running batch (default: 64 on the CPU; on a GPU as many as the KV cache "
                        "holds at 1,024 tokens each, up to 256, fewer if a decode step of that many rows is "
                        "slower than 50 ms)")
    p.add_argument("--max-batched-tokens", type=int, default=2048, help="tokens per engine step")
    p.add_argument("--max-waiting", type=int, default=512,
                   help="requests waiting for admission beyond which new ones are refused (HTTP 429)")
    p.add_argument("--max-concurrent", type=int, default=1024,
                   help="requests admitted and not finished beyond which new ones are refused (HTTP 429)")
    p.add_argument("--max-prompt-tokens", type=int, default=8192, help="longest accepted prompt")
    p.add_argument("--max-tokens-limit", type=int, default=4096, help="largest accepted max_tokens")
    p.add_argument("--max-body-kb", type=int, default=4096,
                   help="largest request body but uploads (HTTP 413), checked before it is read")
    p.add_argument("--max-adapters-per-tenant", type=int, default=256)
    p.add_argument("--request-timeout", type=float, default=600.0,
                   help="seconds a request may run; past it, it ends with an error and is aborted")
    p.add_argument("--shutdown-grace", type=float, default=30.0,
                   help="on SIGTERM, seconds in-flight requests get to finish before they are cancelled")
    p.add_argument("--kv-cache-tokens", type=int, default=None, help="KV-cache capacity in tokens")
    p.add_argument("--adapter-ops", choices=["auto", "torch", "triton"], default="auto",
                   help="adapter math: Triton kernels (auto on CUDA) or the PyTorch reference (auto on CPU)")
    p.add_argument("--merge-policy", default="off",
                   help="serve a dominant adapter from merged weights: off (default), an adapter id (always "
                        "that one: when one adapter takes nearly all traffic) or auto (when one holds the whole "
                        "decode batch for 30 s and, on an NF4 base, the start-up timing says a bf16 copy is "
                        "faster at that batch size; /health merge_pays_rows)")
    p.add_argument("--merge-format", choices=["auto", "bf16", "nf4"], default="auto",
                   help="merged copy of the touched linears: dense bf16 (auto) or re-quantised NF4 "
                        "(as fast as the NF4 base, but a second quantisation error)")
    p.add_argument("--enforce-eager", action="store_true", help="no CUDA graphs for decode steps")
    p.add_argument("--fold-prefill-adapters", type=int, choices=range(0, 3), default=None, metavar="{0,1,2}",
                   help="compute up to this many plain-LoRA adapters' prefill deltas inside the NF4 base matmul "
                        "instead of the expand kernel (CUDA, Triton ops; default: the measured choice, now 0: off)")
    p.add_argument("--no-prefix-caching", action="store_true",
                   help="do not share computed prompt KV blocks between requests")
    p.add_argument("--log-level", default=None,
                   help="uvicorn's log level (default: warning; info with --verbose, which shows each request)")
    p.add_argument("--verbose", action="store_true",
                   help="also print the libraries' progress bars and INFO logs (uvicorn's access log included)")


def uvicorn_log_level(args) -> str:
    return args.log_level or ("info" if args.verbose else "warning")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="loraplex", description="Serve and train many adapters on one base model")
    sub = parser.add_subparsers(dest="command", required=True)

    serve = sub.add_parser("serve", help="start the HTTP and gRPC servers")
    add_serve_arguments(serve)
    serve.set_defaults(func=_serve)

    from .ray_serve import add_ray_arguments, serve_ray
    ray = sub.add_parser("serve-ray", help="serve on Ray Serve: N engine replicas, requests routed by adapter id")
    add_serve_arguments(ray)
    add_ray_arguments(ray)
    ray.set_defaults(func=serve_ray)

    from loraplex.trainer.cli import add_arguments as add_train_arguments, run as run_train
    train = sub.add_parser("train", help="train a LoRA / QLoRA / GraLoRA / Flexora adapter (PEFT format)")
    add_train_arguments(train)
    train.set_defaults(func=run_train)

    adapters = sub.add_parser("adapters", help="manage the adapters of a running server")
    actions = adapters.add_subparsers(dest="action", required=True)
    up = actions.add_parser("upload", help="upload a PEFT adapter directory")
    up.add_argument("dir", type=Path)
    up.add_argument("--id", required=True)
    ls = actions.add_parser("list", help="list adapters")
    rm = actions.add_parser("delete", help="delete an adapter")
    rm.add_argument("id")
    for p in (up, ls, rm):
        p.add_argument("--url", default=os.environ.get("LORAPLEX_URL", "http://127.0.0.1:8000"),
                       help="the server's HTTP address (default: $LORAPLEX_URL, else http://127.0.0.1:8000)")
        p.add_argument("--grpc", action="store_true", help="talk to the gRPC API instead of HTTP")
        p.add_argument("--grpc-target", default="127.0.0.1:50051", help="host:port of the gRPC API")
        p.add_argument("--api-key", default=os.environ.get("LORAPLEX_API_KEY"))
        p.add_argument("--verbose", action="store_true", help="log each HTTP request")
        p.set_defaults(func=_adapters)
    return parser


def quiet_libraries() -> None:
    """No progress bars from transformers / the hub (loading weights, GGUF tensors): loraplex shows its own."""
    os.environ["HF_HUB_DISABLE_PROGRESS_BARS"] = "1"  # read when transformers is first imported
    if "transformers" in sys.modules:
        from transformers.utils import logging as hf_logging
        hf_logging.disable_progress_bar()


def exit_now(code) -> None:
    """Exit with `code` (SystemExit's meaning) skipping the interpreter's teardown, after atexit handlers and
    flushing. A server that imported Triton otherwise prints ~30 lines of `nanobind: leaked ...` at every
    exit: Triton's bindings hold module-level references at teardown, a report about Triton, not about us."""
    if code is not None and not isinstance(code, int):
        print(code, file=sys.stderr)
        code = 1
    atexit._run_exitfuncs()
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code or 0)


def main(argv: list[str] | None = None) -> None:
    stay_offline()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    args = build_parser().parse_args(argv)
    if not getattr(args, "verbose", False):
        quiet_libraries()
    if args.command != "serve" or argv is not None:  # argv: called in-process, leave the interpreter be
        args.func(args)
        return
    try:
        args.func(args)
    except SystemExit as e:
        exit_now(e.code)
    exit_now(0)


if __name__ == "__main__":
    main()
