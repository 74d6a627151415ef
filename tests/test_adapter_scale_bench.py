"""bench/adapter_scale.py --gpu on the CPU: its adapter sets (distinct, the two trace sets disjoint, their sizes
on the 8B shape), the fp32 adapters it uploads, the two traces it compares, its summary from raw numbers; and
the whole device path end to end on a tiny checkpoint with --device cpu (2 repeats, 8 requests over 4 vs 8)."""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

import torch
from safetensors.torch import load as load_safetensors

from conftest import bench_module  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


def gpu():
    return bench_module("adapter_scale_gpu")


def default_args(*argv: str):
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeats", type=int, default=5)
    gpu().add_arguments(ap)
    return ap.parse_args(list(argv))


def test_adapter_sets_are_distinct_and_fit_the_disk():
    g = gpu()
    few, many = g.trace_specs(64), g.trace_specs(1000)
    specs = few + many + [g.upload_spec(i) for i in range(5)] + [g.source_spec(i) for i in range(5)]
    assert len({s.id for s in specs}) == len({s.seed for s in specs}) == len(specs)
    assert {(s.rank, s.targets, s.peft_type) for s in few + many} == {(16, ("q_proj", "v_proj"), "LORA")}
    assert len(g.upload_spec(0).targets) == len(g.source_spec(0).targets) == 7
    shape = g.SHAPES["8b"]  # the 168 MB fp32 upload; 1,064 q/v folders + the 16 GB checkpoint < 64 GiB
    assert 167e6 < 2 * g.upload_spec(0).bytes_bf16(shape) < 169e6
    assert 14e9 < sum(s.bytes_bf16(shape) for s in few + many) < 15e9


def test_fp32_adapter_is_the_bf16_one_upcast(tmp_path):
    g = gpu()
    shape, pool, spec = g.SHAPES["tiny"], g.RandomPool(1 << 16), g.source_spec(3)
    config, weights = g.fp32_payload(spec, shape, pool)
    reference = g.adapter_tensors(spec, shape, pool)
    tensors = load_safetensors(weights)
    assert tensors.keys() == reference.keys() and len(tensors) == 2 * 7 * shape.layers
    assert all(t.dtype == torch.float32 and torch.equal(t, reference[k].float()) for k, t in tensors.items())
    assert json.loads(config) == spec.config()
    folder = g.write_fp32_adapter(spec, shape, pool, tmp_path)
    assert folder == tmp_path / spec.id and (folder / "adapter_model.safetensors").read_bytes() == weights
    assert (folder / "adapter_config.json").read_bytes() == config


def test_the_two_traces_differ_in_adapters_and_prompt_ids_only():
    g = gpu()
    args = default_args()
    assert (args.trace_adapters, args.requests, args.prompt_len, args.output_len, args.zipf, args.base_share) == \
        ((64, 1000), 400, (64, 1024), (32, 256), 1.0, 0.1)  # issue #19's trace, issue #20's counts
    shape = g.SHAPES["8b"]
    few, many = ([s.id for s in g.trace_specs(n)] for n in args.trace_adapters)
    a = g.make_trace(args, shape, few, prompt_salt=args.seed + 64)
    b = g.make_trace(args, shape, many, prompt_salt=args.seed + 1000)
    assert [(len(p), o, m == "base") for p, o, m in a] == [(len(p), o, m == "base") for p, o, m in b]
    assert not {p for p, _, _ in a} & {p for p, _, _ in b}  # no prefix-cache hit across the runs
    assert {m for _, _, m in a} <= set(few) | {"base"} and {m for _, _, m in b} <= set(many) | {"base"}
    assert 20 < sum(m == "base" for _, _, m in a) < 60
    used_few, used_many = (g.trace_summary(t)["distinct_adapters"] for t in (a, b))
    assert used_few > 45 and 120 < used_many < 220  # Zipf(1.0), ~350 adapter requests: most of 64, ~15% of 1,000


def test_summary_from_raw_numbers():
    g = gpu()
    result = {"settings": {"trace_adapters": [64, 1000]}, "upload_mb": 168.0, "upload_s": [0.2, 0.1, 0.4],
              "hotload_after_upload_s": [0.05, 0.03, 0.07], "source_first_token_s": [], "trace": {}}
    assert g.summarize(result) == {"upload_mb_s_gpu_host": 840.0, "hotload_after_upload_ms_p50": 50.0,
                                   "source_first_token_ms_p50": None, "trace_1000_over_64": None}

    def run(tok_s, errors=0):
        return {"output_tok_s": tok_s, "errors": errors, "short_outputs": 0}
    result["trace"] = {"64": run(2000.0)}
    assert g.summarize(result)["trace_1000_over_64"] is None  # one run only (cut short)
    result["trace"]["1000"] = run(1500.0)
    assert g.summarize(result)["trace_1000_over_64"] == 0.75
    result["trace"]["1000"] = run(1500.0, errors=3)
    assert g.summarize(result)["trace_1000_over_64"] is None


def test_device_part_smoke_on_cpu(tmp_path):
    out = tmp_path / "adapter_scale_gpu.json"
    done = subprocess.run([sys.executable, "bench/adapter_scale.py", "--gpu", "--shape", "tiny", "--device", "cpu",
                           "--repeats", "2", "--trace-adapters", "4,8", "--requests", "8", "--prompt-len", "8,48",
                           "--output-len", "2,6", "--work", str(tmp_path / "work"), "--out", str(out)],
                          cwd=REPO, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    result = json.loads(out.read_text())
    assert result["mode"] == "gpu" and result["errors"] == {} and result["device"].startswith("cpu")
    assert all(v is not None for v in result["summary"].values()), result["summary"]
    assert len(result["upload_s"]) == len(result["hotload_after_upload_s"]) == len(result["source_first_token_s"]) == 2
    floors = result["host_floors_mb_s"]
    assert all(floors[k] > 0 for k in ("loopback_tcp", "sha256", "disk_write_fsync")), floors
    for count in ("4", "8"):
        run = result["trace"][count]
        assert run["errors"] == run["short_outputs"] == 0 and run["output_tokens"] == run["trace"]["output_tokens"]
        assert run["counters"]["adapter_loads"] == run["trace"]["distinct_adapters"] > 0  # each loaded at first use
    assert result["settings"]["trace_adapters"] == [4, 8] and "--adapter-source" in result["settings"]["server_flags"]
    timings = result["server_timings"]  # the server's own log lines: each upload's phases
    assert len(timings["uploads"]) == 2 and timings["p50_ms"]["upload_received"] is not None


def test_server_timings_from_log_lines():
    gpu = bench_module("adapter_scale_gpu")
    log = ("2026-12-06 09:45:40,443 loraplex.service INFO upload up-0: 167.8 MB received in 119 ms, then synced in "
           "51 ms, validated and committed in 27 ms\n"
           "2026-12-07 09:45:40,443 loraplex.service INFO upload up-1: 167.8 MB received in 120 ms, then synced in "
           "6 ms beside its validation, validated and committed in 21 ms\n"
           "2026-12-06 09:45:40,500 loraplex.kernels.ops INFO packed an adapter of 224 modules: 83.9 MB of pinned "
           "torch.bfloat16 host memory in 61 ms (allocation 40 ms)\nsomething else\n")
    timings = gpu.server_timings(log)
    assert timings["uploads"] == [{"id": "up-0", "mb": 167.8, "received_ms": 119, "synced_ms": 51, "validated_ms": 27},
                                  {"id": "up-1", "mb": 167.8, "received_ms": 120, "synced_ms": 6, "validated_ms": 21}]
    assert timings["packs"] == [{"modules": 224, "mb": 83.9, "ms": 61, "allocation_ms": 40}]
    assert timings["p50_ms"]["pack_allocation"] == 40 and gpu.server_timings("")["p50_ms"]["pack"] is None


def test_pack_speed_bench_runs_on_the_cpu(tmp_path):
    """bench/pack_speed.py on the tiny shape: every variant timed and written (the device run times the 8B pack)."""
    out = tmp_path / "pack_speed.json"
    done = subprocess.run([sys.executable, str(REPO / "bench" / "pack_speed.py"), "--shape", "tiny", "--repeats", "1",
                           "--threads", "1,2", "--out", str(out)], cwd=REPO / "bench", capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    result = json.loads(out.read_text())
    assert set(result["ms_p50"]) == {"threads=1", "threads=2", "foreach", "foreach/2", "serial/2", "memcpy"}, \
        result["ms_p50"]
    assert out.with_suffix(".png").exists()  # its figure beside it
