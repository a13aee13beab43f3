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


# --------------------------------------------------------------------------------------------------------------
# Varlen (flash_prefill_varlen of both packages): packing, reading the lists back, the bad-input table
# --------------------------------------------------------------------------------------------------------------
def cu(lengths, device="cpu") -> torch.Tensor:
    """[3, 5] -> int32 cu_seqlens [0, 3, 8] on `device`."""
    return torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32, device=device)


def prefill_in_chunks(varlen_fn, q, k, v, bounds, **kw):
    """One prompt (L, H, D) prefilled chunk by chunk [(c0, c1), ...] through varlen_fn (a flash_prefill_varlen),
    kbar_cache passed along, is_last_chunk on the last: (out, lse, [stats of every chunk])."""
    outs, lses, all_stats, cache = [], [], [], None
    for c0, c1 in bounds:
        out, lse, stats = varlen_fn(q[c0:c1], k[:c1], v[:c1], cu([c1 - c0], q.device), cu([c1], q.device), c1 - c0,
                                    c1, kbar_cache=cache, is_last_chunk=c1 == q.shape[0], return_lse=True,
                                    return_stats=True, **kw)
        outs.append(out)
        lses.append(lse)
        all_stats.append(stats)
        cache = [stats.kbar[0]]
    return torch.cat(outs), torch.cat(lses, dim=1), all_stats


def pack(prompts, chunks):
    """prompts: [(q, k, v)] whole prompts (L, H, D); chunks: [(prefix, q_len)] per prompt -> the varlen call's
    positional arguments: rows prefix .. prefix + q_len - 1 of each prompt's queries, its keys 0 .. prefix + q_len - 1
    (cu_seqlens on the prompts' device)."""
    qs = [q[P : P + n] for (q, _, _), (P, n) in zip(prompts, chunks)]
    ks = [k[: P + n] for (_, k, _), (P, n) in zip(prompts, chunks)]
    vs = [v[: P + n] for (_, _, v), (P, n) in zip(prompts, chunks)]
    q_lens, k_lens = [n for _, n in chunks], [P + n for P, n in chunks]
    device = prompts[0][0].device
    return (torch.cat(qs), torch.cat(ks), torch.cat(vs), cu(q_lens, device), cu(k_lens, device), max(q_lens),
            max(k_lens))


def listed(counts: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
    """(..., Mc) counts + (..., Mc, N) lists -> (..., Mc, N) bool mask of the listed blocks (nothing past counts
    read)."""
    N = indices.shape[-1]
    slots = torch.where(torch.arange(N, device=counts.device) < counts.unsqueeze(-1), indices.long(), N)
    return torch.zeros(*counts.shape, N + 1, dtype=torch.bool, device=counts.device).scatter_(-1, slots, True)[..., :N]


def row_blocks(stats, b: int, prefix: int, q_len: int, block_size: int) -> torch.Tensor:
    """(Hq, q_len, N) bool: the key blocks each row of sequence b's chunk keeps (its query block's list), from a
    VarlenStats."""
    rows = torch.arange(prefix, prefix + q_len, device=stats.counts[b].device) // block_size
    return listed(stats.counts[b], stats.indices[b])[:, rows - stats.first_query_block[b]]


def call_varlen(fn, args: dict):
    """fn(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, **the rest) from one dict."""
    args = dict(args)
    positional = [args.pop(n) for n in ("q", "k", "v", "cu_seqlens_q", "cu_seqlens_k", "max_seqlen_q",
                                         "max_seqlen_k")]
    return fn(*positional, **args)


def varlen_valid_call(Hq: int, Hkv: int, D: int, block_size: int = 32, dtype=torch.float32, device="cpu") -> dict:
    """A valid varlen call, the base of `varlen_bad_inputs`: two prompts of 70 and 40 tokens, the first a 6-row chunk
    over a 64-key prefix (2 of its blocks cached), the second a whole prompt: total_q 46, total_k 110."""
    prompts = [tuple(t[0] for t in random_qkv(1, L, Hq, Hkv, D, dtype=dtype, seed=6 + i, device=device))
               for i, L in enumerate((70, 40))]
    q, k, v, cq, ck, mq, mk = pack(prompts, [(64, 6), (0, 40)])
    return dict(q=q, k=k, v=v, cu_seqlens_q=cq, cu_seqlens_k=ck, max_seqlen_q=mq, max_seqlen_k=mk,
                block_size=block_size, kbar_cache=[torch.zeros(2, Hkv, D, device=device), None])


def varlen_bad_inputs(Hq: int, Hkv: int, D: int, dtype=torch.float32, device="cpu",
                      other_dtype=torch.float64) -> list:
    """(id, change, error, match): each change to `varlen_valid_call`'s arguments (block_size 32) and the error the
    call must raise, with a message naming the argument. Hq must not be a multiple of 3; other_dtype is a dtype the
    call would take for q but that differs from k's."""
    def i32(*values):
        return torch.tensor(values, dtype=torch.int32, device=device)

    def zeros(*shape, dt=dtype):
        return torch.zeros(*shape, dtype=dt, device=device)

    def cache(n, *shape, dt=torch.float32):
        return torch.zeros(n, *shape, dtype=dt, device=device)

    return [
        ("empty-chunk", dict(cu_seqlens_q=i32(0, 46, 46)), ValueError,
         r"^cu_seqlens_q gives sequence 1 an empty chunk"),
        ("q-longer-than-k", dict(cu_seqlens_q=i32(0, 6, 46), cu_seqlens_k=i32(0, 70, 75), k=zeros(75, Hkv, D),
                                 v=zeros(75, Hkv, D), kbar_cache=None),
         ValueError, r"sequence 1 has q_len 40 > k_len 5"),
        ("cu-int64", dict(cu_seqlens_q=torch.tensor([0, 6, 46], device=device)), TypeError,
         r"^cu_seqlens_q has dtype torch\.int64"),
        ("cu-not-tensor", dict(cu_seqlens_k=[0, 70, 110]), TypeError, r"^cu_seqlens_k must be a torch\.Tensor"),
        ("cu-2d", dict(cu_seqlens_k=i32(0, 70, 110)[None]), ValueError, r"^cu_seqlens_k must be 1-D"),
        ("cu-one-entry", dict(cu_seqlens_q=i32(0)), ValueError, r"^cu_seqlens_q must have length batch \+ 1 >= 2"),
        ("cu-start", dict(cu_seqlens_q=i32(1, 6, 46)), ValueError, r"^cu_seqlens_q must start at 0, got 1"),
        ("cu-decreasing", dict(cu_seqlens_k=i32(0, 70, 60, 110)), ValueError,
         r"^cu_seqlens_k must be non-decreasing"),
        ("cu-total-q", dict(cu_seqlens_q=i32(0, 6, 45)), ValueError, r"^cu_seqlens_q must end at total_q = 46"),
        ("cu-total-k", dict(cu_seqlens_k=i32(0, 70, 111)), ValueError, r"^cu_seqlens_k must end at total_k = 110"),
        ("cu-batch", dict(cu_seqlens_q=i32(0, 46)), ValueError, r"^cu_seqlens_q and cu_seqlens_k must have the same"),
        ("max-q-small", dict(max_seqlen_q=39), ValueError, r"^max_seqlen_q must be >= the longest sequence of "
                                                           r"cu_seqlens_q \(40\), got 39"),
        ("max-k-small", dict(max_seqlen_k=69), ValueError, r"^max_seqlen_k must be >= .*\(70\), got 69"),
        ("max-k-float", dict(max_seqlen_k=70.0), TypeError, r"^max_seqlen_k must be an int, got float"),
        ("cache-shape", dict(kbar_cache=[cache(2, Hkv, D + 1), None]), ValueError,
         rf"^kbar_cache\[0\] must have shape \(n, Hkv={Hkv}, D={D}\), got \(2, {Hkv}, {D + 1}\)"),
        ("cache-2d", dict(kbar_cache=[cache(2, D), None]), ValueError, r"^kbar_cache\[0\] must have shape"),
        ("cache-too-many-blocks", dict(kbar_cache=[cache(3, Hkv, D), None]), ValueError,
         r"^kbar_cache\[0\] holds 3 blocks, but sequence 0's cached prefix .* has only 2 complete blocks"),
        ("cache-beyond-prefix", dict(kbar_cache=[None, cache(1, Hkv, D)]), ValueError,
         r"^kbar_cache\[1\] holds 1 blocks, .* has only 0 complete blocks"),
        ("cache-length", dict(kbar_cache=[None]), ValueError, r"^kbar_cache must have one entry per sequence \(2\)"),
        ("cache-tensor", dict(kbar_cache=cache(2, Hkv, D)), TypeError, r"^kbar_cache must be None or a list"),
        ("cache-dtype", dict(kbar_cache=[cache(2, Hkv, D, dt=torch.float64), None]), TypeError,
         r"^kbar_cache\[0\] has dtype torch\.float64; expected torch\.float32"),
        ("q-4d", dict(q=zeros(1, 46, Hq, D)), ValueError, r"^q must be 3-D"),
        ("kv-shapes", dict(v=zeros(110, Hkv, D + 1)), ValueError, r"^k and v must have the same shape"),
        ("kv-heads", dict(k=zeros(110, 3, D), v=zeros(110, 3, D)), ValueError,
         rf"number of query heads \({Hq}\) must be divisible by the number of kv heads \(3\)"),
        ("qkv-dtype", dict(q=zeros(46, Hq, D, dt=other_dtype)), TypeError, r"q, k and v must share one dtype"),
        ("last-int", dict(is_last_chunk=1), TypeError, r"^is_last_chunk must be a bool"),
        ("last-list", dict(is_last_chunk=[True]), ValueError,
         r"^is_last_chunk must be a bool or one bool per sequence"),
        ("alpha", dict(alpha=-1.0), ValueError, r"^alpha must be a finite number >= 0"),
        ("block_size", dict(block_size=24), ValueError, r"^block_size must be a power of two"),
        ("return_lse", dict(return_lse="yes"), TypeError, r"^return_lse must be a bool"),
        ("mean_correction", dict(mean_correction=None), TypeError, r"^mean_correction must be a bool"),
    ]
