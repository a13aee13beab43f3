"""Test setup shared by every test file.

On a machine without CUDA the Triton kernels run under the interpreter (TRITON_INTERPRET=1), which must be set
before triton is imported anywhere, so it is set here, at collection time. The interpreter computes tl.dot on
bfloat16 wrongly (triton-lang/triton#11584), so CPU tests use float16/float32; bfloat16 is tested on the GPU.
"""

import os

import pytest
import torch

HAS_CUDA = torch.cuda.is_available()
if not HAS_CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")
    # On a 2-core VM every multi-threaded torch op pays a multi-millisecond thread wake-up: the small tensors of
    # the CPU tests run 5-50x faster on one thread.
    torch.set_num_threads(1)

from hypothesis import settings  # noqa: E402

# Fixed example database off and derandomized: every run tests the same examples, CI included.
settings.register_profile("repro", derandomize=True, deadline=None, database=None, print_blob=True)
settings.load_profile("repro")

DEVICE = "cuda" if HAS_CUDA else "cpu"


def pytest_collection_modifyitems(config, items):
    if HAS_CUDA:
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)


@pytest.fixture(autouse=True)
def poison_outputs():
    """Every triton_impl output buffer starts as NaN / -1 during tests (see triton_impl.common.new_output)."""
    import triton_impl.common

    triton_impl.common.POISON_OUTPUTS = True
    yield
    triton_impl.common.POISON_OUTPUTS = False


@pytest.fixture(autouse=True)
def restore_grad_mode():
    """Every test starts with autograd on, as a fresh process does: scripts run in-process (their main() turns
    autograd off for the whole process) must not change what later tests see, also when a module-scoped fixture
    ran the script before this fixture could record the mode."""
    torch.set_grad_enabled(True)
    yield
    torch.set_grad_enabled(True)
