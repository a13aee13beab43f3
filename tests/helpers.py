"""Test inputs and test ids shared by the test files: random q/k/v and block masks, readable case ids, and where
the kernel tests run. The oracle the tests compare against (float64 restatements of docs/DESIGN.md section 2 and
the comparison rules) is `tools.oracle`, shared with `python -m repro.check_triton`.

Import with `from helpers import ...` (pytest puts tests/ on sys.path, there is no tests/__init__.py).
"""

from __future__ import annotations

import pytest
import torch


# Where the Triton differential tests run: natively in bf16/fp16 on a GPU, under the interpreter in fp32/fp16 on a
# CPU (the interpreter computes tl.dot on bf16 wrongly, triton-lang/triton#11584).
HAS_CUDA = torch.cuda.is_available()
DEVICE = "cuda" if HAS_CUDA else "cpu"
KERNEL_TEST_DTYPES = [torch.bfloat16, torch.float16] if HAS_CUDA else [torch.float32, torch.float16]


def case_id(case) -> str:
    """(B, L, Hq, Hkv, D, block_size) -> "B2-L127-g4-D64-bs16"."""
    B, L, Hq, Hkv, D, bs = case
    return f"B{B}-L{L}-g{Hq // Hkv}-D{D}-bs{bs}"


def dtype_id(dtype) -> str:
    return str(dtype).replace("torch.", "")


def case_params(cases, gpu_cases=()) -> list:
    """pytest params with readable ids; the GPU-only cases carry the `gpu` mark."""
    return [pytest.param(c, id=case_id(c)) for c in cases] + [
        pytest.param(c, id=case_id(c), marks=pytest.mark.gpu) for c in gpu_cases
    ]


def random_qkv(
    B: int,
    L: int,
    Hq: int,
    Hkv: int,
    D: int,
    dtype: torch.dtype = torch.float32,
    seed: int = 0,
    device: str | torch.device = "cpu",
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Standard-normal q (B, L, Hq, D), k and v (B, L, Hkv, D); generated on the CPU in float32 from `seed`
    (so the values do not depend on the device), then cast to `dtype` and moved to `device`."""
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(B, L, Hq, D, generator=gen)
    k = torch.randn(B, L, Hkv, D, generator=gen)
    v = torch.randn(B, L, Hkv, D, generator=gen)
    return tuple(t.to(device=device, dtype=dtype) for t in (q, k, v))  # type: ignore[return-value]


def causal_block_mask(B: int, Hq: int, M: int, device="cpu") -> torch.Tensor:
    """(B, Hq, M, M) bool: every causal block (J <= I) kept."""
    return torch.ones(M, M, dtype=torch.bool, device=device).tril().expand(B, Hq, M, M).contiguous()


def random_block_mask(B: int, Hq: int, M: int, keep: float = 0.5, seed: int = 0, device="cpu") -> torch.Tensor:
    """(B, Hq, M, M) bool: causal blocks kept with probability `keep`; the diagonal is always kept."""
    gen = torch.Generator().manual_seed(seed)
    mask = torch.rand(B, Hq, M, M, generator=gen) < keep
    mask |= torch.eye(M, dtype=torch.bool)
    return (mask & torch.ones(M, M, dtype=torch.bool).tril()).to(device)
