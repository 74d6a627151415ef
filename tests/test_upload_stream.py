"""Streamed uploads (issue #20): the weights go into the store's temporary directory as they arrive, a refusal
comes as soon as the bytes that earn it are in (not after the body), and a refused or abandoned upload leaves
nothing behind; gRPC ListAdapters pages like the HTTP lists."""
from __future__ import annotations

import hashlib
import json
import socket
import struct
import sys
import threading
import time
from pathlib import Path

import grpc
import httpx
import pytest
import torch
from safetensors.torch import save

from loraplex.protos.loraplex.v1 import serving_pb2 as pb
from loraplex.protos.loraplex.v1 import serving_pb2_grpc as pb_grpc
from loraplex.runtime.adapters.store import AdapterStore
from service_fixtures import LiveServer, make_service

LIMIT = 1 << 20  # --max-adapter-mb of this server: 1 MiB
BOUNDARY = b"upload-boundary"


@pytest.fixture(scope="module")
def live(tiny_model_dir, tmp_path_factory):
    store = tmp_path_factory.mktemp("upload-stream") / "adapters"
    server = LiveServer(make_service(tiny_model_dir, store, max_adapter_bytes=LIMIT))
    server.store = store
    yield server
    server.stop()


def tiny_lora(rank: int = 2, seed: int = 0) -> tuple[bytes, bytes]:
    """A LoRA on q_proj of the tiny model (hidden 64, 2 layers)."""
    g = torch.Generator().manual_seed(seed)
    tensors = {}
    for layer in range(2):
        prefix = f"base_model.model.model.layers.{layer}.self_attn.q_proj"
        tensors[f"{prefix}.lora_A.weight"] = torch.randn(rank, 64, generator=g) * 0.1
        tensors[f"{prefix}.lora_B.weight"] = torch.randn(64, rank, generator=g) * 0.1
    config = {"peft_type": "LORA", "r": rank, "lora_alpha": 2 * rank, "target_modules": ["q_proj"]}
    return json.dumps(config).encode(), save(tensors)


def entries(store: Path) -> list[str]:
    while True:
        try:
            return sorted(str(p.relative_to(store)) for p in store.rglob("*"))
        except FileNotFoundError:  # the server removed a temporary directory while it was listed: list again
            continue


def part(name: str, value: bytes, filename: str | None = None) -> bytes:
    disposition = f'form-data; name="{name}"' + (f'; filename="{filename}"' if filename else "")
    return b"--" + BOUNDARY + b"\r\nContent-Disposition: " + disposition.encode() + b"\r\n\r\n" + value + b"\r\n"


def weights_head(size: int) -> bytes:
    """The start of a well-formed safetensors file of one fp32 tensor of `size` bytes (its data not included)."""
    header = json.dumps({"base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight":
                         {"dtype": "F32", "shape": [size // 4], "data_offsets": [0, size]}}).encode()
    header += b" " * (-len(header) % 8)
    return struct.pack("<Q", len(header)) + header


def send_partial(port: int, body_start: bytes, content_length: int) -> socket.socket:
    """A POST /v1/adapters whose Content-Length announces more than is sent: the rest never comes."""
    sock = socket.create_connection(("127.0.0.1", port))
    sock.sendall(b"POST /v1/adapters HTTP/1.1\r\nhost: x\r\ncontent-type: multipart/form-data; boundary=" + BOUNDARY +
                 b"\r\ncontent-length: " + str(content_length).encode() + b"\r\n\r\n" + body_start)
    return sock


def answer(sock: socket.socket, seconds: float = 10) -> tuple[int, str]:
    sock.settimeout(seconds)
    data = b""
    try:
        while b"\r\n\r\n" not in data or not data.rstrip().endswith(b"}"):
            chunk = sock.recv(65536)
            if not chunk:
                break
            data += chunk
    except socket.timeout:
        pytest.fail(f"no answer within {seconds} s while the body was still incomplete: {data[:200]!r}")
    head, _, body = data.partition(b"\r\n\r\n")
    return int(head.split()[1]), body.decode()


@pytest.mark.parametrize("case", ["bad header", "pickle", "over the size limit"])
def test_http_upload_refused_mid_body_leaves_nothing(live, case):
    """The refusal arrives while most of the announced body is still unsent, and the store is as before,
    no temporary directory included."""
    config, _ = tiny_lora()
    before = entries(live.store)
    start = part("id", b"mid-body") + part("config", config, "adapter_config.json")
    start += b"--" + BOUNDARY + b'\r\nContent-Disposition: form-data; name="weights"; filename="w.safetensors"\r\n\r\n'
    if case == "bad header":
        start += struct.pack("<Q", 1 << 40) + b"\0" * 4096
        status, fragment = 400, "not a safetensors file"
    elif case == "pickle":
        start += b"\x80\x04" + b"\0" * 4096
        status, fragment = 400, "pickle"
    else:
        start += weights_head(2 * LIMIT) + b"\0" * (LIMIT + (64 << 10))
        status, fragment = 413, "limit"
    sock = send_partial(live.port, start, LIMIT + (900 << 10))  # within the upload limit + its form slack
    try:
        code, body = answer(sock)
    finally:
        sock.close()
    assert code == status and fragment in json.loads(body)["error"]["message"], body
    assert entries(live.store) == before


def test_http_client_gone_mid_body_leaves_nothing(live):
    """The weights go into a temporary directory of the store as they arrive; a client that leaves mid-body
    takes it with it, and the next upload of the id succeeds."""
    config, weights = tiny_lora(rank=8)
    before = entries(live.store)
    body = part("id", b"gone") + part("config", config, "adapter_config.json") + part("weights", weights, "w.st")
    body += b"--" + BOUNDARY + b"--\r\n"
    sock = send_partial(live.port, body[:len(body) // 2], len(body))
    deadline = time.time() + 10
    while not list(live.store.glob(".tmp-*")) and time.time() < deadline:
        time.sleep(0.01)
    assert list(live.store.glob(".tmp-*")), "the weights did not reach the store while the body streamed in"
    sock.close()
    deadline = time.time() + 10
    while entries(live.store) != before and time.time() < deadline:
        time.sleep(0.05)
    assert entries(live.store) == before
    r = httpx.post(f"{live.url}/v1/adapters", content=body,
                   headers={"content-type": f"multipart/form-data; boundary={BOUNDARY.decode()}"})
    assert r.status_code == 201, r.text
    assert httpx.delete(f"{live.url}/v1/adapters/gone").status_code == 200


def test_http_form_in_any_order_and_checked(live):
    """The weights may come before the config (the digest's pieces do not depend on it): the stored digest is
    right, so a restart verifies it. A field given twice, missing or unknown is a 400 naming it."""
    config, weights = tiny_lora(seed=3)
    content_type = {"content-type": f"multipart/form-data; boundary={BOUNDARY.decode()}"}
    end = b"--" + BOUNDARY + b"--\r\n"
    body = part("weights", weights, "w.safetensors") + part("config", config, "adapter_config.json") + part("id", b"late")
    r = httpx.post(f"{live.url}/v1/adapters", content=body + end, headers=content_type)
    assert r.status_code == 201, r.text
    fresh = AdapterStore(live.store)  # a fresh open: read() checks the stored digest against the files
    assert fresh.read("late", r.json()["version"]) == (config, weights)
    twice = part("id", b"x") + part("id", b"y") + part("config", config, "c") + part("weights", weights, "w")
    r = httpx.post(f"{live.url}/v1/adapters", content=twice + end, headers=content_type)
    assert r.status_code == 400 and "id: give it once" in r.json()["error"]["message"]
    r = httpx.post(f"{live.url}/v1/adapters", content=part("id", b"x") + part("config", config, "c") + end,
                   headers=content_type)
    assert r.status_code == 400 and "weights: Field required" in r.json()["error"]["message"]
    extra = part("id", b"x") + part("rank", b"8") + part("config", config, "c") + part("weights", weights, "w")
    r = httpx.post(f"{live.url}/v1/adapters", content=extra + end, headers=content_type)
    assert r.status_code == 400 and "rank: unknown form field" in r.json()["error"]["message"]
    r = httpx.post(f"{live.url}/v1/adapters", content=b"{}", headers={"content-type": "application/json"})
    assert r.status_code == 400 and "multipart/form-data" in r.json()["error"]["message"]
    assert not list(live.store.glob(".tmp-*"))
    assert httpx.delete(f"{live.url}/v1/adapters/late").status_code == 200


def test_http_weights_shorter_than_their_header_says(live):
    """The weights pass the multipart reader unsearched for the length their safetensors header gives: a file
    cut short is refused by that length, before its bytes (Content-Length), or as truncated when a chunked body
    ends inside them, having swallowed the closing boundary (or by the parse, when the boundary came in the
    header's chunk)."""
    config, _ = tiny_lora()
    body = part("id", b"short") + part("config", config, "c") + part("weights", weights_head(40960) + b"\0" * 100, "w")
    body += b"--" + BOUNDARY + b"--\r\n"
    content_type = {"content-type": f"multipart/form-data; boundary={BOUNDARY.decode()}"}
    r = httpx.post(f"{live.url}/v1/adapters", content=body, headers=content_type)
    assert r.status_code == 400 and "header describes 41104 bytes, more than the" in r.text, r.text
    weights_at = body.index(b"\0" * 100)
    r = httpx.post(f"{live.url}/v1/adapters", content=iter([body[:weights_at], body[weights_at:]]),
                   headers=content_type)  # (chunked: no length)
    assert r.status_code == 400 and "adapter_model.safetensors is truncated" in r.text, r.text
    assert not list(live.store.glob(".tmp-*"))


def test_grpc_upload_refused_mid_body_leaves_nothing(live):
    """A bad safetensors header in the first chunk ends the call while the client still holds the rest back."""
    config, _ = tiny_lora()
    before = entries(live.store)
    release, sent_all = threading.Event(), []

    def requests():
        meta = pb.UploadAdapterMetadata(id="grpc-mid", config_json=config, size_bytes=LIMIT, sha256="0" * 64)
        yield pb.UploadAdapterRequest(metadata=meta)
        yield pb.UploadAdapterRequest(chunk=struct.pack("<Q", 1 << 40) + b"\0" * 4096)
        release.wait(20)
        sent_all.append(True)
        yield pb.UploadAdapterRequest(chunk=b"\0" * (LIMIT - 4104))

    with grpc.insecure_channel(live.grpc_target) as channel:
        stub = pb_grpc.AdaptersStub(channel)
        try:
            with pytest.raises(grpc.RpcError) as e:
                stub.UploadAdapter(requests(), timeout=30)
            assert not sent_all, "the refusal waited for the whole stream"
        finally:
            release.set()
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "safetensors" in e.value.details()
    deadline = time.time() + 10
    while entries(live.store) != before and time.time() < deadline:
        time.sleep(0.05)
    assert entries(live.store) == before


def test_grpc_upload_and_list_pages(live):
    """Uploads over gRPC commit; ListAdapters pages with limit/after like the HTTP lists, with no gap or repeat."""
    with grpc.insecure_channel(live.grpc_target) as channel:
        stub = pb_grpc.AdaptersStub(channel)
        for i in range(5):
            config, weights = tiny_lora(seed=i)
            meta = pb.UploadAdapterMetadata(id=f"page-{i}", config_json=config, size_bytes=len(weights),
                                            sha256=hashlib.sha256(weights).hexdigest())
            chunks = [pb.UploadAdapterRequest(chunk=weights[j:j + 1000]) for j in range(0, len(weights), 1000)]
            assert stub.UploadAdapter(iter([pb.UploadAdapterRequest(metadata=meta)] + chunks), timeout=30).version == 1
        everything = [a.id for a in stub.ListAdapters(pb.ListAdaptersRequest(), timeout=30).adapters]
        seen, after = [], None
        while True:
            page = stub.ListAdapters(pb.ListAdaptersRequest(limit=2, after=after), timeout=30)
            assert len(page.adapters) <= 2
            seen += [a.id for a in page.adapters]
            if page.adapters:
                assert (page.first_id, page.last_id) == (page.adapters[0].id, page.adapters[-1].id)
            if not page.has_more:
                break
            after = page.last_id
        assert seen == everything and {f"page-{i}" for i in range(5)} <= set(seen)
        for bad in (pb.ListAdaptersRequest(limit=0), pb.ListAdaptersRequest(limit=1001),
                    pb.ListAdaptersRequest(limit=1, after="")):
            with pytest.raises(grpc.RpcError) as e:
                stub.ListAdapters(bad, timeout=30)
            assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        for i in range(5):
            stub.DeleteAdapter(pb.DeleteAdapterRequest(id=f"page-{i}"), timeout=30)


def test_an_upload_is_packed_for_loading_from_before_its_answer(live, monkeypatch):
    """The packing a first request would pay (pinned memory in the kernels' layout on a GPU) starts on a
    worker once the upload's weights are validated, before its commit, for the weights then cached."""
    packed = []
    prepare = live.service.engine.prepare_adapter
    monkeypatch.setattr(live.service.engine, "prepare_adapter", lambda ref: (prepare(ref), packed.append(ref)))
    config, weights = tiny_lora(seed=5)
    files = {"config": ("adapter_config.json", config), "weights": ("adapter_model.safetensors", weights)}
    r = httpx.post(f"{live.url}/v1/adapters", data={"id": "packed-early"}, files=files)
    assert r.status_code == 201, r.text
    deadline = time.time() + 10
    while not packed and time.time() < deadline:
        time.sleep(0.02)
    assert [ref.id for ref in packed] == ["packed-early"]
    assert packed[0].weights is live.service.registry.cached(live.service.registry.get("packed-early"))
    assert httpx.delete(f"{live.url}/v1/adapters/packed-early").status_code == 200


def test_received_bytes_are_the_parse_buffer_and_only_the_upload_is_kept(tmp_path):
    """IncomingWeights keeps the weights in one buffer (what the parse views), byte for byte the file it syncs;
    a capacity far above the upload (no Content-Length: the size limit) is given back when the upload ends."""
    import asyncio

    from loraplex.runtime.adapters.incoming import IncomingWeights
    from loraplex.runtime.adapters.digest import adapter_digest

    config_raw, weights_raw = tiny_lora(rank=4, seed=3)
    store = AdapterStore(tmp_path / "store")

    async def receive():
        incoming = IncomingWeights(store, max_bytes=256 << 20)
        for i in range(0, len(weights_raw), 1000):
            await incoming.write(memoryview(weights_raw)[i:i + 1000])
        staged = await incoming.finish(config_raw)
        return incoming, staged
    incoming, staged = asyncio.run(receive())
    try:
        assert bytes(incoming.data) == weights_raw == (staged.path / "adapter_model.safetensors").read_bytes()
        assert len(incoming._buffer) == len(weights_raw)  # not 256 MB of reserved addresses per kept adapter
        assert staged.digest == adapter_digest(config_raw, weights_raw)
        assert not incoming.data.readonly  # the parse keeps views of it (owned=True)
    finally:
        incoming.release()


@pytest.mark.parametrize("refuse_direct", [False, True])
@pytest.mark.parametrize("declared", [False, True])
def test_weights_file_is_written_whole_with_or_without_direct_io(tmp_path, monkeypatch, refuse_direct, declared):
    """Blocks go out with O_DIRECT where the filesystem takes it (aligned prefix, then a padded tail cut to size);
    a filesystem that opens O_DIRECT but refuses the writes (EINVAL) gets page-cache writes from then on. Either
    way the file is the upload byte for byte, of its own length, with the capacity exact (a declared size) or not."""
    import asyncio
    import errno
    import os

    from safetensors.torch import save

    from loraplex.runtime.adapters import incoming as incoming_module
    from loraplex.runtime.adapters.digest import adapter_digest

    config_raw = json.dumps({"peft_type": "LORA", "r": 4, "target_modules": ["q_proj"]}).encode()
    weights_raw = save({"w": torch.arange(2_300_001, dtype=torch.float32)})  # 9.2 MB: 2 blocks and a tail
    assert len(weights_raw) % incoming_module.DIRECT_ALIGN
    real_pwrite, refused = os.pwrite, []

    def pwrite(fd, data, offset):
        if refuse_direct and os.O_DIRECT & incoming_module.fcntl.fcntl(fd, incoming_module.fcntl.F_GETFL):
            refused.append(offset)
            raise OSError(errno.EINVAL, "Invalid argument")
        return real_pwrite(fd, data, offset)
    monkeypatch.setattr(incoming_module.os, "pwrite", pwrite)
    store = AdapterStore(tmp_path / "store")

    async def receive():
        incoming = incoming_module.IncomingWeights(store, 256 << 20, len(weights_raw) if declared else None)
        for i in range(0, len(weights_raw), 65536):
            await incoming.write(memoryview(weights_raw)[i:i + 65536])
        return incoming, await incoming.finish(config_raw)
    incoming, staged = asyncio.run(receive())
    try:
        assert (staged.path / "adapter_model.safetensors").read_bytes() == weights_raw
        assert bytes(incoming.data) == weights_raw and staged.digest == adapter_digest(config_raw, weights_raw)
        if refuse_direct:  # the writes under way when the first was refused, then page-cache writes
            assert not incoming._direct
            assert 1 <= len(refused) <= incoming_module.BLOCK_BYTES // incoming_module.WRITE_PIECE_BYTES + 1
    finally:
        incoming.release()


def test_a_failed_write_ends_the_upload_and_leaves_nothing(tmp_path, monkeypatch):
    """The file's pieces are written on other threads while bytes arrive: a write that fails (a full disk) ends
    the upload with its error before the last byte, and discard() removes everything once the writes are over."""
    import asyncio
    import errno
    import os

    from loraplex.runtime.adapters import incoming as incoming_module

    real_pwrite = os.pwrite

    def pwrite(fd, data, offset):
        if offset >= incoming_module.WRITE_PIECE_BYTES:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_pwrite(fd, data, offset)
    monkeypatch.setattr(incoming_module.os, "pwrite", pwrite)
    store = AdapterStore(tmp_path / "store")
    chunk = bytes(8) + bytes(1 << 20)  # a header length of 0 would be refused: any bytes past the first 8 do

    async def receive():
        incoming = incoming_module.IncomingWeights(store, 256 << 20, 64 << 20)
        with pytest.raises(OSError, match="No space"):
            for _ in range(64):
                await incoming.write(b'\x02\x00\x00\x00\x00\x00\x00\x00{}' if incoming.size == 0 else chunk)
            await incoming.finish(b"{}")
        assert incoming.size < 60 << 20  # refused while bytes were still arriving
        await incoming.discard()
        return incoming
    incoming = asyncio.run(receive())
    assert not incoming.path.exists() and not list((tmp_path / "store").rglob("adapter_model.safetensors"))


def test_a_cancelled_upload_is_removed_only_after_its_block_is_written(tmp_path, monkeypatch):
    """A client gone mid-upload cancels the task that waits on a block being copied: the block goes on in its
    thread, and discard() closes the file and removes the directory only once it is done (the thread never writes
    to a closed, perhaps reused, file descriptor; nothing stays behind)."""
    import asyncio

    from loraplex.runtime.adapters import incoming as incoming_module

    store = AdapterStore(tmp_path / "store")
    seen = []
    real_copy = incoming_module.IncomingWeights._copy_and_write

    def slow_copy(self, block):
        time.sleep(0.3)
        real_copy(self, block)
        seen.append((self._fd is not None, self.path.exists()))
    monkeypatch.setattr(incoming_module.IncomingWeights, "_copy_and_write", slow_copy)
    chunk = bytes(incoming_module.BLOCK_BYTES)

    async def receive():
        incoming = incoming_module.IncomingWeights(store, 256 << 20, 64 << 20)
        await incoming.write(b'\x02\x00\x00\x00\x00\x00\x00\x00{}' + chunk)  # a first block, being copied

        async def client():
            await incoming.write(chunk)  # waits on the first block
        task = asyncio.ensure_future(client())
        await asyncio.sleep(0.05)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        await incoming.discard()
        return incoming
    incoming = asyncio.run(receive())
    assert seen and all(open_ and there for open_, there in seen), seen
    assert not incoming.path.exists() and not list((tmp_path / "store").rglob("adapter_model.safetensors"))


@pytest.mark.skipif(sys.platform != "linux", reason="mincore through libc")
def test_prefault_gives_exactly_its_pages_and_keeps_what_they_hold():
    """buffers.prefault (libc's madvise through ctypes, which lets the GIL go) makes [start, stop) resident and
    nothing else, keeps bytes already written, and does nothing on a closed buffer."""
    import ctypes
    import ctypes.util
    import mmap
    from loraplex.runtime.adapters.buffers import MADV_POPULATE_WRITE, prefault
    libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
    libc.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p]
    page = mmap.PAGESIZE
    buffer = mmap.mmap(-1, 64 * page)
    buffer.madvise(mmap.MADV_NOHUGEPAGE) if hasattr(mmap, "MADV_NOHUGEPAGE") else None
    buffer[3 * page:3 * page + 5] = b"hello"
    base = ctypes.addressof(ctypes.c_char.from_buffer(buffer))

    def resident() -> list[int]:
        flags = (ctypes.c_ubyte * 64)()
        assert libc.mincore(base, 64 * page, flags) == 0, ctypes.get_errno()
        return [i for i in range(64) if flags[i] & 1]

    assert resident() == [3]
    prefault(buffer, 8 * page, 24 * page)
    if MADV_POPULATE_WRITE is not None and resident() != [3]:  # (a kernel before 5.14 refuses: nothing done)
        assert resident() == [3] + list(range(8, 24))
    prefault(buffer, 0, 8 * page)
    assert bytes(buffer[3 * page:3 * page + 5]) == b"hello"
    prefault(buffer, 60 * page, 70 * page)  # past the end: nothing
    del base
    buffer.close()
    prefault(buffer, 0, page)  # closed: nothing
