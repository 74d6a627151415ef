"""Training data: JSONL rows → token ids with loss labels → length-grouped, deterministic batches.

Rows are `{"prompt": ..., "completion": ...}` or `{"messages": [{"role", "content"}, ...]}` (rendered
with the tokenizer's chat template). Loss is taken on completion / assistant tokens only.
"""
from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path

import torch

IGNORE = -100
ROLES = {"system", "user", "assistant", "tool", "developer"}


class DataError(ValueError):
    pass


@dataclass
class Example:
    input_ids: list[int]
    labels: list[int]  # IGNORE where no loss is taken

    @property
    def num_loss_tokens(self) -> int:
        return sum(1 for t in self.labels if t != IGNORE)


def _ids(tokenizer, text: str, special: bool) -> list[int]:
    return tokenizer(text, add_special_tokens=special)["input_ids"]


def _prompt_completion(tokenizer, row: dict) -> Example:
    prompt = _ids(tokenizer, row["prompt"], True)
    completion = _ids(tokenizer, row["completion"], False)
    if tokenizer.eos_token_id is not None:
        completion.append(tokenizer.eos_token_id)
    return Example(prompt + completion, [IGNORE] * len(prompt) + completion)


def _render(tokenizer, messages, generation_prompt: bool) -> list[int]:
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt)
    return _ids(tokenizer, text, False)


def _chat(tokenizer, messages: list[dict]) -> Example:
    ids = _render(tokenizer, messages, False)
    labels = [IGNORE] * len(ids)
    for i, m in enumerate(messages):
        if m["role"] == "assistant":
            start = len(_render(tokenizer, messages[:i], True))
            end = len(_render(tokenizer, messages[:i + 1], False))
            labels[start:end] = ids[start:end]
    return Example(ids, labels)


def _check_row(row) -> str | None:
    """What is wrong with a row, or None."""
    if not isinstance(row, dict):
        return "a row must be a JSON object"
    if "messages" in row:
        msgs = row["messages"]
        if not isinstance(msgs, list) or not msgs:
            return "'messages' must be a non-empty list"
        for m in msgs:
            if not isinstance(m, dict) or m.get("role") not in ROLES or not isinstance(m.get("content"), str):
                return "each message needs a 'role' (system/user/assistant/tool) and a string 'content'"
        if not any(m["role"] == "assistant" for m in msgs):
            return "'messages' has no assistant message to learn from"
        return None
    if isinstance(row.get("prompt"), str) and isinstance(row.get("completion"), str):
        return None if row["completion"] else "'completion' is empty"
    return "expected {\"prompt\": str, \"completion\": str} or {\"messages\": [...]}"


def load_jsonl(path: str | Path, tokenizer, max_length: int, skip_bad_rows: bool = False) -> tuple[list[Example], int]:
    """Examples of a JSONL file and the number of rows skipped; a bad row raises DataError naming
    file and line unless skip_bad_rows."""
    examples, skipped = [], 0
    path = Path(path)
    if not path.exists():
        raise DataError(f"{path}: no such file")
    with open(path, encoding="utf-8") as f:
        for line_no, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
                problem = _check_row(row)
            except json.JSONDecodeError as e:
                problem = f"invalid JSON ({e.msg})"
            if problem is None:
                example = _chat(tokenizer, row["messages"]) if "messages" in row else _prompt_completion(tokenizer, row)
                example = Example(example.input_ids[:max_length], example.labels[:max_length])
                if example.num_loss_tokens == 0:
                    problem = f"no completion tokens left within --max-length {max_length}"
            if problem is not None:
                if not skip_bad_rows:
                    raise DataError(f"{path}:{line_no}: {problem} (use --skip-bad-rows to skip such rows)")
                skipped += 1
                continue
            examples.append(example)
    if not examples:
        raise DataError(f"{path}: no usable rows")
    return examples, skipped


def split_validation(examples: list[Example], fraction: float, seed: int) -> tuple[list[Example], list[Example]]:
    """Carve a validation split out of the training rows (at least one row each side)."""
    if len(examples) < 2:
        raise DataError("need at least 2 rows to carve a validation split; pass --val")
    order = list(range(len(examples)))
    random.Random(seed).shuffle(order)
    n_val = min(max(1, round(len(examples) * fraction)), len(examples) - 1)
    return [examples[i] for i in order[n_val:]], [examples[i] for i in order[:n_val]]


class BatchStream:
    """Batch i of the whole run, a pure function of (seed, i): resuming at step s replays exactly.

    Each epoch shuffles with its own seed, groups rows of similar length (less padding), and
    shuffles the batch order again so long and short batches interleave.
    """

    def __init__(self, examples: list[Example], batch_size: int, seed: int):
        self.examples = examples
        self.batch_size = batch_size
        self.seed = seed
        self.batches_per_epoch = -(-len(examples) // batch_size)
        self._epoch_cache: dict[int, list[list[int]]] = {}

    def _epoch(self, epoch: int) -> list[list[int]]:
        if epoch not in self._epoch_cache:
            rng = random.Random(self.seed * 1_000_003 + epoch)
            order = list(range(len(self.examples)))
            rng.shuffle(order)
            group = self.batch_size * 32
            grouped = []
            for g in range(0, len(order), group):
                grouped += sorted(order[g:g + group], key=lambda i: len(self.examples[i].input_ids))
            batches = [grouped[b:b + self.batch_size] for b in range(0, len(grouped), self.batch_size)]
            rng.shuffle(batches)
            self._epoch_cache = {epoch: batches}
        return self._epoch_cache[epoch]

    def batch(self, index: int) -> list[Example]:
        epoch, i = divmod(index, self.batches_per_epoch)
        return [self.examples[j] for j in self._epoch(epoch)[i]]


def collate(examples: list[Example], pad_id: int, device) -> dict[str, torch.Tensor]:
    width = max(len(e.input_ids) for e in examples)
    ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    labels = torch.full((len(examples), width), IGNORE, dtype=torch.long)
    mask = torch.zeros((len(examples), width), dtype=torch.long)
    for row, e in enumerate(examples):
        n = len(e.input_ids)
        ids[row, :n] = torch.tensor(e.input_ids)
        labels[row, :n] = torch.tensor(e.labels)
        mask[row, :n] = 1
    return {"input_ids": ids.to(device), "attention_mask": mask.to(device), "labels": labels.to(device)}
