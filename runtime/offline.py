"""No network at run time: loraplex loads models and adapters from local paths only.

`stay_offline()` runs first in every loraplex process (the `loraplex` command, each Ray Serve
replica, the test suite), before transformers, peft or bitsandbytes are imported:
- the Hugging Face hub client and transformers are switched to offline mode, so a hub id given by
  mistake is an error at once instead of a download;
- bitsandbytes, whenever the process first imports it (we, PEFT or transformers), is imported without the
  PyPI `kernels` package in reach. On a CPU with AVX512-bf16 bitsandbytes (0.50) otherwise fetches a CPU
  kernel from the hub at import (`kernels.get_kernel("kernels-community/...")`) and logs "Failed to load
  CPU gemm_4bit_forward from kernels-community" when that fails; without the fetch it uses its own CPU
  kernels, as it does on every other CPU. `kernels` stays importable afterwards (transformers imports it).
  Not imported before it is needed: its import runs torch.compile (Dynamo and Inductor imported), 3 s of
  every process start on a 2-core CPU, and a server without an NF4 base never uses it.
"""
from __future__ import annotations

import contextlib
import importlib.abc
import importlib.machinery
import logging
import os
import sys

HUB_KERNEL_WARNING = "Failed to load CPU gemm_4bit_forward from kernels-community"


class _DropHubKernelWarning(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(HUB_KERNEL_WARNING)


@contextlib.contextmanager
def _without_hub_kernels():
    """`from kernels import get_kernel` raises ImportError inside (no fetch); the warning that path logs is
    dropped (it says nothing true here)."""
    kernels = sys.modules.get("kernels")
    sys.modules["kernels"] = None
    cpu_ops_log = logging.getLogger("bitsandbytes.backends.cpu.ops")
    drop = _DropHubKernelWarning()
    cpu_ops_log.addFilter(drop)
    try:
        yield
    finally:
        cpu_ops_log.removeFilter(drop)
        if kernels is None:
            del sys.modules["kernels"]
        else:
            sys.modules["kernels"] = kernels


class _OfflineLoader(importlib.abc.Loader):
    """bitsandbytes' own loader, its package module executed without the hub kernels."""

    def __init__(self, loader):
        self._loader = loader

    def create_module(self, spec):
        return self._loader.create_module(spec)

    def exec_module(self, module) -> None:
        with _without_hub_kernels():
            self._loader.exec_module(module)

    def __getattr__(self, name):  # resource readers and the like: the wrapped loader's
        return getattr(self._loader, name)


class _BitsandbytesFinder(importlib.abc.MetaPathFinder):
    """Finds `bitsandbytes` with the wrapped loader; everything else is left to the others. It stays in place:
    availability checks (transformers, PEFT) call importlib.util.find_spec before anything imports it."""

    def find_spec(self, name, path=None, target=None):
        if name != "bitsandbytes":
            return None
        spec = importlib.machinery.PathFinder.find_spec(name, path)
        if spec is not None and spec.loader is not None:
            spec.loader = _OfflineLoader(spec.loader)
        return spec


def stay_offline() -> None:
    """The offline switches, and bitsandbytes' first import guarded (see above); cheap, idempotent."""
    os.environ["HF_HUB_OFFLINE"] = "1"
    os.environ["TRANSFORMERS_OFFLINE"] = "1"
    if "bitsandbytes" in sys.modules or any(isinstance(f, _BitsandbytesFinder) for f in sys.meta_path):
        return
    sys.meta_path.insert(0, _BitsandbytesFinder())
