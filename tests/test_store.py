"""The adapter store and registry: atomic versions, restart, delete, ids, in-flight versions."""
from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import save

from loraplex.runtime.adapters.peft_format import AdapterError, BaseShape
from loraplex.runtime.adapters.registry import AdapterRegistry
from loraplex.runtime.adapters.store import AdapterStore

SHAPE = BaseShape(2, {"q_proj": (16, 16), "k_proj": (16, 8), "v_proj": (16, 8), "o_proj": (16, 16),
                      "gate_proj": (16, 32), "up_proj": (16, 32), "down_proj": (32, 16)})


def lora_files(rank=4, scale=1.0):
    cfg = {"peft_type": "LORA", "r": rank, "lora_alpha": 8, "target_modules": ["q_proj"]}
    w = {f"base_model.model.model.layers.{i}.self_attn.q_proj.lora_A.weight": torch.randn(rank, 16) * scale for i in range(2)}
    w |= {f"base_model.model.model.layers.{i}.self_attn.q_proj.lora_B.weight": torch.randn(16, rank) * scale for i in range(2)}
    return json.dumps(cfg).encode(), save(w)


def test_versions_survive_restart_and_replace(tmp_path):
    reg = AdapterRegistry(AdapterStore(tmp_path), SHAPE)
    assert reg.upload("a", *lora_files()).version == 1
    old = reg.resolve("a")
    assert reg.upload("a", *lora_files(rank=2)).version == 2
    assert old.version == 1 and old.weights.rank == 4  # in-flight requests keep their version's weights
    reg2 = AdapterRegistry(AdapterStore(tmp_path), SHAPE)  # a restart
    [rec] = reg2.list()
    assert (rec.id, rec.version, rec.rank) == ("a", 2, 2)
    assert reg2.resolve("a").weights.rank == 2
    assert sorted(p.name for p in (tmp_path / "a").iterdir()) == ["CURRENT", "v2"]


def test_delete_then_reupload_never_reuses_a_version(tmp_path):
    reg = AdapterRegistry(AdapterStore(tmp_path), SHAPE)
    reg.upload("a", *lora_files())
    held = reg.resolve("a")
    reg.delete("a")
    with pytest.raises(AdapterError) as e:
        reg.resolve("a")
    assert e.value.status == 404
    assert reg.upload("a", *lora_files()).version == 2
    assert held.key == ("a", 1) and held.weights.modules
    with pytest.raises(AdapterError):
        reg.delete("missing")


def test_failed_commit_leaves_nothing(tmp_path, monkeypatch):
    store = AdapterStore(tmp_path)
    reg = AdapterRegistry(store, SHAPE)
    reg.upload("a", *lora_files())
    import loraplex.runtime.adapters.store as store_mod

    def boom(*a, **k):
        raise OSError("disk full")
    monkeypatch.setattr(store_mod, "_fsync_dir", boom)
    with pytest.raises(OSError):
        reg.upload("a", *lora_files(rank=2))
    monkeypatch.undo()
    assert [(r.id, r.version) for r in store.list()] == [("a", 1)]
    assert not list(tmp_path.glob(".tmp-*"))
    assert AdapterStore(tmp_path).list()[0].version == 1



def test_a_refused_upload_leaves_no_staged_files(tmp_path):
    """Files are staged on a worker thread while the weights are validated: a refusal removes them."""
    import time
    store = AdapterStore(tmp_path)
    reg = AdapterRegistry(store, SHAPE)
    cfg, _ = lora_files()
    bad = save({f"base_model.model.model.layers.{i}.self_attn.q_proj.lora_{p}.weight": torch.full(shape, float("nan"))
                for i in range(2) for p, shape in (("A", (4, 16)), ("B", (16, 4)))})
    with pytest.raises(AdapterError, match="NaN"):
        reg.upload("a", cfg, bad)
    deadline = time.time() + 10
    while list(tmp_path.glob(".tmp-*")) and time.time() < deadline:
        time.sleep(0.01)
    assert not list(tmp_path.glob(".tmp-*")) and store.list() == []

@pytest.mark.parametrize("bad", ["../x", "a/b", "", ".hidden", "base", "x" * 200, "a b"])
def test_bad_ids(tmp_path, bad):
    reg = AdapterRegistry(AdapterStore(tmp_path), SHAPE)
    with pytest.raises(AdapterError) as e:
        reg.upload(bad, *lora_files())
    assert e.value.status == 400
    assert not any(p.name != ".tmp" for p in tmp_path.iterdir())


def test_start_fsyncs_no_adapter_folder_it_did_not_change(tmp_path, monkeypatch):
    """Start-up with many committed adapters costs one directory read, no fsync (issue #20); recovery on first
    touch syncs only a folder it changes (a leftover CURRENT.tmp)."""
    import loraplex.runtime.adapters.store as store_module
    store = AdapterStore(tmp_path)
    config_raw, weights_raw = lora_files()
    for i in range(20):
        store.commit(f"a{i}", config_raw, weights_raw, "LORA", 4)
    (tmp_path / "a3" / "CURRENT.tmp").write_text("{}")
    synced = []
    fsync_dir = store_module._fsync_dir
    monkeypatch.setattr(store_module, "_fsync_dir", lambda path: (synced.append(path), fsync_dir(path)))
    reopened = AdapterStore(tmp_path)
    assert synced == [] and (tmp_path / "a3" / "CURRENT.tmp").exists()
    assert len(reopened.list()) == 20 and not (tmp_path / "a3" / "CURRENT.tmp").exists()
    assert synced == [tmp_path / "a3"], synced


def test_weights_file_read_in_pieces_by_threads_is_the_file(tmp_path, monkeypatch):
    """read_weights_file reads a large file in pieces on several threads: every byte lands where it belongs, in
    fresh writable memory of the file's exact length."""
    import os

    from loraplex.runtime.adapters import buffers

    monkeypatch.setattr(buffers, "READ_PIECE_BYTES", 4096)
    path = tmp_path / "adapter_model.safetensors"
    data = os.urandom(25 * 4096 + 123)
    path.write_bytes(data)
    view = buffers.read_weights_file(path)
    assert bytes(view) == data and len(view) == len(data) and not view.readonly
    small = tmp_path / "small"
    small.write_bytes(b"x" * 10)
    assert bytes(buffers.read_weights_file(small)) == b"x" * 10


def test_digest_hashes_pieces_and_older_plain_sha256_digests_still_check(tmp_path):
    """The digest is a sha256 over the config and the sha256 of each 4 MiB piece of the weights (hashed in
    parallel); a CURRENT written before it, with a plain sha256 over both files, still reads, and still catches a
    damaged file."""
    import hashlib

    from loraplex.runtime.adapters.digest import DIGEST_PIECE_BYTES, adapter_digest
    from loraplex.runtime.adapters.store import CorruptAdapter

    config_raw, weights_raw = b'{"r": 4}', bytes(range(256)) * (DIGEST_PIECE_BYTES // 256 * 2 + 3)  # 2 pieces + 768 B
    pieces = [weights_raw[i:i + DIGEST_PIECE_BYTES] for i in range(0, len(weights_raw), DIGEST_PIECE_BYTES)]
    expected = hashlib.sha256(len(config_raw).to_bytes(8, "big") + config_raw
                              + b"".join(hashlib.sha256(p).digest() for p in pieces)).hexdigest()
    assert len(pieces) == 3 and adapter_digest(config_raw, weights_raw) == "sha256-4m:" + expected

    reg = AdapterRegistry(AdapterStore(tmp_path), SHAPE)
    reg.upload("a", *lora_files())
    current = json.loads((tmp_path / "a" / "CURRENT").read_text())
    assert current["sha256"].startswith("sha256-4m:")
    files = [(tmp_path / "a" / "v1" / name).read_bytes() for name in ("adapter_config.json", "adapter_model.safetensors")]
    plain = hashlib.sha256(len(files[0]).to_bytes(8, "big") + files[0] + files[1]).hexdigest()
    (tmp_path / "a" / "CURRENT").write_text(json.dumps({**current, "sha256": plain}))
    store = AdapterStore(tmp_path)
    assert store.read("a", 1)[0] == files[0]
    damaged = bytearray(files[1])
    damaged[-1] ^= 1
    (tmp_path / "a" / "v1" / "adapter_model.safetensors").write_bytes(bytes(damaged))
    with pytest.raises(CorruptAdapter):
        store.read("a", 1)
