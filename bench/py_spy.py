"""py-spy around a part of a benchmark, and the top of what it sampled.

    with recording(server_pid, Path("out/uploads.txt")): ...   # raw stacks of every thread of the server
    python bench/py_spy.py out/uploads.txt [--top 30]          # samples by thread, then by leaf frames

Nothing is recorded when the output path is None or py-spy is not installed (the device installs it from the
carried wheels: .whl/py_spy-*.whl)."""
from __future__ import annotations

import argparse
import collections
import contextlib
import shutil
import signal
import subprocess
import time
from pathlib import Path


@contextlib.contextmanager
def recording(pid: int, out: Path | None, rate: int = 200):
    """Every thread's stacks while active into `out`; beside it (`*.gil.txt`) only the thread holding the GIL,
    so that the two together show who runs Python while another thread waits for the GIL."""
    exe = shutil.which("py-spy") if out is not None else None
    if exe is None:
        yield
        return
    out.parent.mkdir(parents=True, exist_ok=True)
    spies = [subprocess.Popen([exe, "record", "-p", str(pid), "-r", str(rate), "--threads", "--nonblocking",
                               "-f", "raw", "-o", str(path)] + extra, stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL)
             for path, extra in ((out, []), (out.with_suffix(".gil.txt"), ["--gil"]))]
    time.sleep(0.5)  # attached before the work starts
    try:
        yield
    finally:
        for spy in spies:
            spy.send_signal(signal.SIGINT)  # (py-spy writes its file on SIGINT, not on SIGTERM)
        for spy in spies:
            try:
                spy.wait(30)
            except subprocess.TimeoutExpired:
                spy.kill()


def top(path: Path, count: int = 30, depth: int = 3) -> str:
    """Samples by thread, then by the last `depth` frames of each stack (active samples only: py-spy leaves
    idle threads out by default)."""
    threads, leaves = collections.Counter(), collections.Counter()
    for line in path.read_text(errors="replace").splitlines():
        stack, _, n = line.rpartition(" ")
        if not stack or not n.isdigit():
            continue
        frames = stack.split(";")
        thread = frames[0].split(": ", 1)[-1]
        threads[thread] += int(n)
        leaves[(thread, " < ".join(f.split(" (")[0] for f in reversed(frames[-depth:])))] += int(n)
    lines = [f"{path.name}: {sum(threads.values())} samples"]
    lines += [f"  {n:>6}  {thread}" for thread, n in threads.most_common(12)]
    lines += [f"  {n:>6}  {thread:<22} {leaf[:140]}" for (thread, leaf), n in leaves.most_common(count)]
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("files", nargs="+", type=Path)
    ap.add_argument("--top", type=int, default=30)
    ap.add_argument("--depth", type=int, default=3)
    args = ap.parse_args()
    for path in args.files:
        print(top(path, args.top, args.depth))


if __name__ == "__main__":
    main()
