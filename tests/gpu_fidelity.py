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
                  triton: bool | None = None, merge_format: str = "auto", layer_ops: bool | None = None,
                  fold_blocks: int | None = None):
    """{(prompt, step): logits row} and the tokens fed, running requests twice in one engine (the
    first pass builds merged weights and captures graphs). forced: {prompt: tokens} to feed; None =
    greedy (the tokens chosen are returned for the other runs). fold_blocks: the Triton ops' (kernels/lora_fold.py)."""
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
    if fold_blocks is not None:
        assert engine.ops.set_fold_blocks(fold_blocks) == fold_blocks
    engine.runner.fused_layer_ops = layer_ops
    engine.runner.drop_graphs()  # the start-up captures used the default layer kernels
    engine.merger.patience, engine.merger.min_rows, engine.merger.dwell_seconds = 1, 1, 0.0
    logits, chosen = {}, {}
    real_sample = engine_module.sample_on_device

    def sample(step_logits, seqs, *rest):
        tokens = real_sample(step_logits, seqs, *rest).tolist()
        for row, seq in enumerate(seqs):
            key = tuple(seq.prompt_token_ids)
            i = seq.num_completion_tokens
            logits[(key, i)] = step_logits[row].float().cpu()
            if forced is not None:
                tokens[row] = forced[key][i]
            chosen.setdefault(key, []).append(tokens[row])
        return torch.tensor(tokens, dtype=torch.int64, device=step_logits.device)

    engine_module.sample_on_device = sample
    try:
        engine.generate(requests)
        engine.merger.wait()
        logits.clear()
        chosen.clear()
        engine.generate(requests)
    finally:
        engine_module.sample_on_device = real_sample
        nf4_linear.DISPATCH.clear()
        nf4_linear.DISPATCH.update(saved)
    return logits, chosen, engine


def compare(a: dict, b: dict) -> dict:
    """Relative logit error per step (median, 95th percentile, max) and how often the argmax agrees."""
    keys = sorted(set(a) & set(b), key=lambda k: (k[1], k[0]))
    errs = torch.tensor([float((a[k] - b[k]).norm() / b[k].norm()) for k in keys])
    agree = sum(int(a[k].argmax() == b[k].argmax()) for k in keys)
    return {"steps": len(keys), "median_rel_err": float(errs.median()), "p95_rel_err": float(errs.quantile(0.95)),
            "max_rel_err": float(errs.max()), "argmax_agreement": agree / len(keys)}


def tie_tolerance(noisy: dict, truth: dict, quantile: float = 1.0, top: int = 5) -> float:
    """The error of `noisy` (e.g. eager bf16) against `truth` (fp32) at each step's `top` tokens, at this
    quantile over the steps (1.0: the largest): two tokens whose logits are closer are a tie at this precision."""
    errs = [float((noisy[k][idx] - truth[k][idx]).abs().max())
            for k in set(noisy) & set(truth) for idx in [truth[k].topk(top).indices]]
    return float(torch.tensor(errs).quantile(quantile))


def decisive_flips(got: dict, ref: dict, margin: float) -> list[tuple]:
    """Steps where ref's best token leads its runner-up by more than `margin` and got picks another."""
    flips = []
    for k in set(got) & set(ref):
        best = ref[k].topk(2)
        if float(best.values[0] - best.values[1]) > margin and int(got[k].argmax()) != int(best.indices[0]):
            flips.append(k)
    return flips


def free_running_splits(tokens: dict, ref_tokens: dict, ref_logits: dict) -> list[tuple]:
    """Where free-running greedy outputs part ways: for every prompt whose tokens differ from ref's,
    (prompt, step, ref's lead of its own token over the other one) at the first difference."""
    splits = []
    for key, ref_seq in ref_tokens.items():
        seq = tokens.get(key, [])
        step = next((i for i, (a, b) in enumerate(zip(seq, ref_seq)) if a != b), None)
        if step is None:
            continue
        row = ref_logits[(key, step)]
        splits.append((key, step, float(row[ref_seq[step]] - row[seq[step]])))
    return splits
