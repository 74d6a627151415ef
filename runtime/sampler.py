"""Next-token choice for a whole batch at once, on the logits' device, with one device→host copy.

Greedy rows (temperature 0) take the argmax. The others sample with the Gumbel-max trick:
argmax((logits - rowmax) / T + g) where g = -log(-log u) and u is a counter-based hash of
(row's seed, tokens the row generated so far, vocabulary index). The noise therefore depends on
nothing else in the batch nor on the device: a seeded request gives the same tokens wherever it
runs and whoever it runs with. Working from logits minus the row's max keeps a tiny temperature
finite (it degenerates to the argmax). A row with NaN/inf logits gets the id -1.

Before the choice, rows that ask for them get, in this order: the repetition penalty (HF/vLLM:
over prompt + generated tokens, a seen token's logit is divided by it when positive and multiplied
by it otherwise), OpenAI's frequency and presence penalties (over the generated tokens:
logit - frequency * count - presence * [count > 0]), logit_bias (added), and, while a row has
generated fewer than min_tokens, -inf on its end-of-sequence and stop_token_ids; last, a row with a
response_format grammar gets -inf on every token its matcher does not allow (structured.py). Each
is one batched tensor op over the rows that use it, so rows of any mix share the step; with no
such row a step pays nothing for it.

`token_logprobs` reports, as vLLM does by default, the log-softmax of the model's raw logits
(before penalties, bias, masks, temperature and top-k/top-p).
"""
from __future__ import annotations

import torch

from .sequence import Sequence, TokenLogprob
from .structured import allowed_tokens, apply_allowed

MASK32 = 0xFFFFFFFF
# Multipliers of a 32-bit xorshift-multiply mix (Wellons' lowbias32). Stored as signed values in
# (-2^31, 2^31) with the same low 32 bits, so that x * m for x < 2^32 never overflows int64.
MIX_1 = 0x7FEB352D
MIX_2 = 0x846CA68B - (1 << 32)
WEYL = 0x9E3779B9 - (1 << 32)  # golden-ratio step that spreads the vocabulary index over 32 bits


def mix32(x: torch.Tensor) -> torch.Tensor:
    """A 32-bit integer hash of int64 values in [0, 2^32) (two xorshift-multiply rounds)."""
    x = x ^ (x >> 16)
    x = (x * MIX_1) & MASK32
    x = x ^ (x >> 15)
    x = (x * MIX_2) & MASK32
    return x ^ (x >> 16)


def gumbel_noise(seed_lo: torch.Tensor, seed_hi: torch.Tensor, position: torch.Tensor, vocab: int) -> torch.Tensor:
    """[R, vocab] float32 Gumbel noise, a pure function of (seed, position, vocabulary index) per row."""
    row_key = mix32(mix32(mix32(seed_lo) ^ seed_hi) ^ position)  # [R]
    spread = (torch.arange(vocab, dtype=torch.int64, device=row_key.device) * WEYL) & MASK32  # [V]
    bits = mix32((row_key[:, None] + spread[None, :]) & MASK32)
    # 23 bits plus a half are exact in float32: u lies in [2^-24, 1 - 2^-24], so both logs are finite.
    u = ((bits >> 9).float() + 0.5) * (1.0 / (1 << 23))
    return -torch.log(-torch.log(u))


def _row_parameters(seqs: list[Sequence], vocab: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row (temperature, top_p) float32 and (top_k, seed_lo, seed_hi, position) int64 on `device`.
    A temperature below float32's range becomes 0 (greedy: the limit of a vanishing temperature)."""
    floats = [(s.params.temperature, s.params.top_p) for s in seqs]
    ints = [(min(s.params.top_k, vocab), s.seed & MASK32, (s.seed >> 32) & MASK32, s.num_completion_tokens) for s in seqs]
    pin = device.type == "cuda"
    host_floats = torch.tensor(floats, dtype=torch.float32, pin_memory=pin)
    host_ints = torch.tensor(ints, dtype=torch.int64, pin_memory=pin)
    return host_floats.to(device, non_blocking=True), host_ints.to(device, non_blocking=True)


def _keep_threshold(scaled: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor,
                    max_k: int, use_top_p: bool) -> torch.Tensor:
    """[R, 1] smallest scaled logit each row keeps after top-k then top-p (ties at the edge stay in)."""
    vocab = scaled.shape[1]
    k = torch.where(top_k > 0, top_k.clamp(max=vocab), vocab)
    if not use_top_p:
        kth = torch.topk(scaled, max_k, dim=1).values.gather(1, (k.clamp(max=max_k) - 1)[:, None])
        return torch.where((top_k > 0)[:, None], kth, float("-inf"))
    ordered = scaled.sort(dim=1, descending=True).values
    if max_k > 0:
        positions = torch.arange(vocab, device=scaled.device)
        ordered = ordered.masked_fill(positions[None, :] >= k[:, None], float("-inf"))
    probs = ordered.softmax(dim=1)
    mass_before = probs.cumsum(dim=1) - probs
    kept = (mass_before < top_p[:, None]).sum(dim=1)  # the smallest prefix whose mass reaches top_p
    kept = torch.where(top_p >= 1.0, vocab, kept)
    kept = torch.minimum(kept, k).clamp(min=1)
    return ordered.gather(1, (kept - 1)[:, None])


def _padded(rows: list[list[int]], pad: int, device: torch.device) -> torch.Tensor:
    """[R, longest] int64 of the rows' token ids, padded with `pad`."""
    width = max(1, max(len(r) for r in rows))
    host = torch.full((len(rows), width), pad, dtype=torch.int64)
    for i, r in enumerate(rows):
        host[i, :len(r)] = torch.tensor(r, dtype=torch.int64)
    return host.to(device, non_blocking=True)


def _apply_penalties(logits: torch.Tensor, seqs: list[Sequence]) -> torch.Tensor:
    rows = [i for i, s in enumerate(seqs) if s.params.penalized]
    if not rows:
        return logits
    device, vocab = logits.device, logits.shape[1]
    index = torch.tensor(rows, device=device)
    part = logits[index]
    params = [seqs[i].params for i in rows]
    per_row = torch.tensor([(p.repetition_penalty, p.frequency_penalty, p.presence_penalty) for p in params],
                           dtype=torch.float32).to(device)
    repetition, frequency, presence = per_row[:, 0:1], per_row[:, 1:2], per_row[:, 2:3]
    if any(p.repetition_penalty != 1.0 for p in params):  # the padding id `vocab` lands in a dropped column
        seen = torch.zeros(len(rows), vocab + 1, dtype=torch.bool, device=device)
        seen.scatter_(1, _padded([seqs[i].token_ids for i in rows], vocab, device), True)
        penalized = torch.where(part > 0, part / repetition, part * repetition)
        part = torch.where(seen[:, :vocab], penalized, part)
    if any(p.frequency_penalty != 0.0 or p.presence_penalty != 0.0 for p in params):
        generated = _padded([seqs[i].generated_ids for i in rows], vocab, device)
        counts = torch.zeros(len(rows), vocab + 1, dtype=torch.float32, device=device)
        counts.scatter_add_(1, generated, torch.ones_like(generated, dtype=torch.float32))
        counts = counts[:, :vocab]
        part = part - frequency * counts - presence * (counts > 0).float()
    return logits.index_copy(0, index, part)


def _apply_bias_and_masks(logits: torch.Tensor, seqs: list[Sequence]) -> torch.Tensor:
    bias_rows, bias_cols, bias_values, mask_rows, mask_cols = [], [], [], [], []
    for i, s in enumerate(seqs):
        for token, bias in s.params.logit_bias.items():
            bias_rows.append(i)
            bias_cols.append(token)
            bias_values.append(float(bias))
        if s.num_completion_tokens < s.params.min_tokens:
            masked = set(s.params.stop_token_ids) | (set() if s.params.ignore_eos else set(s.eos_token_ids))
            mask_rows += [i] * len(masked)
            mask_cols += sorted(masked)
    if not bias_rows and not mask_rows:
        return logits
    logits = logits.clone()
    device = logits.device
    if bias_rows:
        logits.index_put_((torch.tensor(bias_rows, device=device), torch.tensor(bias_cols, device=device)),
                          torch.tensor(bias_values, device=device), accumulate=True)
    if mask_rows:
        logits[torch.tensor(mask_rows, device=device), torch.tensor(mask_cols, device=device)] = float("-inf")
    return logits


def grammar_bitmask(seqs: list[Sequence], vocab_size: int) -> torch.Tensor | None:
    """The host bitmask of the next tokens each grammar row allows (rows with a matcher, in order), or
    None when no row has one. The engine calls this right after launching a step, so the CPU fills it
    while the GPU computes the logits."""
    matchers = [s.matcher for s in seqs if s.matcher is not None]
    return allowed_tokens(matchers, vocab_size) if matchers else None


def _apply_grammars(logits: torch.Tensor, seqs: list[Sequence], bitmask: torch.Tensor | None = None) -> torch.Tensor:
    """Rows with a grammar matcher keep only the tokens it allows next; the others are untouched.
    bitmask: grammar_bitmask(seqs) when already filled."""
    rows = [i for i, s in enumerate(seqs) if s.matcher is not None]
    if not rows:
        return logits
    if bitmask is None:
        bitmask = grammar_bitmask(seqs, logits.shape[1])
    index = torch.tensor(rows, device=logits.device)
    part = logits[index]  # a copy: the raw logits stay as they were for token_logprobs
    apply_allowed(part, bitmask)
    return logits.index_copy(0, index, part)


def process_logits(logits: torch.Tensor, seqs: list[Sequence], bitmask: torch.Tensor | None = None) -> torch.Tensor:
    """Float32 logits after each row's penalties, logit_bias, min_tokens mask and grammar (the module docstring)."""
    return _apply_grammars(_apply_bias_and_masks(_apply_penalties(logits.float(), seqs), seqs), seqs, bitmask)


def token_logprobs(logits: torch.Tensor, seqs: list[Sequence], tokens: list[int]) -> list[TokenLogprob | None]:
    """Per row: log-softmax of the raw `logits` at the chosen token and the row's top `params.logprobs`
    alternatives; None for rows that did not ask for logprobs or whose token is -1 (non-finite row)."""
    wanted = [i for i, s in enumerate(seqs) if s.params.logprobs is not None and tokens[i] >= 0]
    result: list[TokenLogprob | None] = [None] * len(seqs)
    if not wanted:
        return result
    device = logits.device
    index = torch.tensor(wanted, device=device)
    logprobs = torch.log_softmax(logits[index].float(), dim=1)
    chosen = logprobs.gather(1, torch.tensor([tokens[i] for i in wanted], device=device)[:, None])[:, 0]
    top_n = max(seqs[i].params.logprobs for i in wanted)
    top = torch.topk(logprobs, top_n, dim=1) if top_n > 0 else None
    chosen_host = chosen.tolist()
    top_values, top_ids = (top.values.tolist(), top.indices.tolist()) if top is not None else ([], [])
    for row, i in enumerate(wanted):
        n = seqs[i].params.logprobs
        alternatives = list(zip(top_ids[row][:n], top_values[row][:n])) if n else []
        result[i] = TokenLogprob(tokens[i], chosen_host[row], alternatives)
    return result


def sample(logits: torch.Tensor, seqs: list[Sequence], bitmask: torch.Tensor | None = None) -> list[int]:
    """One token id per row of `logits` [R, V] (row i belongs to seqs[i]); -1 where the row is not finite.
    bitmask: grammar_bitmask(seqs), when the caller filled it already."""
    return sample_on_device(logits, seqs, bitmask).tolist()


def sample_on_device(logits: torch.Tensor, seqs: list[Sequence], bitmask: torch.Tensor | None = None) -> torch.Tensor:
    """`sample`'s token ids as a tensor on the logits' device: launched, not waited for."""
    finite = torch.isfinite(logits).all(dim=1)
    logits = process_logits(logits, seqs, bitmask)
    sampled_params = [s.params for s in seqs if not s.params.greedy]
    if not sampled_params:
        chosen = logits.argmax(dim=1)
    else:
        vocab = logits.shape[1]
        max_k = min(max(p.top_k for p in sampled_params), vocab)
        use_top_p = any(p.top_p < 1.0 for p in sampled_params)
        floats, ints = _row_parameters(seqs, vocab, logits.device)
        temperature, top_p = floats[:, 0], floats[:, 1]
        top_k, seed_lo, seed_hi, position = ints.unbind(dim=1)
        greedy = temperature == 0.0
        safe_temperature = torch.where(greedy, 1.0, temperature)
        scaled = (logits - logits.amax(dim=1, keepdim=True)) / safe_temperature[:, None]
        if max_k > 0 or use_top_p:
            scaled = scaled.masked_fill(scaled < _keep_threshold(scaled, top_k, top_p, max_k, use_top_p),
                                        float("-inf"))
        drawn = (scaled + gumbel_noise(seed_lo, seed_hi, position, vocab)).argmax(dim=1)
        chosen = torch.where(greedy, logits.argmax(dim=1), drawn) if len(sampled_params) < len(seqs) else drawn
    return torch.where(finite, chosen, -1)
