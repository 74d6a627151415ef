"""bench/serve_gpu.py's report: the targets and definitions written into the JSON, the summary ratios of a
shape's waves, and the printed table."""
from __future__ import annotations


TARGETS = {"step_over_floor_b32": "<= 2.0", "adapter_overhead_over_floor": "<= 1.3", "mixed_over_base": ">= 0.6",
           "mixed_over_peft": ">= 200", "base_with_128_resident_over_base_with_0": ">= 0.97",
           "resident128_over_8": ">= 0.95", "hotload_p50_ms": "<= 100", "merged_over_unmerged": "reported"}
SUMMARY_DEFINITIONS = {
    "step_over_floor_b32": "base-only decode step time at batch B / its bandwidth floor (base weights + KV)",
    "adapter_overhead_over_floor": "(decode step with B distinct r16 adapters - base-only step) / (those adapters' "
                                   "bf16 bytes / copy bandwidth)",
    "mixed_over_base": "tok/s, B distinct r16 adapters / base only, batch B",
    "mixed_over_peft": "tok/s, B distinct r16 adapters: loraplex / HF transformers + PEFT (mixed-batch generate)",
    "base_with_128_resident_over_base_with_0": "base-only tok/s at batch B after the residency phase / with no "
                                               "adapters registered",
    "resident128_over_8": "tok/s, B rows over 8 adapters, after the residency phase / with 8 registered",
    "hotload_p50_ms": "p50 of upload start -> first streamed token of a 1-token completion with that adapter",
    "merged_over_unmerged": "tok/s, B rows of one adapter at the default merge policy / the same rows on a server "
                            "with --merge-policy off (case `unmerged`); without it, / B rows over two adapters "
                            "(B/2 each); `merged_over_unmerged_basis` says which",
}

WAVE_DEFINITIONS = {
    "base_b{N}": "N rows of the base model, no adapters registered",
    "over8_b{B}": "B rows over 8 rank-16 adapters (all seven projections), 8 registered",
    "distinct_b{N}": "N rows, each its own rank-16 adapter (all seven projections)",
    "one_adapter_b1": "one row with a rank-16 adapter",
    "mix_b{B}": "B rows, each its own adapter: LoRA r8, r16, r32, r64 and GraLoRA r32 k=4 in turn",
    "merged_b{B}": "B rows of one rank-16 adapter, merge policy at its default (counters.merged_steps: merged steps)",
    "two_adapters_b{B}": "B rows over two rank-16 adapters, B/2 each",
    "merge_off_b{B}": "B rows of one rank-16 adapter on a server started with --merge-policy off",
    "over8_b{B}_resident{R}": "over8 again after registering up to --adapters-residency q/v adapters and making R "
                              "of them resident",
    "base_b{B}_resident{R}": "base_b{B} again after the residency phase",
    "structured_free_b{B}": "B rows of the base model, no response_format; the prompts of every structured_* wave",
    "structured_json_b{B}": "the same B rows, each constrained by a json_schema response_format (an array of at "
                            "least 200 integers: no row completes before max_tokens)",
    "structured_half_b{B}": "the same B rows, every other one constrained",
    "structured_half_adapters4_b{B}": "the same B prompts over 4 rank-16 adapters, half of each adapter's rows "
                                      "constrained",
    "dora_b{B}": "B rows, each its own rank-16 DoRA adapter (all seven projections; compare distinct_b{B})",
    "fields": "tokens_per_s = completion tokens / wave wall time; decode_step_ms = delta decode_seconds / delta "
              "decode_steps from /health; floor.floor_ms = (base + distinct adapters' bf16 + KV bytes per decode "
              "step) / copy bandwidth; graph_gpu_step_ms = GPU time of one decode graph replay (CUDA events; "
              "decode_step_ms minus it is the host's share of a step); counters = /health deltas over the measured "
              "wave (after a warm-up wave)",
}


def number(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


def ratio(a, b):
    return a / b if number(a) and number(b) and b else None


# -- summary, table, JSON ----------------------------------------------------------------------------------
def summarize(record: dict, batch: int, resident: int) -> dict:
    waves = record.get("waves", {})

    def get(name, key):
        return waves.get(name, {}).get(key)

    base, distinct = f"base_b{batch}", f"distinct_b{batch}"
    adapter_floor_ms = None
    if distinct in waves and "floor" in waves[distinct]:  # the adapters' share of that wave's floor
        f = waves[distinct]["floor"]
        adapter_floor_ms = f["floor_ms"] * f["adapter_bytes"] / f["total_bytes"]
    step_delta = None
    if number(get(distinct, "decode_step_ms")) and number(get(base, "decode_step_ms")):
        step_delta = get(distinct, "decode_step_ms") - get(base, "decode_step_ms")
    unmerged = get(f"merge_off_b{batch}", "tokens_per_s")
    basis = f"merge_off_b{batch}" if unmerged else f"two_adapters_b{batch}"
    peft = record.get("peft", {}).get("mixed", {}).get("tokens_per_s")
    return {
        "step_over_floor_b32": get(base, "step_over_floor"),
        "adapter_overhead_over_floor": ratio(step_delta, adapter_floor_ms),
        "mixed_over_base": ratio(get(distinct, "tokens_per_s"), get(base, "tokens_per_s")),
        "mixed_over_peft": ratio(get(distinct, "tokens_per_s"), peft),
        "base_with_128_resident_over_base_with_0": ratio(get(f"base_b{batch}_resident{resident}", "tokens_per_s"),
                                                         get(base, "tokens_per_s")),
        "resident128_over_8": ratio(get(f"over8_b{batch}_resident{resident}", "tokens_per_s"),
                                    get(f"over8_b{batch}", "tokens_per_s")),
        "hotload_p50_ms": record.get("hotload", {}).get("p50_ms"),
        "merged_over_unmerged": ratio(get(f"merged_bf16_b{batch}", "tokens_per_s") or get(f"merged_b{batch}", "tokens_per_s"),
                                      unmerged or get(basis, "tokens_per_s")),
        "merged_over_unmerged_basis": (f"merged_bf16_b{batch}" if get(f"merged_bf16_b{batch}", "tokens_per_s")
                                       else f"merged_b{batch}") + " / " + basis,
        "merged_nf4_over_unmerged": ratio(get(f"merged_nf4_b{batch}", "tokens_per_s"), unmerged or get(basis, "tokens_per_s")),
        "merged_steps_in_merged_wave": (waves.get(f"merged_b{batch}", {}).get("counters") or {}).get("merged_steps"),
        "mix_over_base": ratio(get(f"mix_b{batch}", "tokens_per_s"), get(base, "tokens_per_s")),
    }


def met(value, target: str):
    if not number(value) or target == "reported":
        return None
    op, bound = target.split()
    return {"<=": value <= float(bound), ">=": value >= float(bound), "<": value < float(bound)}[op]


def fmt(x, digits=2) -> str:
    if x is None:
        return "-"
    return f"{x:,.{digits}f}" if number(x) else str(x)


def print_table(result: dict) -> None:
    print(f"\nserve_gpu: {result['device']}, copy bandwidth {result['copy_bandwidth_bytes_per_s'] / 1e9:,.0f} GB/s, "
          f"prompt {result['settings']['prompt_tokens']}, {result['settings']['new_tokens']} new tokens, greedy")
    print(f"{'shape':<6} {'wave':<30} {'rows':>5} {'adapters':>8} {'tok/s':>10} {'step ms':>9} {'gpu ms':>7} "
          f"{'floor ms':>9} {'step/floor':>10} {'merged':>7} {'loads':>6} {'resident':>8}")
    for key, rec in result["shapes"].items():
        for name, w in rec.get("waves", {}).items():
            c, gauges = w.get("counters") or {}, w.get("gauges_after") or {}
            print(f"{key:<6} {name:<30} {w['rows']:>5} {w['distinct_adapters']:>8} {w['tokens_per_s']:>10,.1f} "
                  f"{fmt(w.get('decode_step_ms')):>9} {fmt(w.get('graph_gpu_step_ms')):>7} "
                  f"{fmt((w.get('floor') or {}).get('floor_ms')):>9} "
                  f"{fmt(w.get('step_over_floor')):>10} {fmt(c.get('merged_steps'), 0):>7} "
                  f"{fmt(c.get('adapter_loads'), 0):>6} {fmt(gauges.get('resident_adapters'), 0):>8}")
        peft = rec.get("peft")
        if peft:
            print(f"{key:<6} {'HF PEFT (' + str(peft['new_tokens']) + ' new)':<30} {peft['batch']:>5}  base "
                  f"{peft['base']['tokens_per_s']:,.1f}  one adapter {peft['one_adapter']['tokens_per_s']:,.1f}  "
                  f"{peft['batch']} distinct {peft['mixed']['tokens_per_s']:,.1f} tok/s")
    for key, rec in result["shapes"].items():
        print(f"\nsummary {key} (batch {result['settings']['batch']}):")
        for name, target in TARGETS.items():
            value = rec["summary"].get(name)
            ok = rec["summary_met"].get(name)
            print(f"  {name:<42} {fmt(value, 3):>10}   target {target:<9} "
                  f"{'' if ok is None else ('met' if ok else 'NOT met')}")
        extra = rec["summary"]
        print(f"  (merged_over_unmerged vs {extra['merged_over_unmerged_basis']}, merged steps in the merged wave: "
              f"{fmt(extra['merged_steps_in_merged_wave'], 0)}; mix_over_base {fmt(extra['mix_over_base'], 3)})")
        print(f"features {key} (batch {result['settings']['batch']}):")
        for name, value in rec.get("features", {}).items():
            print(f"  {name:<42} {fmt(value, 3):>10}")
