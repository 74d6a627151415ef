"""Upload-time validation: every config field honoured, harmless or refused by name; scales finite and
sane; patterns typed and evaluated in linear time; safetensors headers checked before parsing."""
from __future__ import annotations

import json
import struct
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from peft import LoraConfig
from safetensors.torch import save

from loraplex.runtime.adapters.peft_format import AdapterError, parse_adapter

from test_peft_format import SHAPE, saved


@pytest.fixture(scope="module")
def lora(tmp_path_factory):
    _, cfg, weights = saved(LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False),
                            tmp_path_factory.mktemp("lora"))
    return json.loads(cfg), weights


def parse(config: dict, weights: bytes):
    return parse_adapter(json.dumps(config).encode(), weights, SHAPE, 64)


def refused(config: dict, weights: bytes, message: str, status: int = 400):
    with pytest.raises(AdapterError, match=message) as e:
        parse(config, weights)
    assert e.value.status == status
    return e.value


@pytest.mark.parametrize("change, message", [
    ({"lora_alpha": float("nan")}, "lora_alpha must be a finite number"),
    ({"lora_alpha": float("inf")}, "lora_alpha must be a finite number"),
    ({"lora_alpha": 1e308}, "scale"),
    ({"lora_alpha": -1e6}, "scale"),
    ({"lora_alpha": True}, "lora_alpha"),
    ({"lora_alpha": "8"}, "lora_alpha"),
    ({"alpha_pattern": {"q_proj": float("nan")}}, r"alpha_pattern\['q_proj'\] must be a finite number"),
    ({"alpha_pattern": {"q_proj": 1e308}}, "scale"),
    ({"alpha_pattern": {"q_proj": "16"}}, "alpha_pattern"),
    ({"rank_pattern": {"v_proj": "4"}}, r"rank_pattern\['v_proj'\] must be a positive integer"),
    ({"rank_pattern": {"v_proj": 4.0}}, "rank_pattern"),
    ({"rank_pattern": {"v_proj": True}}, "rank_pattern"),
    ({"rank_pattern": {"v_proj": -4}}, "rank_pattern"),
    ({"rank_pattern": ["v_proj"]}, "rank_pattern must be an object"),
    ({"rank_pattern": {"(v_proj": 4}}, "malformed"),
    ({"alpha_pattern": {r"(q)\1_proj": 4}}, "backreferences"),
    ({"rank_pattern": {"": 4}}, "non-empty"),
    ({"layers_to_transform": "1"}, "layers_to_transform must be"),
    ({"layers_to_transform": [1.5]}, "layers_to_transform must be"),
    ({"layers_to_transform": [True]}, "layers_to_transform must be"),
    ({"target_modules": 3}, "target_modules must be"),
    ({"target_modules": "(q_proj"}, "malformed"),
    ({"use_rslora": "yes"}, "use_rslora"),
    ({"alora_invocation_tokens": [1, 2]}, "alora_invocation_tokens"),
    ({"layer_replication": [[0, 2]]}, "layer_replication"),
    ({"use_dora": True}, "use_dora"),
    ({"megatron_config": {"tensor_model_parallel_size": 2}}, "megatron_config"),
    ({"trainable_token_indices": [1, 2]}, "trainable_token_indices"),
    ({"target_parameters": ["mlp.experts"]}, "target_parameters"),
    ({"use_qalora": True}, "use_qalora"),
    ({"some_future_field": 1}, "unsupported field 'some_future_field'"),
])
def test_refused_configs_name_the_field(lora, change, message):
    config, weights = lora
    refused({**config, **change}, weights, message)


def test_off_fields_and_metadata_are_accepted(lora):
    config, weights = lora
    fine = {**config, "use_dora": False, "megatron_config": None, "layer_replication": None, "alora_invocation_tokens": None,
            "lora_dropout": 0.1, "init_lora_weights": "gaussian", "base_model_name_or_path": "x", "peft_version": "9",
            "rank_pattern": {}, "alpha_pattern": {"q_proj": 16}, "target_modules": r".*\.(q_proj|v_proj)",
            "layers_to_transform": [0, 1, 2]}
    adapter = parse(fine, weights)
    assert adapter.modules[(0, "q_proj")].scale == 4.0 and adapter.modules[(0, "v_proj")].scale == 2.0


def test_tensors_outside_the_configured_targets_are_refused(lora):
    config, weights = lora
    refused({**config, "target_modules": ["q_proj"]}, weights, "outside target_modules")
    refused({**config, "target_modules": "q_proj"}, weights, "outside target_modules")  # a fullmatch, like PEFT


def test_zero_and_negative_ranks_are_refused(lora):
    config, weights = lora
    for r in (0, -4, 4.0, True):
        with pytest.raises(AdapterError, match="r must be a positive integer"):
            parse({**config, "r": r}, weights)


def test_non_finite_weights_are_refused(lora):
    config, weights = lora
    tensors = {k: v.clone() for k, v in _load(weights).items()}
    first = sorted(tensors)[0]
    tensors[first][0, 0] = float("inf")
    with pytest.raises(AdapterError, match="NaN or infinite"):
        parse(config, save(tensors))


def _load(raw):
    from safetensors.torch import load
    return load(raw)


CATASTROPHIC = [r"(.*.*)*X", r"(x+x+)+y", r"(a+)+$", r"(\w|\.)*X"]  # minutes each on Python's re (no GIL release)

_PATTERN_PROBE = """
import json, sys, time
from loraplex.runtime.adapters.peft_format import AdapterError, parse_adapter
sys.path.insert(0, "tests")
from test_peft_format import SHAPE
config, weights = json.loads(sys.argv[1]), open(sys.argv[2], "rb").read()
for field in ("rank_pattern", "alpha_pattern", "target_modules"):
    for pattern in json.loads(sys.argv[3]):
        started = time.monotonic()
        try:
            adapter = parse_adapter(json.dumps({**config, field: pattern if field == "target_modules" else {pattern: 2}})
                                    .encode(), weights, SHAPE, 64)
            outcome = adapter.modules[(0, "q_proj")].scale
        except AdapterError as e:
            outcome = e.message
        print(json.dumps([field, pattern, time.monotonic() - started, outcome]), flush=True)
"""


def test_catastrophic_patterns_run_in_linear_time(lora, tmp_path):
    """Each pattern from an upload is evaluated in well under a second. In a child process with a
    deadline: Python's re never releases the GIL, so a regression would hang this test in-process."""
    config, weights = lora
    (tmp_path / "w.safetensors").write_bytes(weights)
    done = subprocess.run([sys.executable, "-c", _PATTERN_PROBE, json.dumps(config), str(tmp_path / "w.safetensors"),
                           json.dumps(CATASTROPHIC)], capture_output=True, text=True, timeout=60,
                          cwd=Path(__file__).resolve().parents[1])
    results = [json.loads(line) for line in done.stdout.splitlines() if line.startswith("[")]
    assert len(results) == 3 * len(CATASTROPHIC), done.stderr[-2000:]
    for field, pattern, seconds, outcome in results:
        assert seconds < 0.5, (field, pattern, seconds)
        # none of them matches a module: the default scale applies / the tensors are outside target_modules
        if field == "target_modules":
            assert "outside target_modules" in outcome
        else:
            assert outcome == 2.0, (field, pattern, outcome)


def _with_header(weights: bytes, edit) -> bytes:
    (n,) = struct.unpack("<Q", weights[:8])
    header = json.loads(weights[8:8 + n])
    edit(header)
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    return struct.pack("<Q", len(raw)) + raw + weights[8 + n:]


def _first(header):
    return header[sorted(k for k in header if k != "__metadata__")[0]]


@pytest.mark.parametrize("edit, message", [
    (lambda h: _first(h).update(data_offsets=["0", "64"]), "malformed data_offsets"),
    (lambda h: _first(h).update(data_offsets=[0.0, 64.0]), "malformed data_offsets"),
    (lambda h: _first(h).update(data_offsets=[-8, 64]), "malformed data_offsets"),
    (lambda h: _first(h).update(data_offsets=[0]), "malformed data_offsets"),
    (lambda h: _first(h).update(data_offsets=[0, 1 << 62]), "past the end"),
    (lambda h: _first(h).update(shape=["4", 32]), "malformed shape"),
    (lambda h: _first(h).update(shape=[4, 31]), "needs"),
])
def test_malformed_safetensors_headers_are_refused(lora, edit, message):
    config, weights = lora
    refused(config, _with_header(weights, edit), message)


def test_valid_header_rewrite_still_parses(lora):
    config, weights = lora
    assert parse(config, _with_header(weights, lambda h: None)).modules
    assert torch.equal(_load(_with_header(weights, lambda h: None))[sorted(_load(weights))[0]],
                       _load(weights)[sorted(_load(weights))[0]])


def _overlap(header):
    names = sorted(k for k in header if k != "__metadata__" and k.endswith("lora_A.weight"))
    header[names[1]]["data_offsets"] = list(header[names[0]]["data_offsets"])  # same shape, same bytes


def test_tensors_must_tile_the_data(lora):
    """Tensors sharing bytes (or leaving a gap) are refused, as safetensors' own loader refused them before the
    weights were read as views of the upload."""
    config, weights = lora
    refused(config, _with_header(weights, _overlap), "must not overlap or leave gaps")
    refused(config, weights + b"\0" * 8, "cover")
