"""Test helpers shared by the reference tests and the reference-vs-Triton differential tests.

Everything here restates docs/DESIGN.md section 2 independently of `reference/` (float64, explicit masks, plain loops
where the formula is easiest to read that way), so a test that compares against these helpers compares against
the formulas, not against the code under test.

Import with `from helpers import ...` (pytest puts tests/ on sys.path, there is no tests/__init__.py).
"""

from __future__ import annotations

import math

import pytest
import torch

# Tolerances for comparing an output in `dtype` against a float64 ground truth computed from the same inputs.
ATOL = {torch.float64: 1e-10, torch.float32: 2e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}


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


def num_blocks(L: int, block_size: int) -> int:
    return -(-L // block_size)


def causal_block_mask(B: int, Hq: int, M: int, device="cpu") -> torch.Tensor:
    """(B, Hq, M, M) bool: every causal block (J <= I) kept."""
    return torch.ones(M, M, dtype=torch.bool, device=device).tril().expand(B, Hq, M, M).contiguous()


def random_block_mask(B: int, Hq: int, M: int, keep: float = 0.5, seed: int = 0, device="cpu") -> torch.Tensor:
    """(B, Hq, M, M) bool: causal blocks kept with probability `keep`; the diagonal is always kept."""
    gen = torch.Generator().manual_seed(seed)
    mask = torch.rand(B, Hq, M, M, generator=gen) < keep
    mask |= torch.eye(M, dtype=torch.bool)
    return (mask & torch.ones(M, M, dtype=torch.bool).tril()).to(device)


def token_mask_from_blocks(block_mask: torch.Tensor, L: int, block_size: int) -> torch.Tensor:
    """(B, Hq, M, N) block mask -> (B, Hq, L, L) token mask: causal and inside a kept block."""
    token = block_mask.repeat_interleave(block_size, dim=-2).repeat_interleave(block_size, dim=-1)[..., :L, :L]
    causal = torch.ones(L, L, dtype=torch.bool, device=block_mask.device).tril()
    return token & causal


def naive_attention_fp64(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    softmax_scale: float | None = None,
    token_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """softmax(scale * Q K^T + mask) V in float64 with an explicit (L, L) causal mask, GQA by repeat_interleave.

    q (B, L, Hq, D), k and v (B, L, Hkv, D). `token_mask` (B, Hq, L, L) bool, if given, replaces the causal mask
    (use `token_mask_from_blocks` for block-sparse attention). Rows with no visible key give 0.
    Returns (B, L, Hq, D) float64. Materialises L x L: keep L small.
    """
    B, L, Hq, D = q.shape
    group = Hq // k.shape[2]
    scale = 1.0 / math.sqrt(D) if softmax_scale is None else softmax_scale
    q64 = q.double().transpose(1, 2)  # (B, Hq, L, D)
    k64 = k.double().repeat_interleave(group, dim=2).transpose(1, 2)
    v64 = v.double().repeat_interleave(group, dim=2).transpose(1, 2)
    logits = scale * (q64 @ k64.transpose(-1, -2))  # (B, Hq, L, L)
    if token_mask is None:
        token_mask = torch.ones(L, L, dtype=torch.bool, device=q.device).tril()
    logits = logits.masked_fill(~token_mask, float("-inf"))
    row_max = logits.amax(dim=-1, keepdim=True)
    row_max = torch.where(torch.isfinite(row_max), row_max, torch.zeros_like(row_max))
    p = torch.exp(logits - row_max)
    denom = p.sum(dim=-1, keepdim=True)
    out = torch.where(denom > 0, (p @ v64) / denom.clamp_min(1e-300), torch.zeros_like(q64))
    return out.transpose(1, 2)


def naive_block_sparse_attention_fp64(q, k, v, block_mask, block_size: int, softmax_scale=None) -> torch.Tensor:
    """Float64 causal attention restricted to the key blocks kept by `block_mask` (B, Hq, M, N)."""
    token_mask = token_mask_from_blocks(block_mask, q.shape[1], block_size)
    return naive_attention_fp64(q, k, v, softmax_scale, token_mask)


def naive_mean_pool_fp64(k: torch.Tensor, block_size: int) -> torch.Tensor:
    """(B, L, Hkv, D) -> (B, N, Hkv, D) float64: mean over the valid tokens of each key block."""
    L = k.shape[1]
    return torch.stack(
        [k[:, s : min(s + block_size, L)].double().mean(dim=1) for s in range(0, L, block_size)], dim=1
    )


def naive_block_scores_fp64(q: torch.Tensor, kbar: torch.Tensor, block_size: int, scale: float) -> torch.Tensor:
    """docs/DESIGN.md section 2, step 2, with plain Python loops and math.exp in float64 (keep sizes tiny).

    Query i of block I contributes to key block J iff i >= (J+1)*Bs - 1 (and i < L).
    m_IJ = max s_iJ, S_IJ = sum exp(s_iJ - m_IJ), M_I = max_J m_IJ,
    Score_IJ = S_IJ exp(m_IJ - M_I) / (sum_J' S_IJ' exp(m_IJ' - M_I) + 1e-9); 0 where nobody contributes.
    """
    B, L, Hq, D = q.shape
    Hkv = kbar.shape[2]
    group = Hq // Hkv
    M = N = num_blocks(L, block_size)
    qd = q.double().tolist()
    kd = kbar.double().tolist()
    out = torch.zeros(B, Hq, M, N, dtype=torch.float64)
    for b in range(B):
        for h in range(Hq):
            hk = h // group
            for I in range(M):
                m, S = {}, {}
                for J in range(N):
                    s = [
                        scale * sum(a * c for a, c in zip(qd[b][i][h], kd[b][J][hk]))
                        for i in range(I * block_size, min((I + 1) * block_size, L))
                        if i >= (J + 1) * block_size - 1
                    ]
                    if s:
                        m[J] = max(s)
                        S[J] = sum(math.exp(x - m[J]) for x in s)
                if not m:
                    continue
                M_I = max(m.values())
                total = sum(S[J] * math.exp(m[J] - M_I) for J in m)
                for J in m:
                    out[b, h, I, J] = S[J] * math.exp(m[J] - M_I) / (total + 1e-9)
    return out


def naive_select_blocks(scores: torch.Tensor, alpha: float, sink_blocks: int, window_blocks: int,
                        last_dense_blocks: int) -> torch.Tensor:
    """docs/DESIGN.md section 2, step 3, with plain loops (exact for float64 scores, and for float32 scores whose
    products with alpha are exact): m_I = max over the causal J <= I, NaN if one of them is NaN; keep iff causal and
    (NOT(Score < alpha * m_I) or forced)."""
    B, Hq, M, N = scores.shape
    s = scores.tolist()
    out = torch.zeros(B, Hq, M, N, dtype=torch.bool)
    for b in range(B):
        for h in range(Hq):
            for I in range(M):
                causal = s[b][h][I][: I + 1]
                row_max = math.nan if any(math.isnan(x) for x in causal) else max(causal)
                threshold = alpha * row_max
                for J in range(min(I + 1, N)):
                    out[b, h, I, J] = (
                        not s[b][h][I][J] < threshold
                        or J < sink_blocks
                        or I - J < window_blocks
                        or I >= M - last_dense_blocks
                    )
    return out


def assert_lists_match_mask(counts: torch.Tensor, indices: torch.Tensor, mask: torch.Tensor) -> None:
    """counts == row sums and indices[..., :counts] == the kept J in ascending order; nothing past counts read."""
    assert counts.dtype == torch.int32 and indices.dtype == torch.int32
    assert counts.shape == mask.shape[:-1]
    assert indices.shape[:-1] == mask.shape[:-1]
    assert torch.equal(counts, mask.sum(dim=-1).to(torch.int32))
    for row in torch.nonzero(torch.ones(mask.shape[:-1], dtype=torch.bool)).tolist():
        b, h, I = row
        c = int(counts[b, h, I])
        listed = indices[b, h, I, :c].tolist()
        assert listed == torch.nonzero(mask[b, h, I]).flatten().tolist(), (row, listed)

