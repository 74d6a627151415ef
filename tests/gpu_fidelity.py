"""Teacher-forced comparison of two engine configurations on the same base model (GPU tests and
bench/profile_step.py): every configuration is fed the same tokens, so the logits of every step are
comparable even where a near-tie would make free-running greedy outputs part ways."""
from __future__ import annotations

import torch

import loraplex.runtime.engine as engine_module
from loraplex.runtime import nf4_linear
from loraplex.runtime.engine import Engine, EngineConfig


def forced_logits(base, requests, forced: dict[tuple, list[int]] | None, *, fast: bool, merge_policy: str = "off",
                  paged: bool | None = None, graphs: bool | None = None, fused: bool | None = None,
                  triton: bool | None = None, merge_format: str = "auto", layer_ops: bool | None = None):
    """{(prompt, step): logits row} and the tokens fed, running requests twice in one engine (the
    first pass builds merged weights and captures graphs). forced: {prompt: tokens} to feed; None =
    greedy (the tokens chosen are returned for the other runs)."""
    paged, graphs = fast if paged is None else paged, fast if graphs is None else graphs
    fused, triton = fast if fused is None else fused, fast if triton is None else triton
    layer_ops = fast if layer_ops is None else layer_ops
    saved = dict(nf4_linear.DISPATCH)
    if not fused:  # bitsandbytes' own matmul at every row count
        for m in base.model.modules():
            if isinstance(m, nf4_linear.NF4Linear):
                nf4_linear.DISPATCH[(m.out_features, m.in_features)] = frozenset()
    engine = Engine(base, EngineConfig(kv_cache_tokens=16384, cuda_graphs=graphs,
                                       adapter_ops="triton" if triton else "torch", merge_policy=merge_policy,
                                       merge_format=merge_format))
    engine.runner.paged = paged
    engine.runner.fused_layer_ops = layer_ops
    engine.merger.patience, engine.merger.min_rows = 1, 1
    logits, chosen = {}, {}
    real_sample = engine_module.sample

    def sample(step_logits, seqs, *rest):
        tokens = real_sample(step_logits, seqs, *rest)
        for row, seq in enumerate(seqs):
            key = tuple(seq.prompt_token_ids)
            i = seq.num_completion_tokens
            logits[(key, i)] = step_logits[row].float().cpu()
            if forced is not None:
                tokens[row] = forced[key][i]
            chosen.setdefault(key, []).append(tokens[row])
        return tokens

    engine_module.sample = sample
    try:
        engine.generate(requests)
        engine.merger.wait()
        logits.clear()
        chosen.clear()
        engine.generate(requests)
    finally:
        engine_module.sample = real_sample
        nf4_linear.DISPATCH.clear()
        nf4_linear.DISPATCH.update(saved)
    return logits, chosen, engine


def compare(a: dict, b: dict) -> dict:
    """Relative logit error per step (median, max) and how often the argmax agrees."""
    keys = sorted(set(a) & set(b), key=lambda k: (k[1], k[0]))
    errs = torch.tensor([float((a[k] - b[k]).norm() / b[k].norm()) for k in keys])
    agree = sum(int(a[k].argmax() == b[k].argmax()) for k in keys)
    return {"steps": len(keys), "median_rel_err": float(errs.median()), "max_rel_err": float(errs.max()),
            "argmax_agreement": agree / len(keys)}
