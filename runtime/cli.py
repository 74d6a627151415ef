"""The `loraplex` command: serve, train, adapters upload|list|delete."""
from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path


def _serve(args) -> None:
    import asyncio

    from .base_model import load_base_model
    from .engine import EngineConfig
    from .service import Service, ServiceConfig

    base = load_base_model(args.model, quantization=args.quantization, dtype=args.dtype, device=args.device)
    engine_config = EngineConfig(max_gpu_adapters=args.max_gpu_adapters, adapter_memory=args.adapter_memory,
                                 max_num_seqs=args.max_num_seqs, max_batched_tokens=args.max_batched_tokens,
                                 kv_cache_tokens=args.kv_cache_tokens, adapter_ops=args.adapter_ops,
                                 cuda_graphs=not args.enforce_eager, merge_policy=args.merge_policy,
                                 merge_format=args.merge_format)
    service = Service(base, engine_config, ServiceConfig(adapter_dir=args.adapter_dir, max_lora_rank=args.max_lora_rank,
                                                         max_adapter_bytes=args.max_adapter_mb << 20,
                                                         max_host_adapters=args.max_cpu_adapters,
                                                         max_waiting=args.max_waiting))
    service.start()
    try:
        asyncio.run(_serve_http_and_grpc(service, args))
    finally:
        service.stop()


async def _serve_http_and_grpc(service, args) -> None:
    """HTTP (uvicorn) and gRPC on one event loop, sharing the one Service."""
    import uvicorn

    from .grpc_server import start_grpc_server
    from .http_server import create_app

    log = logging.getLogger("loraplex")
    grpc_server = None
    if args.grpc_port:
        grpc_server = await start_grpc_server(service, args.host, args.grpc_port, api_key=args.api_key)
        log.info("serving %s over gRPC on %s:%d", service.base.name, args.host, args.grpc_port)
    log.info("serving %s on http://%s:%d", service.base.name, args.host, args.port)
    http = uvicorn.Server(uvicorn.Config(create_app(service, api_key=args.api_key), host=args.host, port=args.port, log_level=args.log_level))
    try:
        await http.serve()
    finally:
        if grpc_server is not None:
            await grpc_server.stop(grace=5)


def _adapters(args) -> None:
    from loraplex.client import ClientError, GrpcClient, HttpClient, adapter_dict
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


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="loraplex", description="Serve and train many adapters on one base model")
    sub = parser.add_subparsers(dest="command", required=True)

    serve = sub.add_parser("serve", help="start the HTTP and gRPC servers")
    serve.add_argument("--host", default="127.0.0.1")
    serve.add_argument("--port", type=int, default=8000)
    serve.add_argument("--grpc-port", type=int, default=50051, help="gRPC port on the same host (0: no gRPC)")
    serve.add_argument("--api-key", default=os.environ.get("LORAPLEX_API_KEY"),
                       help="required from gRPC clients as 'authorization: Bearer KEY' (default: $LORAPLEX_API_KEY)")
    serve.add_argument("--model", default=None, help="local Hugging Face Llama-family checkpoint (default: SmolLM2-135M-Instruct)")
    serve.add_argument("--quantization", choices=["nf4", "none"], default=None,
                       help="base weights: nf4 (bitsandbytes, default on a GPU) or none (default on the CPU)")
    serve.add_argument("--dtype", choices=["auto", "float32", "bfloat16", "float16"], default="auto",
                       help="compute/activation dtype (auto: bfloat16 on a GPU or a CPU with native bf16, else float32)")
    serve.add_argument("--device", default=None, help="cuda or cpu (default: cuda when available)")
    serve.add_argument("--adapter-dir", type=Path, default=None, help="adapter store (default: user cache dir)")
    serve.add_argument("--max-lora-rank", type=int, default=64)
    serve.add_argument("--adapter-memory", type=_memory_amount, default=None,
                       help="accelerator memory for resident adapters: GB (e.g. 12) or a fraction of what is free "
                            "after weights and KV (e.g. 0.5, the default)")
    serve.add_argument("--max-gpu-adapters", type=int, default=None,
                       help="optional cap on the number of adapters resident in accelerator memory")
    serve.add_argument("--max-cpu-adapters", type=int, default=64, help="adapters cached in host memory")
    serve.add_argument("--max-adapter-mb", type=int, default=512, help="largest accepted adapter upload")
    serve.add_argument("--max-num-seqs", type=int, default=64, help="requests in the running batch")
    serve.add_argument("--max-batched-tokens", type=int, default=2048, help="tokens per engine step")
    serve.add_argument("--max-waiting", type=int, default=512,
                       help="requests waiting for admission beyond which new ones are refused (HTTP 429)")
    serve.add_argument("--kv-cache-tokens", type=int, default=None, help="KV-cache capacity in tokens")
    serve.add_argument("--adapter-ops", choices=["auto", "torch", "triton"], default="auto",
                       help="adapter math: Triton kernels (auto on CUDA) or the PyTorch reference (auto on CPU)")
    serve.add_argument("--merge-policy", default="auto",
                       help="serve a dominant adapter from merged weights: off, auto (when it holds the whole "
                            "decode batch and the merged copy reads no more bytes than the base) or an adapter "
                            "id (always that one)")
    serve.add_argument("--merge-format", choices=["auto", "bf16", "nf4"], default="auto",
                       help="merged copy of the touched linears: dense bf16 (auto) or re-quantised NF4 "
                            "(as fast as the NF4 base, but a second quantisation error)")
    serve.add_argument("--enforce-eager", action="store_true", help="no CUDA graphs for decode steps")
    serve.add_argument("--log-level", default="info")
    serve.set_defaults(func=_serve)

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
        p.add_argument("--url", default="http://127.0.0.1:8000")
        p.add_argument("--grpc", action="store_true", help="talk to the gRPC API instead of HTTP")
        p.add_argument("--grpc-target", default="127.0.0.1:50051", help="host:port of the gRPC API")
        p.add_argument("--api-key", default=os.environ.get("LORAPLEX_API_KEY"))
        p.set_defaults(func=_adapters)
    return parser


def main(argv: list[str] | None = None) -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    args = build_parser().parse_args(argv)
    args.func(args)


if __name__ == "__main__":
    main()
