"""What every Triton entry point shares: supported inputs, the device rule, and launch helpers."""

from __future__ import annotations

import os
import warnings
from dataclasses import dataclass

import torch
import triton
import triton.language as tl
from triton import knobs
from triton.runtime.driver import driver

try:  # Triton internals the fast launch path relies on (present in 3.6-3.8); without them kernels launch the usual way
    from triton._C.libtriton import native_specialize_impl
    from triton.backends.compiler import BaseBackend
except ImportError:  # pragma: no cover - depends on the installed Triton
    native_specialize_impl = None
    warnings.warn("this Triton lacks the internals of triton_impl's fast launch path; kernels launch through "
                  "kernel[grid](...), which adds ~20-70 us of host time per launch", stacklevel=1)

from reference.validation import check_block_size, check_qkv

KERNEL_DTYPES = (torch.float16, torch.bfloat16, torch.float32)  # all of them; which ones where:
GPU_DTYPES = (torch.float16, torch.bfloat16)  # compiled and tested for sm_90
INTERPRETER_DTYPES = (torch.float16, torch.float32)  # the CPU interpreter computes tl.dot on bfloat16 wrongly
HEAD_DIMS = (64, 128)  # the head dims the differential tests cover; others get a clear error
BLOCK_SIZES = (16, 32, 64, 128, 256)  # compiled for sm_90 by tools/hopper_compile.py and tested; others: an error
LOG2E = 1.4426950408889634


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def check_kernel_device(**tensors: torch.Tensor) -> None:
    """Kernels run on CUDA tensors, or on CPU tensors under the Triton interpreter (TRITON_INTERPRET=1)."""
    for name, t in tensors.items():
        if t.device.type == "cuda" or (t.device.type == "cpu" and interpreting()):
            continue
        raise ValueError(
            f"{name} is on {t.device}; triton_impl needs CUDA tensors "
            "(or CPU tensors with TRITON_INTERPRET=1 set before triton is imported)"
        )


def check_kernel_dtype(**tensors) -> None:
    """The dtypes each place runs: float16 / bfloat16 on a GPU (GPU_DTYPES), float16 / float32 under the Triton
    interpreter (INTERPRETER_DTYPES). Arguments are tensors, or dtypes (checked as interpreter inputs).

    bfloat16 is refused under the interpreter, which computes tl.dot on bfloat16 wrongly; float32 is refused on a
    GPU, where its full-precision dots would run without tensor cores (nothing is tuned or tested for it there).
    Reads TRITON_INTERPRET itself rather than calling `interpreting()`: tools.hopper_compile patches that to True while
    it compiles the bfloat16 kernels for a GPU in a process without the interpreter, where bfloat16 is fine."""
    interpreter = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")
    for name, x in tensors.items():
        dtype = x.dtype if isinstance(x, torch.Tensor) else x
        on_gpu = isinstance(x, torch.Tensor) and x.device.type == "cuda"
        if on_gpu and dtype not in GPU_DTYPES:
            raise TypeError(
                f"{name} is {str(dtype).replace('torch.', '')} on a GPU; the Triton kernels take float16 or bfloat16 "
                "there (float32 runs only under the CPU interpreter; the `reference` package takes any float dtype)"
            )
        if interpreter and not on_gpu and dtype not in INTERPRETER_DTYPES:
            raise TypeError(
                f"{name} is {str(dtype).replace('torch.', '')}, which is not supported under the Triton interpreter "
                "(TRITON_INTERPRET=1): it computes tl.dot on bfloat16 wrongly (triton-lang/triton#11584); use "
                "float16 or float32 on the CPU, bfloat16 on a GPU"
            )


def check_inference_only(**tensors: torch.Tensor) -> None:
    """The kernels have no backward: refuse inputs that autograd would track, instead of returning an output that
    silently carries no gradient back to them."""
    if not torch.is_grad_enabled():
        return
    for name, t in tensors.items():
        if t.requires_grad:
            raise RuntimeError(
                f"{name} requires grad, but the Triton kernels are inference-only (no backward): wrap the call in "
                "torch.no_grad() or torch.inference_mode(), or detach the inputs; the `reference` package is "
                "differentiable"
            )


def check_kernel_qkv(q, k, v):
    """check_qkv restricted to what the kernels support; returns (B, L, Hq, Hkv, D)."""
    shape = check_qkv(q, k, v, dtypes=KERNEL_DTYPES, head_dims=HEAD_DIMS)
    check_kernel_runs_on(q, k, v)
    return shape


def check_kernel_runs_on(q, k, v) -> None:
    """What the kernels add to the shape checks of q, k, v (one dtype, checked by check_qkv): the device, the
    dtypes of that device, and no autograd."""
    check_kernel_device(q=q, k=k, v=v)
    check_kernel_dtype(q=q)
    check_inference_only(q=q, k=k, v=v)


def check_kernel_block_size(block_size) -> int:
    """check_block_size restricted to the block sizes the kernels are compiled and tested for."""
    check_block_size(block_size)
    if block_size not in BLOCK_SIZES:
        raise ValueError(f"block_size {block_size} is not supported by the Triton kernels; expected one of "
                         f"{', '.join(map(str, BLOCK_SIZES))} (the reference takes any power of two >= 16)")
    return block_size


def dot_precision(dtype: torch.dtype) -> str:
    """float32 dots in full IEEE precision (Triton's default for them is tf32); fp16/bf16 dots are exact-input."""
    return "ieee" if dtype == torch.float32 else "tf32"


def needs_wide_offsets(*tensors: torch.Tensor) -> bool:
    """True when an element offset into one of these tensors can reach 2^31 (e.g. L x Hq x D at 1M tokens): the
    kernels then compute offsets in int64. Otherwise int32, which costs fewer instructions per address (the H200
    timings of both are in repro/NOTES.md). The margin covers the masked lanes of a tile that runs past the end
    (their addresses are computed, never read)."""
    limit = 2**31 - 2**24
    for t in tensors:  # a contiguous tensor's largest offset is numel - 1 (the cheap test: this runs every launch)
        if (t.numel() - 1 if t.is_contiguous() else sum((n - 1) * s for n, s in zip(t.shape, t.stride()))) >= limit:
            return True
    return False


@triton.jit
def widen(x, WIDE: tl.constexpr):
    """x as int64 when the launch needs 64-bit offsets (see needs_wide_offsets), else unchanged."""
    if WIDE:
        return x.to(tl.int64)
    else:
        return x


def num_warps_for(block_m: int, head_dim: int) -> int:
    return 8 if block_m * head_dim >= 128 * 128 else 4


# Launching a @triton.jit kernel: `kernel[grid](...)` redoes on every call what only the first call of a given
# specialisation needs (binding arguments by name, the options' cache key, knob and hook look-ups, a check of the
# globals the kernel read), ~20-70 us a launch on a server CPU: more than the GPU work of a 4K-token prefill
# (repro/NOTES.md). `launch` keeps the compiled kernel of each specialisation and calls its launcher directly.
FAST_LAUNCH = native_specialize_impl is not None  # False: every launch is kernel[grid](...) (repro.bench_host's A/B)
_COMPILED: dict = {}


def launch_hooks_installed() -> bool:
    """Whether a profiler (e.g. Proton) has installed a launch hook, which needs Triton's own launch path (it builds
    the launch metadata the hook reads). Triton 3.6 keeps the hooks in a HookChain that is never None: an empty
    chain means no hook; older versions hold a callable or None."""
    return any(hook is not None and bool(getattr(hook, "calls", True))
               for hook in (knobs.runtime.launch_enter_hook, knobs.runtime.launch_exit_hook))


def launch(kernel, grid: tuple[int, ...], *args, **meta) -> None:
    """kernel[grid](*args, **meta): runtime arguments by position, constexprs and launch options (num_warps,
    num_stages) by keyword.

    The first call of a specialisation goes through Triton, which binds, specialises, compiles (or loads) and
    launches; later calls find its compiled kernel under a key made of exactly what Triton specialises on (each
    argument's `native_specialize_impl` result: dtype and 16-byte alignment of a tensor, type, == 1 and divisibility
    by 16 of an int, ...) and the keywords, and call its launcher on the current stream. Under the interpreter, and
    while a launch hook is installed (profilers), every call goes through Triton."""
    if not FAST_LAUNCH or launch_hooks_installed() or interpreting():
        kernel[grid](*args, **meta)
        return
    device = driver.active.get_current_device()  # Triton's rule: the current device, whatever the tensors'
    key = (kernel, device, *(native_specialize_impl(BaseBackend, a, False, True, True) for a in args),
           *meta.items())
    entry = _COMPILED.get(key)
    if entry is None:
        compiled = kernel[grid](*args, **meta)
        compiled = compiled.result() if hasattr(compiled, "result") else compiled  # Triton's asynchronous compile mode
        # The launcher takes every parameter in signature order, the constexprs included (it skips them).
        assert all(p.is_constexpr for p in kernel.params[len(args):]), "runtime arguments go by position"
        tail = [meta[p.name] if p.name in meta else p.default for p in kernel.params[len(args):]]
        _COMPILED[key] = (compiled, tail)
        return
    compiled, tail = entry
    stream = driver.active.get_current_stream(device)
    grid = (*grid, 1, 1)
    compiled.run(grid[0], grid[1], grid[2], stream, compiled.function, compiled.packed_metadata, None, None, None,
                 *args, *tail)


# Tests set this (see tests/conftest.py) so that every kernel output starts as NaN (floats) or -1 (ints) and an
# element a kernel forgot to write cannot pass as a plausible value.
POISON_OUTPUTS = False


def new_output(*shape: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """torch.empty, or a poisoned buffer while POISON_OUTPUTS is set."""
    if not POISON_OUTPUTS:
        return torch.empty(*shape, dtype=dtype, device=device)
    fill = float("nan") if dtype.is_floating_point else -1
    return torch.full(shape, fill, dtype=dtype, device=device)


@dataclass(frozen=True)
class VarlenLayout:
    """Where the sequences of a packed varlen batch live, for the kernels (built by triton_impl/varlen.py without
    reading any device value, so no host synchronisation):

    cu_q, cu_k: int32 (batch + 1,) cumulative lengths, on the kernels' device (FlashAttention's cu_seqlens).
    batch, total_q, total_k: the number of sequences and the rows of q and of k, v.
    block_size: Bs, which the counts below are in.
    rows: query-block rows per sequence, ceil(max_seqlen_q / Bs) + 1 (a chunk of q_len rows touches at most that
        many blocks: its first one may be partial). Row t of sequence b is its query block I0_b + t.
    key_blocks: ceil(max_seqlen_k / Bs), the key blocks of the longest sequence (the width of a list).
    first_pooled: int32 (batch,), the key blocks whose kbar the pooling kernel leaves alone (taken from kbar_cache).
    last_dense: int32 (batch,), last_dense_blocks for a chunk that ends the prompt, 0 for one that does not."""

    cu_q: torch.Tensor
    cu_k: torch.Tensor
    batch: int
    total_q: int
    total_k: int
    block_size: int
    rows: int
    key_blocks: int
    first_pooled: torch.Tensor
    last_dense: torch.Tensor


@triton.jit
def sequence_span(CU_Q, CU_K, b, total_q, total_k, BLOCK_SIZE: tl.constexpr, WIDE: tl.constexpr):
    """Sequence b of a varlen batch (VarlenLayout): (q_start, k_start, P, L, I0, N). Its query rows are q[q_start:]
    at the absolute positions P .. L - 1 of its key range k[k_start : k_start + L] (bottom-right causal:
    P = k_len - q_len, L = k_len); they fall into its query blocks I0 = P // Bs .. N - 1, N = ceil(L / Bs).
    The cumulative lengths are clamped into [0, total] and the chunk into the key range: malformed ones give wrong
    rows, never a read outside q, k, v."""
    q_start = tl.minimum(tl.maximum(tl.load(CU_Q + b), 0), total_q)
    q_end = tl.minimum(tl.maximum(tl.load(CU_Q + b + 1), q_start), total_q)
    k_start = tl.minimum(tl.maximum(tl.load(CU_K + b), 0), total_k)
    k_end = tl.minimum(tl.maximum(tl.load(CU_K + b + 1), k_start), total_k)
    L = k_end - k_start
    P = tl.maximum(L - (q_end - q_start), 0)
    return widen(q_start, WIDE), widen(k_start, WIDE), P, L, P // BLOCK_SIZE, tl.cdiv(L, BLOCK_SIZE)
