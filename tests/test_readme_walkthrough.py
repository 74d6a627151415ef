"""README.md's examples and walk-through run as written, in order, against one real server on loopback
started with default flags: every command exits 0 and answers no error JSON; the walk-through's stated
outcome holds (the trained adapter talks like a pirate, the base model does not, the mix equals the
adapter); everything it writes is ignored by git; and `loraplex serve` (start and stop) and `loraplex
train` print no warning or leak line beyond the one deliberate notice (open mode without API keys)."""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import REPO, ServerProcess

README_URLS = ("http://127.0.0.1:8000", "localhost:8000")
README_GRPC_TARGET = "127.0.0.1:50051"
MAX_SECONDS_PER_COMMAND = 240  # about 40 s in all on an idle 2-core CPU; head-room for a loaded one
OPEN_MODE_NOTICE = "open mode"


def readme_block(marker: str, lang: str = "sh") -> str:
    block = re.search(rf"<!-- {marker} -->\n```{lang}\n(.*?)```\n<!-- /{marker} -->", (REPO / "README.md").read_text(), re.S)
    assert block, f"README.md has no <!-- {marker} --> block"
    return block.group(1)


def shell_commands(block: str) -> list[str]:
    """The block's commands: continuation lines joined, comments and blank lines dropped."""
    joined = re.sub(r"\\\n\s*", "", block)
    return [line for line in joined.splitlines() if line.strip() and not line.lstrip().startswith("#")]


def noise(text: str) -> list[str]:
    """Lines a quiet command must not print: warnings, leak reports, tracebacks, errors."""
    bad = re.compile(r"warn|leak|traceback|error|deprecat", re.I)
    return [line for line in text.splitlines() if bad.search(line) and OPEN_MODE_NOTICE not in line]


def error_answers(output: str) -> list:
    """Error JSON in a command's output: a whole JSON answer, or server-sent events."""
    try:
        answers = [json.loads(output)]
    except ValueError:
        answers = [json.loads(line[len("data: "):]) for line in output.splitlines()
                   if line.startswith("data: ") and line != "data: [DONE]"]
        assert answers, f"neither JSON nor server-sent events: {output[:500]}"
    return [a for a in answers if isinstance(a, dict) and "error" in a]


def stream_text(output: str) -> str:
    return "".join(json.loads(line[len("data: "):])["choices"][0]["delta"].get("content") or ""
                   for line in output.splitlines() if line.startswith("data: {"))


@pytest.fixture(scope="module")
def readme(tmp_path_factory):
    """(a copy of the repository root's examples/ to run in, a server with default flags and output)."""
    root = tmp_path_factory.mktemp("checkout")
    shutil.copytree(REPO / "examples", root / "examples")  # "at the repository root", without writing into it
    server = ServerProcess(adapter_dir=tmp_path_factory.mktemp("server") / "adapters", log_level=None)
    yield root, server
    server.stop()


def run(command: str, root: Path, server: ServerProcess) -> subprocess.CompletedProcess:
    for url in README_URLS:
        command = command.replace(url, server.url)
    start = time.monotonic()
    done = subprocess.run(["bash", "-c", command], cwd=root, capture_output=True, text=True,
                          timeout=MAX_SECONDS_PER_COMMAND, env={**os.environ, "LORAPLEX_URL": server.url})
    assert done.returncode == 0, f"{command}\n{done.stdout[-2000:]}\n{done.stderr[-2000:]}"
    assert time.monotonic() - start < MAX_SECONDS_PER_COMMAND, command
    assert "HTTP Request:" not in done.stdout + done.stderr, f"httpx log noise from {command}"
    return done


def test_readme_examples_run_as_written(readme):
    root, server = readme
    commands = shell_commands(readme_block("examples"))
    assert all('"max_tokens"' in c for c in commands if "/completions" in c)
    outputs = []
    for command in commands:
        done = run(command, root, server)
        assert not error_answers(done.stdout), f"{command}\n{done.stdout[-2000:]}"
        outputs.append(done.stdout)
    assert "Arr, matey" in stream_text(outputs[-1]), outputs[-1][-2000:]  # the shipped adapter is the pirate

    script = readme_block("grpc-example", "python").replace(README_GRPC_TARGET, server.grpc_target)
    done = subprocess.run([sys.executable, "-c", script], cwd=root, capture_output=True, text=True,
                          timeout=MAX_SECONDS_PER_COMMAND)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "Arr, matey" in done.stdout, done.stdout


def test_readme_walkthrough_runs_as_written(readme):
    root, server = readme
    commands = shell_commands(readme_block("walkthrough"))
    assert all(README_URLS[0] in c for c in commands if "curl" in c or "adapters" in c)
    assert all('"max_tokens"' in c for c in commands if "curl" in c)
    before = set(os.listdir(root))
    outputs = []
    for command in commands:
        done = run(command, root, server)
        if command.startswith("loraplex train"):
            assert not noise(done.stdout + done.stderr), noise(done.stdout + done.stderr)
            assert done.stdout.strip().startswith("adapter written to"), done.stdout
        outputs.append(done.stdout)
    answers = []
    for out in outputs[-3:]:
        assert not error_answers(out), out
        answers.append(json.loads(out)["choices"][0]["message"]["content"])
    pirate, base, mix = answers
    assert pirate.startswith("Arr, matey!") and "Accra" in pirate, answers  # "talks like a pirate"
    assert "Arr" not in base, answers  # the base model's own answer
    assert mix == pirate, answers  # 0.5 * delta + 0.5 * the same delta

    written = sorted(set(os.listdir(root)) - before)
    assert written, "the walk-through wrote nothing?"
    check = subprocess.run(["git", "-C", str(REPO), "check-ignore", "--no-index", *written], capture_output=True, text=True)
    assert sorted(check.stdout.split()) == written, f"left in the checkout, not ignored: {written}"


def test_serve_start_and_stop_print_no_noise(readme):
    """Runs last in this module: stops the server and reads all it printed, start to exit."""
    _, server = readme
    server.stop()
    assert server.proc.returncode == 0
    output = server.log_path.read_text()
    assert OPEN_MODE_NOTICE in output  # the one deliberate notice
    assert not noise(output), noise(output)
    assert "HTTP/1.1" not in output  # no access log without --verbose
