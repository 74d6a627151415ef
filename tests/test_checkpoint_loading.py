"""Checkpoints load strictly: a tensor the model has no place for, or one it lacks, is an error naming it."""
from __future__ import annotations

import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from loraplex.runtime.base_model import load_base_model


def edited_checkpoint(tiny_model_dir, tmp_path, edit):
    out = tmp_path / "ckpt"
    shutil.copytree(tiny_model_dir, out)
    tensors = load_file(str(out / "model.safetensors"))
    edit(tensors)
    save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
    return out


def test_the_unedited_checkpoint_loads(tiny_model_dir):
    base = load_base_model(str(tiny_model_dir), dtype="float32", device="cpu")
    assert base.model.layers[0].mlp.gate_up_proj.base.bias is None


def test_mlp_biases_are_refused_by_name(tiny_model_dir, tmp_path):
    def add_mlp_biases(t):
        for name in ("gate_proj", "up_proj", "down_proj"):
            rows = t[f"model.layers.0.mlp.{name}.weight"].shape[0]
            t[f"model.layers.0.mlp.{name}.bias"] = torch.ones(rows)
    path = edited_checkpoint(tiny_model_dir, tmp_path, add_mlp_biases)
    with pytest.raises(SystemExit, match="does not use: model.layers.0.mlp.down_proj.bias, "
                                         "model.layers.0.mlp.gate_proj.bias, model.layers.0.mlp.up_proj.bias"):
        load_base_model(str(path), dtype="float32", device="cpu")


def test_attention_biases_a_llama_config_does_not_declare_are_refused(tiny_model_dir, tmp_path):
    def add_qkv_biases(t):
        for name in ("q_proj", "k_proj", "v_proj"):
            t[f"model.layers.1.self_attn.{name}.bias"] = torch.ones(t[f"model.layers.1.self_attn.{name}.weight"].shape[0])
    path = edited_checkpoint(tiny_model_dir, tmp_path, add_qkv_biases)
    with pytest.raises(SystemExit, match=r"does not use: model.layers.1.self_attn.k_proj.bias"):
        load_base_model(str(path), dtype="float32", device="cpu")


def test_a_stray_tensor_is_refused(tiny_model_dir, tmp_path):
    path = edited_checkpoint(tiny_model_dir, tmp_path, lambda t: t.update({"model.extra_scale": torch.ones(3)}))
    with pytest.raises(SystemExit, match=r"does not use: model.extra_scale"):
        load_base_model(str(path), dtype="float32", device="cpu")


def test_a_missing_tensor_is_named(tiny_model_dir, tmp_path):
    path = edited_checkpoint(tiny_model_dir, tmp_path, lambda t: t.pop("model.layers.1.post_attention_layernorm.weight"))
    with pytest.raises(SystemExit, match=r"missing tensors: layers.1.post_attention_layernorm.weight"):
        load_base_model(str(path), dtype="float32", device="cpu")


def test_half_of_a_fused_projection_is_named(tiny_model_dir, tmp_path):
    path = edited_checkpoint(tiny_model_dir, tmp_path, lambda t: t.pop("model.layers.0.mlp.up_proj.weight"))
    with pytest.raises(SystemExit, match=r"lacks \['layers.0.mlp.up_proj.weight'\]"):
        load_base_model(str(path), dtype="float32", device="cpu")
