"""A built wheel, installed into a fresh venv outside the checkout, serves the default model.

The wheel is built from a copy of the tracked files; the fresh venv gets only the wheel (its
dependencies come from this suite's environment through a path entry, not through the editable
install's finder), and the server runs from a directory outside the checkout.
"""
from __future__ import annotations

import shutil
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

from conftest import ServerProcess

REPO = Path(__file__).resolve().parents[1]


def _tracked_copy(dest: Path) -> Path:
    listed = subprocess.run(["git", "ls-files", "-z"], cwd=REPO, capture_output=True, check=True).stdout
    for name in filter(None, listed.decode().split("\0")):
        if (REPO / name).is_file():
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO / name, dest / name)
    return dest


def _fresh_venv(root: Path) -> Path:
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(root)], check=True, timeout=120)
    python = root / "bin" / "python"
    purelib = subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                             capture_output=True, text=True, check=True).stdout.strip()
    # a plain path line: this suite's packages, without running that directory's .pth files (the editable finder)
    (Path(purelib) / "suite_dependencies.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    return python


def test_built_wheel_serves_the_default_model_from_a_fresh_venv(tmp_path):
    source = _tracked_copy(tmp_path / "source")
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w",
                    str(tmp_path / "dist"), str(source)], check=True, capture_output=True, timeout=600)
    wheel = next((tmp_path / "dist").glob("loraplex-*.whl"))
    names = set(zipfile.ZipFile(wheel).namelist())
    for module in ("loraplex/protos/loraplex/v1/serving.proto", "loraplex/protos/loraplex/v1/serving_pb2.py",
                   "loraplex/protos/loraplex/v1/serving_pb2_grpc.py", "loraplex/runtime/cli.py",
                   "loraplex/runtime/adapters/store.py", "loraplex/client/http.py", "loraplex/kernels/ops.py",
                   "loraplex/trainer/cli.py"):
        assert module in names, module
    sources = {p.relative_to(source).as_posix() for top in ("runtime", "kernels", "trainer", "protos")
               for p in (source / top).rglob("*.py")}
    packaged = {n.removeprefix("loraplex/") for n in names if n.endswith(".py")}
    packaged = {("runtime/client/" + n.removeprefix("client/")) if n.startswith("client/") else n for n in packaged}
    assert sources <= packaged, sorted(sources - packaged)
    for top in ("kernels", "runtime", "trainer", "protos"):
        assert not any(n.startswith(f"{top}/") for n in names), f"the wheel installs a top-level {top}"

    python = _fresh_venv(tmp_path / "venv")
    subprocess.run([sys.executable, "-m", "pip", "--python", str(python), "install", "-q", "--no-deps", str(wheel)],
                   check=True, capture_output=True, timeout=600)
    where = subprocess.run([str(python), "-c", "import loraplex.runtime.cli as c; print(c.__file__)"],
                           cwd=tmp_path, capture_output=True, text=True, check=True).stdout.strip()
    assert Path(where).is_relative_to(tmp_path / "venv"), where

    work = tmp_path / "elsewhere"
    work.mkdir()
    server = ServerProcess(adapter_dir=work / "adapters", exe=str(tmp_path / "venv" / "bin" / "loraplex"), cwd=work)
    try:
        text = server.complete("base", "The capital of France is", 4)["choices"][0]["text"]
        assert "Paris" in text, text
    finally:
        server.stop()
