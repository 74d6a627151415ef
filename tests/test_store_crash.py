"""The adapter store after crashes: leftovers removed at start, orphans when a folder is first touched,
digests verified on every read, corrupt versions quarantined and never served; start-up reads no adapter; SIGKILL at random points of commits and deletes loses no
acknowledged upload; `kill -9` of a real server during 50 uploads serves nothing corrupt."""
from __future__ import annotations

import json
import os
import random
import signal
import threading
import time
from pathlib import Path

import httpx
import pytest
import torch
from safetensors.torch import save

from conftest import ServerProcess
from loraplex.runtime.adapters.peft_format import AdapterError, BaseShape
from loraplex.runtime.adapters.registry import AdapterRegistry
from loraplex.runtime.adapters.digest import adapter_digest
from loraplex.runtime.adapters.store import AdapterStore, CorruptAdapter

SHAPE = BaseShape(2, {"q_proj": (16, 16), "k_proj": (16, 8), "v_proj": (16, 8), "o_proj": (16, 16),
                      "gate_proj": (16, 32), "up_proj": (16, 32), "down_proj": (32, 16)})


def lora_files(layers=2, hidden=16, rank=2, seed=0) -> tuple[bytes, bytes]:
    g = torch.Generator().manual_seed(seed)
    cfg = {"peft_type": "LORA", "r": rank, "lora_alpha": 2 * rank, "target_modules": ["q_proj"]}
    prefix = "base_model.model.model.layers.{}.self_attn.q_proj"
    w = {f"{prefix.format(i)}.lora_A.weight": torch.randn(rank, hidden, generator=g) for i in range(layers)}
    w |= {f"{prefix.format(i)}.lora_B.weight": torch.randn(hidden, rank, generator=g) * 0.01 for i in range(layers)}
    return json.dumps(cfg).encode(), save(w)


def committed(store: AdapterStore, adapter_id: str, seed: int = 0):
    config_raw, weights_raw = lora_files(seed=seed)
    return store.commit(adapter_id, config_raw, weights_raw, "LORA", 2)


def assert_clean(root: Path) -> None:
    """Nothing but committed adapters: no temp entries, each adapter folder holds CURRENT and its version."""
    for entry in root.iterdir():
        assert not entry.name.startswith(".tmp-"), entry
        if entry.name == ".quarantine":
            continue
        current = json.loads((entry / "CURRENT").read_text())
        assert sorted(p.name for p in entry.iterdir()) == ["CURRENT", f"v{current['version']}"], entry
        d = entry / f"v{current['version']}"
        digest = adapter_digest((d / "adapter_config.json").read_bytes(), (d / "adapter_model.safetensors").read_bytes())
        assert digest == current["sha256"], entry


# -- start-up recovery ---------------------------------------------------------------------------

def test_orphan_version_from_a_crash_before_current_is_removed(tmp_path):
    store = AdapterStore(tmp_path)
    record = committed(store, "a")
    # a kill -9 between renaming v2 into place and replacing CURRENT
    (tmp_path / "a" / "v2").mkdir()
    (tmp_path / "a" / "v2" / "adapter_model.safetensors").write_bytes(b"x" * 4096)
    (tmp_path / "a" / "CURRENT.tmp").write_text("{")
    # a first upload of "b" that died at the same point, and an unfinished temp directory
    (tmp_path / "b" / "v1").mkdir(parents=True)
    (tmp_path / ".tmp-dead").mkdir()
    (tmp_path / ".tmp-dead" / "adapter_model.safetensors").write_bytes(b"y")
    restarted = AdapterStore(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a", "b"]  # start-up only removed the temp directory
    assert restarted.list() == [record] and restarted.quarantined == []  # list() touches every folder
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a"]
    assert_clean(tmp_path)
    assert committed(restarted, "a").version == 2


def test_start_reads_no_adapter_file(tmp_path, monkeypatch):
    """Start-up is one directory read (issue #20: 10,000 stored adapters must not slow it): no CURRENT is
    parsed and no weights are hashed until an adapter is asked for."""
    store = AdapterStore(tmp_path)
    for i in range(5):
        committed(store, f"a{i}", seed=i)
    opened = []
    real_read_bytes = Path.read_bytes
    monkeypatch.setattr(Path, "read_bytes", lambda self: opened.append(self.name) or real_read_bytes(self))
    restarted = AdapterStore(tmp_path)
    assert opened == []
    assert restarted.ids() == [f"a{i}" for i in range(5)] and opened == []
    assert restarted.get("a3").version == 1 and set(opened) == {"CURRENT"}  # no weights read


@pytest.mark.parametrize("damage", ["flip-a-byte", "truncate", "missing-weights", "missing-version", "bad-current"])
def test_corrupt_adapter_is_quarantined_on_first_use_and_never_served(tmp_path, damage):
    reg = AdapterRegistry(AdapterStore(tmp_path), SHAPE)
    reg.upload("good", *lora_files(seed=1))
    reg.upload("bad", *lora_files(seed=2))
    weights = tmp_path / "bad" / "v1" / "adapter_model.safetensors"
    if damage == "flip-a-byte":
        raw = bytearray(weights.read_bytes())
        raw[-3] ^= 0x01  # the header still parses: only the digest can tell
        weights.write_bytes(bytes(raw))
    elif damage == "truncate":
        weights.write_bytes(weights.read_bytes()[:-10])
    elif damage == "missing-weights":
        weights.unlink()
    elif damage == "missing-version":
        for f in weights.parent.iterdir():
            f.unlink()
        weights.parent.rmdir()
    else:
        (tmp_path / "bad" / "CURRENT").write_text('{"id": "bad", "version": "1"')
    store = AdapterStore(tmp_path)
    reg = AdapterRegistry(store, SHAPE)
    assert store.quarantined == []  # nothing read at start
    with pytest.raises(AdapterError) as e:
        reg.resolve("bad")  # its folder's recovery, or the digest check of its read
    assert e.value.status == 404
    assert [r.id for r in reg.list()] == ["good"]
    [q] = store.quarantined
    assert q.id == "bad" and q.version == (None if damage == "bad-current" else 1) and q.reason
    assert Path(q.path).parent == tmp_path / ".quarantine" and Path(q.path).is_dir()
    assert reg.resolve("good").version == 1
    assert_clean(tmp_path)
    again = AdapterStore(tmp_path)  # the quarantine is still reported after another restart
    assert [(x.id, x.version) for x in again.quarantined] == [(q.id, q.version)]
    expected_version = 1 if damage == "bad-current" else 2  # a quarantined version number is never reused
    assert committed(again, "bad").version == expected_version


def test_damage_after_start_is_caught_on_read_and_quarantined(tmp_path):
    store = AdapterStore(tmp_path)
    reg = AdapterRegistry(store, SHAPE)
    reg.upload("a", *lora_files())
    weights = tmp_path / "a" / "v1" / "adapter_model.safetensors"
    raw = bytearray(weights.read_bytes())
    raw[-1] ^= 0x40
    weights.write_bytes(bytes(raw))
    with pytest.raises(CorruptAdapter):
        store.read("a", 1)
    assert [q.id for q in store.quarantined] == ["a"] and store.list() == []
    reg2 = AdapterRegistry(store, SHAPE)  # an empty host cache: resolving must go through read()
    with pytest.raises(AdapterError) as e:
        reg2.resolve("a")
    assert e.value.status == 404


def test_a_store_written_before_digests_gets_them(tmp_path):
    store = AdapterStore(tmp_path)
    record = committed(store, "a")
    current = tmp_path / "a" / "CURRENT"
    legacy = json.loads(current.read_text())
    del legacy["sha256"]
    current.write_text(json.dumps(legacy))
    restarted = AdapterStore(tmp_path)
    assert restarted.list() == [record] and restarted.quarantined == []
    assert restarted.read("a", 1) == lora_files()


def test_a_failed_commit_after_the_rename_leaves_the_old_version(tmp_path, monkeypatch):
    store = AdapterStore(tmp_path)
    record = committed(store, "a")
    import loraplex.runtime.adapters.store as store_mod
    real_replace = os.replace

    def failing_replace(src, dst):
        if Path(dst).name == "CURRENT":
            raise OSError("disk full")
        real_replace(src, dst)
    monkeypatch.setattr(store_mod.os, "replace", failing_replace)
    with pytest.raises(OSError):
        committed(store, "a", seed=3)
    with pytest.raises(OSError):
        committed(store, "new", seed=4)
    monkeypatch.undo()
    assert store.list() == [record]
    assert_clean(tmp_path)


# -- SIGKILL at random points of a committing process ----------------------------------------------

def _commit_forever(root: Path, ack_fd: int, seed: int) -> None:
    """The child: recover the store, then commit and delete at random, logging before and after each."""
    rng = random.Random(seed)
    store = AdapterStore(root)
    n = 0
    while True:
        adapter_id = f"a{rng.randrange(4)}"
        if rng.random() < 0.15:
            os.write(ack_fd, f"B delete {adapter_id}\n".encode())
            store.delete(adapter_id)
            os.write(ack_fd, f"A delete {adapter_id}\n".encode())
            continue
        config_raw = json.dumps({"seed": seed, "n": n}).encode()
        weights_raw = rng.randbytes(rng.choice([100, 20_000, 400_000]))
        digest = adapter_digest(config_raw, weights_raw)
        os.write(ack_fd, f"B commit {adapter_id} {digest}\n".encode())
        record = store.commit(adapter_id, config_raw, weights_raw, "LORA", 1)
        os.write(ack_fd, f"A commit {adapter_id} {digest} {record.version}\n".encode())
        n += 1


def test_sigkill_during_commits_never_loses_or_corrupts(tmp_path):
    rng = random.Random(1234)
    expected: dict[str, tuple[str, int] | None] = {}  # id -> (digest, version) of the last acknowledged op
    acked_ops = kills_mid_commit = 0
    for iteration in range(400):  # at least 60 kills; more while a loaded machine lets fewer ops finish
        if iteration >= 60 and acked_ops > 30 and kills_mid_commit > 20:
            break
        r, w = os.pipe()
        pid = os.fork()
        if pid == 0:  # pragma: no cover - the child never returns
            try:
                os.close(r)
                _commit_forever(tmp_path, w, seed=iteration)
            finally:
                os._exit(1)
        os.close(w)
        time.sleep(rng.uniform(0.0, 0.08))
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
        with os.fdopen(r) as pipe:
            lines = pipe.read().splitlines()
        in_flight = None
        for line in lines:
            kind, op, adapter_id, *rest = line.split()
            if kind == "B":
                in_flight = (op, adapter_id, rest[0] if rest else None)
                continue
            in_flight = None
            acked_ops += 1
            expected[adapter_id] = (rest[0], int(rest[1])) if op == "commit" else None
        kills_mid_commit += in_flight is not None and in_flight[0] == "commit"

        store = AdapterStore(tmp_path)  # the restart
        actual = {r.id: (r.sha256, r.version) for r in store.list()}  # recovers every folder
        assert store.quarantined == [], store.quarantined
        assert_clean(tmp_path)
        for adapter_id in set(expected) | set(actual):
            allowed = [expected.get(adapter_id)]
            if in_flight is not None and in_flight[1] == adapter_id:
                allowed.append(None if in_flight[0] == "delete" else in_flight[2])
            got = actual.get(adapter_id)
            assert got in allowed or (got is not None and got[0] in allowed), (iteration, adapter_id, got, allowed)
            if got is not None:
                config_raw, weights_raw = store.read(adapter_id, got[1])
                assert adapter_digest(config_raw, weights_raw) == got[0]
            expected[adapter_id] = got
    assert acked_ops > 30 and kills_mid_commit > 20, (acked_ops, kills_mid_commit)  # kills landed inside commits


# -- kill -9 of a real server during 50 uploads ----------------------------------------------------

SERVER_ARGS = ("--dtype", "float32", "--kv-cache-tokens", "1024", "--max-num-seqs", "4")  # small: restarts dominate

def test_kill_9_of_the_server_during_uploads(tmp_path):
    store_dir = tmp_path / "adapters"
    rng = random.Random(7)
    uploads = 50
    kill_at = set(rng.sample(range(3, uploads), 5))
    files = [lora_files(layers=30, hidden=576, rank=1, seed=i) for i in range(uploads)]
    acked: dict[str, tuple[int, str]] = {}  # id -> (version, digest) of its last successful upload

    def check_served(server: ServerProcess) -> None:
        listed = {a["id"]: a["version"] for a in server.client.get("/v1/adapters").json()["data"]}
        for adapter_id, (version, _) in acked.items():
            assert listed.get(adapter_id, 0) >= version, (adapter_id, listed, version)
        for adapter_id in listed:
            current = json.loads((store_dir / adapter_id / "CURRENT").read_text())
            if acked.get(adapter_id, (None,))[0] == current["version"]:
                assert current["sha256"] == acked[adapter_id][1]
            r = server.client.post("/v1/completions", json={"model": adapter_id, "prompt": "Hi", "max_tokens": 1,
                                                            "temperature": 0})
            assert r.status_code == 200, r.text
        assert not (store_dir / ".quarantine").exists()
        assert_clean(store_dir)

    def upload(server: ServerProcess, i: int, outcome: list) -> None:
        adapter_id = f"crash-{i % 8}"
        try:
            r = server.client.post("/v1/adapters", data={"id": adapter_id},
                                   files={"config": ("adapter_config.json", files[i][0]),
                                          "weights": ("adapter_model.safetensors", files[i][1])})
        except httpx.TransportError:
            return
        assert r.status_code == 201, r.text
        outcome.append((adapter_id, r.json()["version"], adapter_digest(*files[i])))

    started = time.monotonic()
    server = ServerProcess(*SERVER_ARGS, adapter_dir=store_dir, grpc_port=0)
    try:
        for i in range(uploads):
            outcome: list = []
            if i in kill_at:
                t = threading.Thread(target=upload, args=(server, i, outcome))
                t.start()
                time.sleep(rng.uniform(0.0, 0.04))
                server.proc.send_signal(signal.SIGKILL)
                server.proc.wait()
                t.join(timeout=30)
                assert not t.is_alive()
            else:
                upload(server, i, outcome)
            for adapter_id, version, digest in outcome:
                acked[adapter_id] = (version, digest)
            if i in kill_at:
                server.client.close()
                server.log.close()
                server = ServerProcess(*SERVER_ARGS, adapter_dir=store_dir, grpc_port=0)
                check_served(server)
        check_served(server)
        assert len(acked) == 8
    finally:
        server.stop()
    assert time.monotonic() - started < 120


def test_health_reports_quarantined_adapters(tmp_path, tiny_model_dir):
    from service_fixtures import make_service
    store = AdapterStore(tmp_path / "adapters")
    committed(store, "damaged")
    weights = tmp_path / "adapters" / "damaged" / "v1" / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-10])
    service = make_service(tiny_model_dir, tmp_path / "adapters")
    try:
        assert service.health()["quarantined_adapters"] == []  # start-up reads no adapter
        with pytest.raises(AdapterError):
            service.registry.resolve("damaged")
        [q] = service.health()["quarantined_adapters"]
        assert q["id"] == "damaged" and q["version"] == 1 and q["reason"]
    finally:
        service.stop()
