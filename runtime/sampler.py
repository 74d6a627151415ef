"""Next-token choice per row: greedy, or temperature / top-k / top-p with a per-request seed."""
from __future__ import annotations

import torch

from .sequence import Sequence


def sample(logits: torch.Tensor, seqs: list[Sequence]) -> list[int]:
    logits = logits.float()
    chosen = logits.argmax(dim=-1).tolist()
    for row, seq in enumerate(seqs):
        p = seq.params
        if p.greedy:
            continue
        scores = logits[row] / p.temperature
        if p.top_k > 0 and p.top_k < scores.numel():
            kth = torch.topk(scores, p.top_k).values[-1]
            scores = scores.masked_fill(scores < kth, float("-inf"))
        if p.top_p < 1.0:
            sorted_scores, order = torch.sort(scores, descending=True)
            cumulative = sorted_scores.softmax(-1).cumsum(-1)
            drop = cumulative - sorted_scores.softmax(-1) >= p.top_p  # keep the smallest prefix reaching top_p
            scores = scores.scatter(0, order, sorted_scores.masked_fill(drop, float("-inf")))
        probs = scores.softmax(-1).cpu()
        chosen[row] = int(torch.multinomial(probs, 1, generator=seq.generator))
    return chosen
