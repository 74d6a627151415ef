"""How adapter loads beside the engine slow its steps down (CPU model of issue #20's 1,000-adapter trace).

    python bench/loader_contention.py [--repeats 3] [--loads 96] [--out bench/results/loader_contention.json]

A thread stands in for the engine: each "step" makes 150 small torch calls (each lets the GIL go and takes it
back, as a step's host part does) and then waits 4 ms with the GIL released (the GPU). Beside it, 16 threads
parse and pack `--loads` Llama-3.1-8B-shape rank-16 q/v adapters (parse_adapter, then TritonAdapterOps.prepare:
the runtime's own code, on the CPU) as the loading threads do when a trace's first requests reach new adapters.
Modes, each in a fresh process: `none` (no loads), `free` (the loads as they ran before), `gated` (one adapter
parsed or packed at a time: runtime/adapters/registry.ADAPTER_HOST_WORK). Reported: the step's mean / p50 / p90
time and the loads' wall time. The GIL, not the cores, is what is shared: the same holds on a 16-core host.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
from pathlib import Path

import figures  # noqa: E402 - bench/, beside this file: a PNG beside the JSON

MODES = ("none", "free", "gated")

CHILD = r"""
import contextlib, json, os, sys, threading, time
os.environ["TRITON_INTERPRET"] = "1"  # TritonAdapterOps on the CPU
import torch
from concurrent.futures import ThreadPoolExecutor
from safetensors.torch import save
from loraplex.kernels.ops import TritonAdapterOps
from loraplex.runtime.adapters.peft_format import BaseShape, parse_adapter
from loraplex.runtime.adapters.registry import ADAPTER_HOST_WORK
from loraplex.runtime.engine import GIL_SWITCH_SECONDS

mode, loads = sys.argv[1], int(sys.argv[2])
sys.setswitchinterval(GIL_SWITCH_SECONDS)  # as a running engine sets it
projs = {"q_proj": (4096, 4096), "k_proj": (4096, 1024), "v_proj": (4096, 1024), "o_proj": (4096, 4096),
         "gate_proj": (4096, 14336), "up_proj": (4096, 14336), "down_proj": (14336, 4096)}
base = BaseShape(32, projs)
tensors = {}
for layer in range(32):
    for p in ("q_proj", "v_proj"):
        fan_in, fan_out = projs[p]
        prefix = f"base_model.model.model.layers.{layer}.self_attn.{p}"
        tensors[prefix + ".lora_A.weight"] = torch.randn(16, fan_in) * 0.01
        tensors[prefix + ".lora_B.weight"] = torch.randn(fan_out, 16) * 0.01
raw = save(tensors)
config = json.dumps({"peft_type": "LORA", "r": 16, "lora_alpha": 32, "target_modules": ["q_proj", "v_proj"]}).encode()
ops = TritonAdapterOps(8, projs, 32, "cpu", torch.bfloat16)

gate = ADAPTER_HOST_WORK if mode == "gated" else contextlib.nullcontext()


def load(_):
    with gate:
        weights = parse_adapter(config, bytearray(raw), base, 64, owned=True)
    with gate:
        ops.prepare(weights)


x = torch.randn(64, 64)


def step():
    for _ in range(150):
        x.add(1)
    time.sleep(0.004)


done, loads_s = threading.Event(), []


def run_loads():
    with ThreadPoolExecutor(16) as pool:
        started = time.perf_counter()
        list(pool.map(load, range(loads)))
        loads_s.append(time.perf_counter() - started)
    done.set()


if mode != "none":
    threading.Thread(target=run_loads, daemon=True).start()
steps, end = [], time.perf_counter() + 3
while (not done.is_set()) if mode != "none" else time.perf_counter() < end:
    started = time.perf_counter()
    step()
    steps.append(time.perf_counter() - started)
steps.sort()
print(json.dumps({"step_ms_mean": 1e3 * sum(steps) / len(steps), "step_ms_p50": 1e3 * steps[len(steps) // 2],
                  "step_ms_p90": 1e3 * steps[int(0.9 * len(steps))], "steps": len(steps),
                  "loads_s": loads_s[0] if loads_s else None}))
"""


def run_mode(mode: str, loads: int) -> dict:
    bench = Path(__file__).resolve().parent
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(bench), os.environ.get("PYTHONPATH")])))
    out = subprocess.run([sys.executable, "-c", CHILD, mode, str(loads)], capture_output=True, text=True, env=env,
                         timeout=600)
    if out.returncode:
        raise RuntimeError(f"{mode}: {out.stderr[-2000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=3, help="runs of each mode, alternating")
    parser.add_argument("--loads", type=int, default=96, help="adapters parsed and packed in a run")
    parser.add_argument("--out", type=Path,
                        default=Path(__file__).resolve().parent / "results" / "loader_contention.json")
    args = parser.parse_args()
    runs = {mode: [] for mode in MODES}
    for repeat in range(args.repeats):
        for mode in MODES:
            runs[mode].append(run_mode(mode, args.loads))
            r = runs[mode][-1]
            print(f"  {mode:5} run {repeat + 1}: step mean {r['step_ms_mean']:6.2f} ms  p50 {r['step_ms_p50']:6.2f}  "
                  f"p90 {r['step_ms_p90']:6.2f}  loads {r['loads_s'] or 0:5.2f} s", flush=True)
    median = lambda mode, key: statistics.median(r[key] for r in runs[mode])  # noqa: E731
    summary = {f"step_ms_mean_{mode}": round(median(mode, "step_ms_mean"), 2) for mode in MODES}
    summary.update({f"loads_s_{mode}": round(median(mode, "loads_s"), 2) for mode in MODES[1:]})
    summary["gated_step_over_free"] = round(summary["step_ms_mean_gated"] / summary["step_ms_mean_free"], 3)
    print(f"\nloader_contention ({args.loads} loads on 16 threads, {os.cpu_count()} cores; "
          f"medians of {args.repeats} runs)")
    print(f"{'mode':6} {'step mean ms':>13} {'p50':>7} {'p90':>7} {'loads s':>8}")
    for mode in MODES:
        loads = median(mode, "loads_s") if mode != "none" else None
        print(f"{mode:6} {median(mode, 'step_ms_mean'):13.2f} {median(mode, 'step_ms_p50'):7.2f} "
              f"{median(mode, 'step_ms_p90'):7.2f} {'' if loads is None else f'{loads:8.2f}'}")
    result = {"benchmark": "loader_contention", "host_cpu": platform.processor() or platform.machine(),
              "cpu_count": os.cpu_count(), "python": platform.python_version(), "loads": args.loads,
              "repeats": args.repeats, "summary": summary, "runs": runs}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1))
    print(f"wrote {args.out}")
    png = figures.draw(args.out)
    if png is not None:
        print(f"drew {png}")


if __name__ == "__main__":
    main()
