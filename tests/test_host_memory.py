"""Host memory for adapters is bounded in bytes: one shared copy per version, LRU eviction of copies
no request holds, refusal (429) when requests in flight hold the whole budget, 413 at upload."""
from __future__ import annotations

import gc

import pytest

from loraplex.runtime.adapters.peft_format import AdapterError
from loraplex.runtime.adapters.registry import AdapterRegistry
from loraplex.runtime.adapters.store import AdapterStore

from test_store import SHAPE, lora_files

ADAPTER_BYTES = 2 * (4 * 16 + 16 * 4) * 4  # two layers of q_proj A [4, 16] and B [16, 4] in fp32


def registry(tmp_path, adapters: int, **kw) -> AdapterRegistry:
    return AdapterRegistry(AdapterStore(tmp_path), SHAPE, max_host_bytes=int(adapters * ADAPTER_BYTES), **kw)


def test_unpinned_copies_are_evicted_to_stay_within_bytes(tmp_path):
    reg = registry(tmp_path, 2.5)
    for name in "abcd":
        reg.upload(name, *lora_files())
        assert reg.host_bytes_used <= reg.max_host_bytes
    for name in "abcdabcd":
        assert reg.resolve(name).weights.nbytes == ADAPTER_BYTES  # the ref dies here: nothing stays pinned
        assert reg.host_bytes_used <= 2 * ADAPTER_BYTES
    assert reg.host_evictions >= 6


def test_requests_share_one_copy_even_after_its_eviction(tmp_path):
    reg = registry(tmp_path, 2.5, max_host_adapters=1)
    for name in "abc":
        reg.upload(name, *lora_files())
    held = reg.resolve("a")  # a waiting request holds version a/1
    reg.resolve("b")
    reg.resolve("c")  # the count cap evicts a from the cache; it stays in memory: held
    assert ("a", 1) not in reg._host
    again = reg.resolve("a")
    assert again.weights is held.weights  # not a second fp32 copy
    assert reg.host_bytes_used <= reg.max_host_bytes


def test_a_resolve_that_cannot_fit_is_refused_and_frees_nothing_held(tmp_path):
    reg = registry(tmp_path, 2.5)
    for name in "abc":
        reg.upload(name, *lora_files())
    held = [reg.resolve("a"), reg.resolve("b")]  # two requests in flight pin two copies
    with pytest.raises(AdapterError, match="host memory for adapters is full") as e:
        reg.resolve("c")
    assert e.value.status == 429
    del e  # its traceback holds the refused copy
    gc.collect()
    assert [h.weights.nbytes for h in held] == [ADAPTER_BYTES] * 2
    assert reg.host_bytes_used == 2 * ADAPTER_BYTES
    del held
    gc.collect()
    assert reg.resolve("c").version == 1  # the holders ended: their copies are evictable again


def test_an_adapter_larger_than_the_budget_is_refused_at_upload(tmp_path):
    reg = registry(tmp_path, 0.5)
    with pytest.raises(AdapterError, match="host memory") as e:
        reg.upload("big", *lora_files())
    assert e.value.status == 413
    assert reg.list() == [] and reg.host_bytes_used == 0


def test_default_budget_is_a_quarter_of_the_machine_at_least_4_gib(tmp_path, monkeypatch):
    from loraplex.runtime.adapters import registry as registry_module
    physical = {"SC_PHYS_PAGES": 64 << 18, "SC_PAGE_SIZE": 4096}  # 64 GiB
    monkeypatch.setattr(registry_module.os, "sysconf", lambda name: physical[name])
    assert registry_module.default_max_host_bytes() == 16 << 30
    physical["SC_PHYS_PAGES"] = 8 << 18  # 8 GiB: the floor
    assert registry_module.default_max_host_bytes() == 4 << 30
    assert AdapterRegistry.__init__.__kwdefaults__["max_host_bytes"] is None  # None: that default


def test_replaced_and_deleted_versions_leave_host_memory(tmp_path):
    """A replace or delete drops the superseded copies at once (no request can resolve them again), so
    churn does not fill the budget with dead versions; a request still holding one keeps it alive."""
    reg = registry(tmp_path, 100)
    reg.upload("a", *lora_files())
    held = reg.resolve("a")  # a request in flight on a/1
    for seed in range(1, 6):
        reg.upload("a", *lora_files(scale=1.0 + seed))
    assert list(reg._host) == [("a", 6)]
    assert reg.resolve("a").version == 6 and held.version == 1 and held.weights.nbytes == ADAPTER_BYTES
    del held
    gc.collect()
    assert reg.host_bytes_used == ADAPTER_BYTES
    reg.delete("a")
    gc.collect()
    assert not reg._host and reg.host_bytes_used == 0


def test_the_host_copy_keeps_the_files_dtype():
    """A bf16 file is held as bf16 (half an fp32 copy's bytes); consumers cast it up exactly."""
    import torch
    from safetensors.torch import load, save

    from loraplex.runtime.adapters.peft_format import parse_adapter

    cfg, raw = lora_files()
    tensors = {k: v.to(torch.bfloat16) for k, v in load(raw).items()}
    half = parse_adapter(cfg, save(tensors), SHAPE, 64)
    full = parse_adapter(cfg, save({k: v.float() for k, v in tensors.items()}), SHAPE, 64)
    assert half.nbytes * 2 == full.nbytes == ADAPTER_BYTES
    for key, m in half.modules.items():
        assert m.A.dtype == m.B.dtype == torch.bfloat16
        assert torch.equal(m.A.float(), full.modules[key].A) and torch.equal(m.B.float(), full.modules[key].B)


def test_the_engines_packed_copy_is_charged_with_the_weights(tmp_path):
    """The GPU kernels keep a packed (pinned) copy of every adapter they prepare beside its parsed weights: the
    budget charges it with the copy, so a cache of N adapters holds N x (parsed + packed) bytes at most."""
    reg = registry(tmp_path, 3.5, packed_bytes=lambda weights: weights.nbytes // 2)
    for name in "abcd":
        reg.upload(name, *lora_files())
        assert reg.host_bytes_used <= reg.max_host_bytes
    assert reg.host_bytes_used == 2 * (ADAPTER_BYTES + ADAPTER_BYTES // 2)  # a third would pass 3.5 x
    held = reg.resolve("a")
    gc.collect()
    assert reg.host_bytes_used <= reg.max_host_bytes and held.weights.nbytes == ADAPTER_BYTES
