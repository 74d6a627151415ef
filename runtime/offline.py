"""No network at run time: loraplex loads models and adapters from local paths only.

`stay_offline()` runs first in every loraplex process (the `loraplex` command, each Ray Serve
replica, the test suite), before transformers, peft or bitsandbytes are imported:
- the Hugging Face hub client and transformers are switched to offline mode, so a hub id given by
  mistake is an error at once instead of a download;
- bitsandbytes is imported without the PyPI `kernels` package in reach. On a CPU with AVX512-bf16
  bitsandbytes (0.50) otherwise fetches a CPU kernel from the hub at import (`kernels.get_kernel(
  "kernels-community/...")`) and logs "Failed to load CPU gemm_4bit_forward from kernels-community"
  when that fails; without the fetch it uses its own CPU kernels, as it does on every other CPU.
  `kernels` stays importable afterwards (transformers imports it).
"""
from __future__ import annotations

import importlib.util
import logging
import os
import sys

HUB_KERNEL_WARNING = "Failed to load CPU gemm_4bit_forward from kernels-community"


class _DropHubKernelWarning(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(HUB_KERNEL_WARNING)


def stay_offline(import_bitsandbytes: bool = True) -> None:
    """import_bitsandbytes=False: only the offline switches (a process that never loads a model)."""
    os.environ["HF_HUB_OFFLINE"] = "1"
    os.environ["TRANSFORMERS_OFFLINE"] = "1"
    if not import_bitsandbytes or "bitsandbytes" in sys.modules or importlib.util.find_spec("bitsandbytes") is None:
        return
    kernels = sys.modules.get("kernels")
    sys.modules["kernels"] = None  # `from kernels import get_kernel` raises ImportError: no fetch
    cpu_ops_log = logging.getLogger("bitsandbytes.backends.cpu.ops")
    drop = _DropHubKernelWarning()
    cpu_ops_log.addFilter(drop)  # the ImportError path still logs the warning; it says nothing true here
    try:
        import bitsandbytes  # noqa: F401
    finally:
        cpu_ops_log.removeFilter(drop)
        if kernels is None:
            del sys.modules["kernels"]
        else:
            sys.modules["kernels"] = kernels
