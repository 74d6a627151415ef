"""bench/serve_gpu.py end to end on the CPU: a tiny random-weight checkpoint, real server processes, every case
but the HF PEFT baseline, with reduced counts (batch 8 / 16, 20 registered / 8 resident, 4 new tokens, 3 prefix
prompts); and the bench tokenizer's JSON pieces, as xgrammar sees them."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
WAVES = ("base_b1", "base_b8", "base_b16", "over8_b8", "distinct_b8", "distinct_b16", "one_adapter_b1", "mix_b8",
         "merged_b8", "two_adapters_b8", "over8_b8_resident8", "base_b8_resident8", "merge_off_b8",
         "structured_free_b8", "structured_json_b8", "structured_half_b8", "structured_half_adapters4_b8", "dora_b8")
FEATURES = {"prefix_hit_ttft_over_miss", "prefix_hit_ttft_over_miss_adapter", "structured_step_over_free",
            "structured_half_step_over_free", "dora_step_over_lora"}


def bench_modules():
    sys.path.insert(0, str(REPO / "bench"))
    try:
        import serve_gpu_features
        import serve_gpu_models
    finally:
        sys.path.remove(str(REPO / "bench"))
    return serve_gpu_models, serve_gpu_features


def test_bench_tokenizer_spells_json(tmp_path):
    """Every id decodes, the JSON characters are single tokens, and xgrammar (as runtime/structured.py builds
    it) constrains the structured case's schema to them."""
    import json

    import xgrammar as xgr
    from transformers import AutoTokenizer
    models, features = bench_modules()
    shape = models.SHAPES["tiny"]
    models.write_tokenizer(shape, tmp_path)
    tok = AutoTokenizer.from_pretrained(tmp_path)
    pieces = [tok.decode([i]) for i in range(shape.vocab)]
    assert all(pieces[4:]) and len(set(tok.convert_ids_to_tokens(list(range(shape.vocab))))) == shape.vocab
    assert set('[]{},:"-. 0123456789') <= set(pieces)
    info = xgr.TokenizerInfo.from_huggingface(tok, vocab_size=shape.vocab, stop_token_ids=[2])
    assert info.vocab_type == xgr.VocabType.BYTE_LEVEL
    compiler = xgr.GrammarCompiler(info, max_threads=1, cache_enabled=False)
    matcher = xgr.GrammarMatcher(compiler.compile_json_schema(json.dumps(features.LONG_SCHEMA), any_whitespace=False,
                                                              strict_mode=True))
    text = ""
    for _ in range(12):  # the lowest allowed id each step: "[" then digits and commas, never "]" (minItems)
        mask = xgr.allocate_token_bitmask(1, shape.vocab)
        matcher.fill_next_token_bitmask(mask, 0)
        token = next(i for i in range(shape.vocab) if (int(mask[0, i // 32]) >> (i % 32)) & 1)
        assert matcher.accept_token(token)
        text += pieces[token]
    assert text.startswith("[") and features.INT_ARRAY_PREFIX.match(text), text
    check = features.json_check([{"text": t} for t in ("[", "[1, -2, ", "[-", "[0", "[01", "[1, 2]", "[1,2", None)])
    assert (check["valid_prefix"], check["complete_valid"], check["invalid"]) == (5, 0, 3)


def test_serve_gpu_bench_tiny_on_cpu(tmp_path):
    out = tmp_path / "serve_gpu.json"
    cmd = [sys.executable, str(REPO / "bench" / "serve_gpu.py"), "--shapes", "tiny", "--device", "cpu",
           "--new-tokens", "4", "--skip-peft", "--batch", "8", "--big-batch", "16", "--adapters-residency", "20",
           "--resident", "8", "--hotload-runs", "3", "--prefix-prompts", "3", "--work", str(tmp_path / "work"),
           "--out", str(out)]
    proc = subprocess.Popen(cmd, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)  # its own process group: the servers go with it on a time-out
    try:
        log, _ = proc.communicate(timeout=240)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        log, _ = proc.communicate()
        raise AssertionError(f"bench/serve_gpu.py took over 240 s:\n{log[-4000:]}")
    assert proc.returncode == 0, log[-4000:]

    result = json.loads(out.read_text())
    assert result["device"].startswith("cpu") and result["copy_bandwidth_bytes_per_s"] > 0
    assert result["summary_shape"] == "tiny"
    assert set(result["summary"]) == set(result["targets"]) == {
        "step_over_floor_b32", "adapter_overhead_over_floor", "mixed_over_base", "mixed_over_peft",
        "base_with_128_resident_over_base_with_0", "resident128_over_8", "hotload_p50_ms", "merged_over_unmerged"}
    tiny = result["shapes"]["tiny"]
    assert set(result["targets"]) <= set(tiny["summary"])
    for key in ("mixed_over_base", "base_with_128_resident_over_base_with_0", "resident128_over_8", "hotload_p50_ms",
                "merged_over_unmerged"):
        assert tiny["summary"][key] > 0, key
    assert tiny["summary"]["merged_over_unmerged_basis"].endswith("/ merge_off_b8")
    assert tiny["summary"]["mixed_over_peft"] is None  # --skip-peft
    for name in WAVES:
        wave = tiny["waves"][name]
        assert wave["completion_tokens"] == 4 * wave["rows"], name
    assert tiny["waves"]["distinct_b16"]["distinct_adapters"] == 16
    assert tiny["waves"]["mix_b8"]["adapters"] == ["GRALORA r32 k4", "LORA r16", "LORA r32", "LORA r64", "LORA r8"]
    floor = tiny["waves"]["distinct_b8"]["floor"]
    assert floor["adapter_bytes"] == 8 * 2 * 2 * 16 * (64 * 2 + 96 * 2 + 64 * 2 + 192 * 3)  # 8 adapters, 2 layers, bf16
    assert tiny["residency"]["registered"] >= 20 and tiny["residency"]["touched"] == 8
    assert len(tiny["hotload"]["runs"]) == 3
    assert set(result["summary_features"]) == set(tiny["features"]) == FEATURES
    # the fast-path check: on a CPU the merged rows against the eager reference, and the negative control fails
    assert tiny["fidelity"]["pieces"] == ["merged"] and tiny["fidelity"]["passed"], tiny["fidelity"]["failed"]
    control, bound = tiny["fidelity"]["report"]["control_without_adapters"], tiny["fidelity"]["report"]["eager_bf16"]
    assert control["median_rel_err"] > 1.5 * bound["median_rel_err"] + 2e-3
    assert all(tiny["features"][k] > 0 for k in FEATURES), tiny["features"]
    prefix, blocks = tiny["prefix"], 3 * ((256 - 1) // 16)  # 3 prompts of 256 tokens (tiny default), 16-token blocks
    for series in (prefix["base"], prefix["adapter"]):  # the adapter's cache entries are its own: misses first
        assert len(series["runs"]) == 3 and series["same_output"] is True
        counts = series["blocks_hit_on_misses"], series["blocks_hit_on_hits"], series["blocks_queried"]
        assert counts == (0, blocks, 2 * blocks), counts
    structured = tiny["waves"]["structured_json_b8"]
    assert structured["constrained_rows"] == 8 and structured["json"]["valid_prefix"] == 8
    assert tiny["waves"]["structured_half_adapters4_b8"]["distinct_adapters"] == 4
    assert tiny["dora"]["lora_wave_reused"] is True and tiny["dora"]["adapter_loads_in_first_wave"] == 8
    assert "wrote" in log
