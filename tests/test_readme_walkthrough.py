"""The README walk-through runs as written: make data, train, upload, query the adapter, the base model
and a mix, against a real server on loopback; client commands print no httpx log lines."""
from __future__ import annotations

import json
import re
import shutil
import subprocess
import time

from conftest import REPO, ServerProcess

README_URL = "http://127.0.0.1:8000"
MAX_SECONDS_PER_COMMAND = 240  # about 30 s in all on an idle 2-core CPU; head-room for a loaded one


def walkthrough_commands() -> list[str]:
    block = re.search(r"<!-- walkthrough -->\n```sh\n(.*?)```\n<!-- /walkthrough -->", (REPO / "README.md").read_text(), re.S)
    assert block, "README.md has no <!-- walkthrough --> block"
    return [line for line in block.group(1).splitlines() if line.strip()]


def test_readme_walkthrough_runs_as_written(tmp_path):
    commands = walkthrough_commands()
    assert all(README_URL in c for c in commands if "curl" in c or "adapters" in c)
    assert all('"max_tokens"' in c for c in commands if "curl" in c)
    shutil.copytree(REPO / "examples", tmp_path / "examples")  # "at the repository root", without writing into it
    server = ServerProcess(adapter_dir=tmp_path / "adapters", grpc_port=0)
    try:
        outputs = []
        for command in commands:
            start = time.monotonic()
            done = subprocess.run(["bash", "-c", command.replace(README_URL, server.url)], cwd=tmp_path,
                                  capture_output=True, text=True, timeout=MAX_SECONDS_PER_COMMAND)
            took = time.monotonic() - start
            assert done.returncode == 0, f"{command}\n{done.stdout[-2000:]}\n{done.stderr[-2000:]}"
            assert took < MAX_SECONDS_PER_COMMAND, f"{command} took {took:.0f} s"
            assert "HTTP Request:" not in done.stdout + done.stderr, f"httpx log noise from {command}"
            outputs.append(done.stdout)
    finally:
        server.stop()
    answers = [json.loads(out)["choices"][0]["message"]["content"] for out in outputs[-3:]]
    pirate, base, mix = answers
    assert pirate != base, answers  # the trained adapter changes the answer
    assert mix == pirate, answers  # 0.5 * delta + 0.5 * the same delta
