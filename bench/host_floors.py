"""The host's floors for an adapter upload (issue #20): how fast this machine moves an upload's bytes through each
stage every upload goes through, one stream each. bench/adapter_scale.py --gpu records them beside its upload MB/s."""
from __future__ import annotations

import hashlib
import os
import socket
import threading
import time
from pathlib import Path

from loraplex.runtime.adapters.buffers import owned_buffer
from loraplex.runtime.adapters.incoming import DIRECT_ALIGN, open_for_direct_writes


def host_floors(payload: bytes, directory: Path) -> dict:
    """MB/s of what every upload byte goes through, one stream each, on this host: a loopback TCP socket (send +
    recv, Python), sha256 (the store's digest), and an O_DIRECT write + fsync of a file in `directory` (the store's
    filesystem; the 201 waits for it). An upload cannot beat the slowest of them."""
    mb = len(payload) / 1e6
    view = memoryview(payload)
    with socket.create_server(("127.0.0.1", 0)) as listener:  # TCP over loopback, as the uploads travel
        sender = socket.create_connection(listener.getsockname())
        receiver, _ = listener.accept()
    got = [0]

    def receive():
        while got[0] < len(payload):
            n = len(receiver.recv(256 << 10))
            if not n:
                break
            got[0] += n
    t = time.perf_counter()
    thread = threading.Thread(target=receive)
    thread.start()
    sender.sendall(view)
    thread.join()
    loopback = mb / (time.perf_counter() - t)
    sender.close()
    receiver.close()
    t = time.perf_counter()
    hashlib.sha256(view).hexdigest()
    digest = mb / (time.perf_counter() - t)
    aligned = len(payload) - len(payload) % DIRECT_ALIGN
    buffer = owned_buffer(aligned)  # page-aligned, as the upload's own buffer
    buffer[:aligned] = view[:aligned]
    path = directory / ".floor-write"
    path.unlink(missing_ok=True)
    fd, direct = open_for_direct_writes(path)
    try:
        t = time.perf_counter()
        for start in range(0, aligned, 4 << 20):
            os.pwrite(fd, memoryview(buffer)[start:min(start + (4 << 20), aligned)], start)
        os.fsync(fd)
        disk = aligned / 1e6 / (time.perf_counter() - t)
    finally:
        os.close(fd)
        path.unlink(missing_ok=True)
    return {"loopback_tcp": round(loopback), "sha256": round(digest), "disk_write_fsync": round(disk),
            "disk_o_direct": direct}
