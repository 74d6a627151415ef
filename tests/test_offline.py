"""No download at run time: `loraplex serve` and `loraplex train` reach no host but loopback and print
nothing about the hub (bitsandbytes' kernels-community fetch, a failed download).

Each command runs with a `sitecustomize` that refuses every name lookup and connection to a host that
is not loopback and says so on stderr, and without the offline switches this suite's own process set
(the commands must set them themselves).
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from conftest import ServerProcess

REPO = Path(__file__).resolve().parents[1]
EXE = str(Path(sys.executable).parent / "loraplex")
HUB_LINES = ("kernels-community", "Failed to load", "huggingface.co", "NETWORK ATTEMPT")

GUARD = textwrap.dedent('''
    import socket, sys
    _LOCAL = {"127.0.0.1", "::1", "localhost", "0.0.0.0", "", None}
    _getaddrinfo, _connect = socket.getaddrinfo, socket.socket.connect
    def _refuse(host):
        print(f"NETWORK ATTEMPT {host}", file=sys.stderr, flush=True)
        raise OSError(f"test: no network ({host})")
    def getaddrinfo(host, *a, **k):
        if isinstance(host, bytes):
            host = host.decode()
        if host not in _LOCAL and not str(host).startswith("127."):
            _refuse(host)
        return _getaddrinfo(host, *a, **k)
    def connect(self, address):
        if self.family in (socket.AF_INET, socket.AF_INET6) and address[0] not in _LOCAL \\
                and not str(address[0]).startswith("127."):
            _refuse(address[0])
        return _connect(self, address)
    socket.getaddrinfo, socket.socket.connect = getaddrinfo, connect
''')


@pytest.fixture(scope="module")
def no_network_env(tmp_path_factory):
    site = tmp_path_factory.mktemp("no-network")
    (site / "sitecustomize.py").write_text(GUARD)
    env = {k: v for k, v in os.environ.items() if k not in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")}
    env["PYTHONPATH"] = os.pathsep.join([str(site), *filter(None, [env.get("PYTHONPATH")])])
    env["PYTHONUNBUFFERED"] = "1"
    return env


def _hub_lines(output: str) -> list[str]:
    return [line for line in output.splitlines() if any(s in line for s in HUB_LINES)]


def test_the_guard_sees_a_network_attempt(no_network_env):
    """Negative control: the same guard reports a plain attempt to reach the hub."""
    code = "import urllib.request as u\ntry:\n    u.urlopen('https://huggingface.co', timeout=5)\nexcept Exception:\n    pass"
    r = subprocess.run([sys.executable, "-c", code], env=no_network_env, capture_output=True, text=True, timeout=60)
    assert "NETWORK ATTEMPT huggingface.co" in r.stderr, r.stderr


def test_bitsandbytes_imports_without_a_fetch_after_stay_offline(no_network_env):
    plain = subprocess.run([sys.executable, "-c", "import bitsandbytes"], cwd="/", env=no_network_env,
                           capture_output=True, text=True, timeout=120)
    guarded = subprocess.run([sys.executable, "-c", "from loraplex.runtime.offline import stay_offline\n"
                              "stay_offline()\nimport bitsandbytes, kernels\nfrom peft import PeftModel\n"
                              "import bitsandbytes.functional as F, torch\n"
                              "q, s = F.quantize_4bit(torch.ones(64, 64), blocksize=64, quant_type='nf4')\n"
                              "assert torch.equal(F.dequantize_4bit(q, s), torch.ones(64, 64))"],
                             cwd="/", env=no_network_env, capture_output=True, text=True, timeout=120)
    assert guarded.returncode == 0, guarded.stderr[-3000:]
    assert not _hub_lines(guarded.stdout + guarded.stderr), guarded.stderr[-3000:]
    if not _hub_lines(plain.stderr):
        pytest.skip("bitsandbytes does not fetch at import on this CPU (it does with AVX512-bf16)")


def test_bitsandbytes_is_guarded_after_an_availability_check():
    """transformers and PEFT look bitsandbytes up (importlib.util.find_spec) before anything imports it: the import
    that follows still runs under the guard."""
    done = subprocess.run([sys.executable, "-c", "from loraplex.runtime.offline import stay_offline\n"
                           "stay_offline()\nimport importlib.util, sys\n"
                           "assert 'bitsandbytes' not in sys.modules\n"
                           "assert importlib.util.find_spec('bitsandbytes') is not None\n"
                           "import bitsandbytes\nprint(type(bitsandbytes.__spec__.loader).__name__)"],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.strip() == "_OfflineLoader", done.stdout


def test_train_reaches_no_host_and_prints_no_hub_line(no_network_env, tiny_model_dir, tmp_path):
    data = tmp_path / "train.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"Add {i} and 1.", "completion": f" {i + 1}"}) + "\n"
                            for i in range(8)))
    for method in ("lora", "qlora"):  # qlora imports bitsandbytes for the NF4 base
        r = subprocess.run([EXE, "train", "--method", method, "--data", str(data), "--model", str(tiny_model_dir),
                            "--output", str(tmp_path / method), "--max-steps", "1", "--batch-size", "2",
                            "--max-length", "32", "--save-every", "0"],
                           cwd=REPO, env=no_network_env, capture_output=True, text=True, timeout=600)
        assert r.returncode == 0, r.stderr[-3000:]
        assert not _hub_lines(r.stdout + r.stderr), _hub_lines(r.stdout + r.stderr)


def test_serve_reaches_no_host_and_prints_no_hub_line(no_network_env, tmp_path):
    server = ServerProcess(adapter_dir=tmp_path / "adapters", grpc_port=0, cwd=REPO, env=no_network_env,
                           log_level="info")
    try:
        assert server.complete("base", "The capital of France is", 4)["usage"]["completion_tokens"] == 4
    finally:
        server.stop()
    output = server.log_path.read_text()
    assert " on http://127.0.0.1:" in output  # the server's own log, at its default level
    assert not _hub_lines(output), _hub_lines(output)
