"""For the test modules of Triton kernels, run by Triton's interpreter on the CPU. Import it before anything that
imports triton: it asks for the interpreter, which triton picks (or not) at its first import in the process. Where
another module imported triton compiled first, such a module's tests are skipped here and its
`test_in_fresh_process` (fresh_process_test) runs the whole file again in a fresh process under the interpreter."""
import os

os.environ.setdefault("TRITON_INTERPRET", "1")  # must precede the first `import triton` of the process

import pytest  # noqa: E402
import triton.language as tl  # noqa: E402
from conftest import rerun_under_triton_interpreter  # noqa: E402

INTERPRETED = type(tl.zeros).__name__ == "InterpretedFunction"
needs_interpreter = pytest.mark.skipif(not INTERPRETED, reason="triton was imported without TRITON_INTERPRET=1; "
                                                              "test_in_fresh_process runs these")


def fresh_process_test(test_file: str):
    """The module's test that runs `test_file` again in a fresh process where triton was imported compiled."""
    @pytest.mark.skipif(INTERPRETED, reason="the tests below run in this process")
    def test_in_fresh_process():
        rerun_under_triton_interpreter(test_file)
    return test_in_fresh_process
