"""Compile every Triton kernel of triton_impl for Hopper (sm_90) on any machine, GPU or not, and report its resources.

    python -m tools.hopper_compile            # every variant: dtypes, head dims, block sizes, modes
    python -m tools.hopper_compile --quick    # D=128, Bs=128 only: every kernel and attention mode
    python -m tools.hopper_compile --dtypes bf16,fp16 --json report.json

Why: the CPU tests run the kernels under the Triton interpreter (TRITON_INTERPRET=1), which accepts code that the
real compiler rejects (a kernel reading a global that is not a tl.constexpr, for one), and says nothing about
registers, spills, shared memory or whether the dots reach the tensor cores. `triton.compile` needs no GPU: it
lowers to PTX and runs ptxas for any target. This module does that for sm_90 (the H200) on a CPU.

How the kernels are launched is not restated here. Each variant calls the public Python wrapper (mean_pool_keys,
block_scores, ..., flash_prefill) on small CPU tensors of the wanted dtype and shape, with every @triton.jit
kernel's launch turned into a compile-only call (`JITFunction.run(..., warmup=True)`) against a stand-in driver
that names an sm_90 GPU. So the signature (pointer dtypes, scalar types, Triton's own alignment specialisation),
the constexprs, num_warps and num_stages are exactly what the wrappers launch with, and adding a kernel argument
or changing a tile size cannot make this tool compile something else than what runs. A kernel (a @triton.jit
function named `*_kernel` in triton_impl) that no variant launches makes the tool fail, as does a compile error or
a kernel that would not fit into an SM's shared memory.

Per compiled variant it reports what `CompiledKernel.n_regs` / `n_spills` say on the GPU. Those two are only
filled in when a GPU loads the binary, so here ptxas -v is run on the kernel's PTX with Triton's flags instead:
registers per thread (= n_regs), the stack frame (n_spills = its size in 4-byte words, the local memory per
thread the driver reports) and the spill stores/loads in bytes. Both were checked against a native launch on an
H200: registers, n_spills and shared memory agreed for all 37 bf16/fp16 variants. Also `metadata.shared` (the
shared memory Triton allocates, bytes); an occupancy estimate for an H100/H200 SM (CTAs per SM, limited by
registers, shared memory and warps); and which matrix instructions the PTX uses: wgmma (Hopper warpgroup MMA),
mma.sync (Ampere-style tensor cores) or none (FMA).

Exit status: 0 all compiled; 1 a compile failed or a kernel is not covered or too big; 3 this machine cannot
compile for the target (no NVIDIA backend or no working ptxas: the test suite skips on that).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import re
import subprocess
import sys
import tempfile
import time
import traceback
from dataclasses import asdict, dataclass, field
from typing import Callable, Iterator

import torch

from triton_impl import common

CANNOT_COMPILE_HERE = 3  # exit status when this machine has no NVIDIA backend / ptxas

# An H100/H200 SM (compute capability 9.0): the limits the occupancy estimate uses.
SM90_REGISTERS = 65536
SM90_REG_ALLOC_UNIT = 256  # registers are allocated per warp in units of 256
SM90_MAX_WARPS = 64
SM90_MAX_CTAS = 32
SM90_SHARED_PER_SM = 228 * 1024
SM90_SHARED_PER_CTA = 227 * 1024
SM90_SHARED_RESERVED_PER_CTA = 1024


# --- the machinery: compile what a wrapper would launch ------------------------------------------------------------

class _TargetDriver:
    """The part of Triton's driver that `JITFunction.run(..., warmup=True)` touches, naming a GPU we do not have."""

    def __init__(self, target):
        self.target = target

    def is_active(self):
        return True

    def get_current_target(self):
        return self.target

    def get_current_device(self):
        return 0

    def get_current_stream(self, device=None):
        return 0


def jit_kernels() -> dict[str, "triton.runtime.jit.JITFunction"]:  # noqa: F821
    """Every @triton.jit kernel of triton_impl (the functions named *_kernel; the others are device helpers)."""
    import triton.runtime.jit as jit

    from triton_impl import attention, fp8, pooling, scoring, scoring_sm90, selection, validation

    found = {}
    for module in (pooling, scoring, scoring_sm90, selection, attention, fp8, validation):
        for name, obj in vars(module).items():
            if not name.endswith("_kernel"):
                continue
            if not isinstance(obj, jit.JITFunction):
                raise RuntimeError(
                    f"{module.__name__}.{name} is a {type(obj).__name__}, not a JITFunction: triton_impl was imported "
                    "with TRITON_INTERPRET set. Run this tool in a process without TRITON_INTERPRET."
                )
            found[name] = obj
    return found


@dataclass
class Compiled:
    """One compiled kernel variant (unique binary) and what launched it."""

    kernel: str
    variant: str
    entries: list[str] = field(default_factory=list)
    num_warps: int = 0
    num_stages: int = 0
    registers: int | None = None
    n_spills: int | None = None
    spill_stores: int | None = None
    spill_loads: int | None = None
    stack_frame: int | None = None
    shared_bytes: int = 0
    ctas_per_sm: int | None = None
    mma: str = "none"
    signature: dict = field(default_factory=dict)
    constexprs: dict = field(default_factory=dict)
    arch: str = ""
    compile_s: float = 0.0


@contextlib.contextmanager
def compile_only(target, on_compile: Callable) -> Iterator[None]:
    """Within the block, launching any triton_impl kernel compiles it for `target` and calls on_compile(name, ck,
    seconds) instead of running it; the wrappers' device check accepts CPU tensors. Everything is restored after."""
    import triton.runtime.jit as jit
    from triton.runtime.driver import driver

    kernels = jit_kernels()
    saved_caches = {name: k.device_caches for name, k in kernels.items()}
    saved_interpreting = common.interpreting
    previous_driver = driver._active

    def compile_instead(name, kernel):
        def run(*args, grid, warmup, **kwargs):
            start = time.perf_counter()
            compiled = jit.JITFunction.run(kernel, *args, grid=grid, warmup=True, **kwargs)
            on_compile(name, compiled, time.perf_counter() - start)
            return compiled
        return run

    try:
        driver.set_active(_TargetDriver(target))
        common.interpreting = lambda: True  # let check_kernel_device accept the CPU tensors we pass
        for name, kernel in kernels.items():
            # A private per-target cache: nothing compiled for the stand-in driver leaks into real launches.
            kernel.device_caches = type(kernel.device_caches)(kernel.create_binder)
            kernel.run = compile_instead(name, kernel)
        yield
    finally:
        for name, kernel in kernels.items():
            kernel.__dict__.pop("run", None)
            kernel.device_caches = saved_caches[name]
        common.interpreting = saved_interpreting
        driver._active = previous_driver


def ptxas_report(ptx: str, arch: str, fp_fusion: bool = True) -> dict[str, int]:
    """registers, spill_stores, spill_loads, stack_frame of the kernel in `ptx` from `ptxas -v` (Triton's ptxas,
    Triton's flags). These are what CompiledKernel.n_regs / n_spills report once a GPU has loaded the binary."""
    from triton import knobs

    ptxas = knobs.nvidia.ptxas_blackwell if int(re.sub(r"\D", "", arch) or 0) >= 100 else knobs.nvidia.ptxas
    with tempfile.TemporaryDirectory() as tmp:
        src = os.path.join(tmp, "kernel.ptx")
        with open(src, "w") as f:
            f.write(ptx)
        cmd = [ptxas.path, "-lineinfo", *([] if fp_fusion else ["--fmad=false"]), "-v", f"--gpu-name={arch}", src,
               "-o", os.path.join(tmp, "kernel.cubin")]
        log = subprocess.run(cmd, capture_output=True, text=True, check=True).stderr

    def grab(pattern):
        m = re.search(pattern, log)
        return int(m.group(1)) if m else None

    return dict(registers=grab(r"Used (\d+) registers"), spill_stores=grab(r"(\d+) bytes spill stores"),
                spill_loads=grab(r"(\d+) bytes spill loads"), stack_frame=grab(r"(\d+) bytes stack frame"))


def mma_kind(ptx: str) -> str:
    if "wgmma.mma_async" in ptx:
        return "wgmma"
    if re.search(r"\bmma\.sync\b", ptx):
        return "mma.sync"
    return "none"


def sm90_ctas_per_sm(registers: int | None, num_warps: int, shared: int) -> int | None:
    """CTAs that fit on one H100/H200 SM at once, limited by registers, shared memory and warps (an estimate:
    registers rounded up per warp to the allocation unit; 1 KiB of shared memory reserved per CTA)."""
    if registers is None:
        return None
    per_warp = math.ceil(registers * 32 / SM90_REG_ALLOC_UNIT) * SM90_REG_ALLOC_UNIT
    by_regs = SM90_REGISTERS // (per_warp * num_warps) if per_warp else SM90_MAX_CTAS
    by_smem = SM90_SHARED_PER_SM // (shared + SM90_SHARED_RESERVED_PER_CTA)
    return min(by_regs, by_smem, SM90_MAX_WARPS // num_warps, SM90_MAX_CTAS)


# --- the variants: which wrapper calls to compile ------------------------------------------------------------------

# Everything the public API admits on a GPU (triton_impl.common: GPU_DTYPES, HEAD_DIMS, BLOCK_SIZES), so that a
# block size or head dim added to the validation is compiled here too; the standard shape (D=128, Bs=128) first.
# (float32 runs only under the CPU interpreter: on a GPU the entry points refuse it before any launch.)
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}
HEAD_DIMS = tuple(sorted(common.HEAD_DIMS, reverse=True))
BLOCK_SIZES = (128, *(bs for bs in common.BLOCK_SIZES if bs != 128))
assert set(DTYPES.values()) == set(common.GPU_DTYPES) and 128 in common.BLOCK_SIZES


@dataclass(frozen=True)
class Variant:
    label: str  # what is compiled, e.g. "bf16 D=128 Bs=128"
    entry: str  # the public function that launches it
    call: Callable[[], object]


def _inputs(dtype, head_dim, block_size, *, heads=(32, 4), blocks=16):
    """Small CPU q, k, v with the standard GQA (Hq=32, Hkv=4) and L = 16 blocks: the integer arguments then carry
    the same alignment (multiples of 16) as at benchmark lengths, so Triton specialises them the same way."""
    Hq, Hkv = heads
    L = blocks * block_size
    q = torch.zeros(1, L, Hq, head_dim, dtype=dtype)
    k = torch.zeros(1, L, Hkv, head_dim, dtype=dtype)
    return q, k, torch.zeros_like(k)


def variants(quick: bool = False, dtypes: list[str] | None = None) -> list[Variant]:
    """The wrapper calls to compile: every dtype in `dtypes` (default all), head dim and block size, every public
    entry point. quick: D=128, Bs=128 only (still every kernel and every attention mode)."""
    import reference

    import triton_impl as ti
    from triton_impl.fp8 import FP8_BLOCK_SIZES, block_sparse_attention_fp8

    dtypes = list(DTYPES) if dtypes is None else dtypes
    head_dims = HEAD_DIMS[:1] if quick else HEAD_DIMS
    block_sizes = BLOCK_SIZES[:1] if quick else BLOCK_SIZES
    out: list[Variant] = []

    def add(label, entry, fn, *args, **kwargs):
        out.append(Variant(label, entry, lambda: fn(*args, **kwargs)))

    # Selection reads float32 scores and writes int8 / int32: one variant each, whatever the model's dtype.
    M = 16
    scores = torch.rand(1, 32, M, M).tril()
    mask = scores > 0.5
    add("scores fp32", "select_blocks", ti.select_blocks, scores)
    add("mask i8", "compact_blocks", ti.compact_blocks, mask)
    add("scores fp32", "select_and_compact", ti.select_and_compact, scores)
    for dt in dtypes:
        for D in head_dims:
            for bs in block_sizes:
                q, k, v = _inputs(DTYPES[dt], D, bs)
                M = q.shape[1] // bs
                kbar = torch.zeros(1, M, k.shape[2], D)
                mask = torch.ones(1, q.shape[2], M, M, dtype=torch.bool).tril()
                counts, indices = reference.compact_blocks(mask)
                label = f"{dt} D={D} Bs={bs}"
                add(label, "mean_pool_keys", ti.mean_pool_keys, k, bs)
                add(label, "block_scores", ti.block_scores, q, kbar, bs)
                add(f"{label} physical", "block_sparse_attention", ti.block_sparse_attention, q, k, v, counts,
                    indices, bs)
                add(f"{label} logical", "block_sparse_attention_logical", ti.block_sparse_attention_logical, q, k,
                    v, mask, bs)
                # From 8K tokens on, K/V come through TMA descriptors (these inputs are shorter: forced here).
                add(f"{label} physical TMA", "block_sparse_attention", _with_kv_descriptors,
                    ti.block_sparse_attention, q, k, v, counts, indices, bs)
                add(f"{label} logical TMA", "block_sparse_attention_logical", _with_kv_descriptors,
                    ti.block_sparse_attention_logical, q, k, v, mask, bs)
                # Mean correction (V2, Eq. 6): the means walk after the kept blocks, and the pooling of K and V.
                add(f"{label} physical +mean", "block_sparse_attention", ti.block_sparse_attention, q, k, v, counts,
                    indices, bs, mean_correction=True)
                add(f"{label} logical +mean", "block_sparse_attention_logical", ti.block_sparse_attention_logical,
                    q, k, v, mask, bs, mean_correction=True)
                add(f"{label} physical TMA +mean", "block_sparse_attention", _with_kv_descriptors,
                    ti.block_sparse_attention, q, k, v, counts, indices, bs, mean_correction=True)
                add(f"{label} logical TMA +mean", "block_sparse_attention_logical", _with_kv_descriptors,
                    ti.block_sparse_attention_logical, q, k, v, mask, bs, mean_correction=True)
                if dt == "bf16" and D == 128 and bs == 128:
                    add(f"{label} physical +visits", "block_sparse_attention", ti.block_sparse_attention, q, k, v,
                        counts, indices, bs, return_visits=True)
                    add(f"{label} physical +validate", "block_sparse_attention", ti.block_sparse_attention, q, k, v,
                        counts, indices, bs, validate=True)  # the list check kernel (int32 lists, any dtype)
                    add(f"{label} logical +visits", "block_sparse_attention_logical",
                        ti.block_sparse_attention_logical, q, k, v, mask, bs, return_visits=True)
                if bs == 128:  # dense_attention always uses 128-token blocks
                    add(f"{dt} D={D} dense", "dense_attention", ti.dense_attention, q, k, v)
                    add(f"{dt} D={D} dense TMA", "dense_attention", _with_kv_descriptors, ti.dense_attention, q, k,
                        v)
                add(label, "flash_prefill", ti.flash_prefill, q, k, v, block_size=bs)
                if bs == 128:  # the score stage's Gluon kernel (sm_90, from 32K tokens on): fused and scores only
                    add(f"{label} sm90 scores", "flash_prefill", _with_sm90_scores, ti.flash_prefill, q, k, v)
                    add(f"{label} sm90 scores", "block_scores", _with_sm90_scores, ti.block_scores, q, kbar, bs)
                    q_strided = q.transpose(1, 2).contiguous().transpose(1, 2)  # q by pointers: no TMA descriptor
                    add(f"{label} sm90 scores q strided", "flash_prefill", _with_sm90_scores, ti.flash_prefill,
                        q_strided, k, v)
                # Varlen (the VARLEN mode of every kernel): two sequences, the second a chunk over a prefix.
                cu_q = torch.tensor([0, q.shape[1] // 2, q.shape[1] // 2 + bs], dtype=torch.int32)
                cu_k = torch.tensor([0, q.shape[1] // 2, q.shape[1]], dtype=torch.int32)
                packed = (q[0, : cu_q[-1]], k[0], v[0], cu_q, cu_k, q.shape[1] // 2, q.shape[1] // 2)
                # Every size: pointer loads, and TMA with the means; the standard shape: every mode with both loads.
                modes = [(tma, extras) for tma in (False, True)
                         for extras in ({}, dict(mean_correction=True), dict(return_lse=True),
                                        dict(mean_correction=True, return_lse=True))]
                if not (D == 128 and bs == 128):
                    modes = [modes[0], modes[5]]  # varlen, varlen TMA +mean
                for tma, extras in modes:
                    name = " TMA" * tma + "".join(" +mean" if key == "mean_correction" else " +lse" for key in extras)
                    add(f"{label} varlen{name}", "flash_prefill_varlen", _with_kv_descriptors if tma else _plain_call,
                        ti.flash_prefill_varlen, *packed, block_size=bs, **extras)
                add(f"{label} +mean", "flash_prefill", ti.flash_prefill, q, k, v, block_size=bs, mean_correction=True)
                if bs in FP8_BLOCK_SIZES:  # the e4m3 path: three quantise launches (V transposed) and its walk
                    add(f"{label} fp8", "block_sparse_attention_fp8", block_sparse_attention_fp8, q, k, v, counts,
                        indices, bs)
                    if bs == 128:  # whole-block query tiles, the configuration past FP8_SHORT_MAX_LENGTH tokens
                        add(f"{label} fp8 long", "block_sparse_attention_fp8", _with_long_fp8_config,
                            block_sparse_attention_fp8, q, k, v, counts, indices, bs)
                if dt == "bf16" and D == 128 and bs == 128:  # key_means given: only V is pooled (unsplit, bf16)
                    add(f"{label} physical +mean key_means", "block_sparse_attention", ti.block_sparse_attention, q,
                        k, v, counts, indices, bs, mean_correction=True, key_means=torch.zeros(1, M, k.shape[2], D))
                if dt == "bf16" and D == 128 and bs == 128:  # the int64-offset kernels of 1M-token inputs (TMA there)
                    add(f"{label} int64 offsets", "flash_prefill", _with_wide_offsets, ti.flash_prefill, q, k, v)
                    add(f"{label} int64 offsets TMA", "flash_prefill", _with_wide_offsets, _with_kv_descriptors,
                        ti.flash_prefill, q, k, v)
                    add(f"{label} int64 offsets TMA +mean", "flash_prefill", _with_wide_offsets,
                        _with_kv_descriptors, ti.flash_prefill, q, k, v, mean_correction=True)
                if D == 128 and bs == 128:  # the lse store (return_lse=True) in every mode, both K/V loads
                    for tma, load in (("", _plain_call), (" TMA", _with_kv_descriptors)):
                        add(f"{label} physical{tma} +lse", "block_sparse_attention", load, ti.block_sparse_attention,
                            q, k, v, counts, indices, bs, return_lse=True)
                        add(f"{label} logical{tma} +lse", "block_sparse_attention_logical", load,
                            ti.block_sparse_attention_logical, q, k, v, mask, bs, return_lse=True)
                        add(f"{dt} D={D} dense{tma} +lse", "dense_attention", load, ti.dense_attention, q, k, v,
                            return_lse=True)
                        add(f"{label} physical{tma} +mean +lse", "block_sparse_attention", load,
                            ti.block_sparse_attention, q, k, v, counts, indices, bs, mean_correction=True,
                            return_lse=True)
                    if dt == "bf16":
                        add(f"{label} int64 offsets TMA +mean +lse", "flash_prefill", _with_wide_offsets,
                            _with_kv_descriptors, ti.flash_prefill, q, k, v, mean_correction=True, return_lse=True)
    return out


def _plain_call(fn, *args, **kwargs):
    return fn(*args, **kwargs)


def _with_kv_descriptors(fn, *args, **kwargs):
    """Call fn with the attention kernel fetching K/V through TMA descriptors whatever the length."""
    from triton_impl.attention import ATTENTION_CONFIG

    saved = ATTENTION_CONFIG["kv_descriptors_min_length"]
    try:
        ATTENTION_CONFIG["kv_descriptors_min_length"] = 1
        return fn(*args, **kwargs)
    finally:
        ATTENTION_CONFIG["kv_descriptors_min_length"] = saved


def _with_sm90_scores(fn, *args, **kwargs):
    """Call fn with the score stage on the Gluon kernel of scoring_sm90.py, as on an sm_90 GPU from 32K tokens on."""
    from triton_impl import scoring_sm90

    saved = scoring_sm90.sm90_available, scoring_sm90.SM90_MIN_LENGTH
    try:
        scoring_sm90.sm90_available, scoring_sm90.SM90_MIN_LENGTH = (lambda device: True), 0
        return fn(*args, **kwargs)
    finally:
        scoring_sm90.sm90_available, scoring_sm90.SM90_MIN_LENGTH = saved


def _with_long_fp8_config(fn, *args, **kwargs):
    """Call fn with the FP8 attention kernel launched as for sequences past FP8_SHORT_MAX_LENGTH tokens."""
    from triton_impl import fp8

    saved = fp8.FP8_SHORT_MAX_LENGTH
    try:
        fp8.FP8_SHORT_MAX_LENGTH = 0
        return fn(*args, **kwargs)
    finally:
        fp8.FP8_SHORT_MAX_LENGTH = saved


def _with_wide_offsets(fn, *args, **kwargs):
    """Call fn with every launcher choosing 64-bit offsets, as it does for tensors past 2^31 elements."""
    from triton_impl import attention, pooling, scoring, selection, validation

    modules = (attention, pooling, scoring, selection, validation)
    saved = [m.needs_wide_offsets for m in modules]
    try:
        for m in modules:
            m.needs_wide_offsets = lambda *tensors: True
        return fn(*args, **kwargs)
    finally:
        for m, f in zip(modules, saved):
            m.needs_wide_offsets = f


# --- the report ----------------------------------------------------------------------------------------------------

def _describe(name: str, ck, label: str, entry: str, seconds: float) -> Compiled:
    md = ck.metadata
    arch = f"sm_{md.target.arch}" + ("a" if md.target.arch >= 90 else "")
    res = ptxas_report(ck.asm["ptx"], arch, fp_fusion=getattr(md, "enable_fp_fusion", True))
    fn = ck.src.fn
    constexprs = {fn.arg_names[path[0]]: (v if isinstance(v, (int, float, str, bool)) else str(v))
                  for path, v in ck.src.constants.items()}
    n_spills = None if res["stack_frame"] is None else res["stack_frame"] // 4
    return Compiled(
        kernel=name, n_spills=n_spills, variant=label, entries=[entry], num_warps=md.num_warps, num_stages=md.num_stages,
        shared_bytes=md.shared, mma=mma_kind(ck.asm["ptx"]), signature=dict(ck.src.signature),
        constexprs=constexprs, arch=arch, compile_s=round(seconds, 2),
        ctas_per_sm=sm90_ctas_per_sm(res["registers"], md.num_warps, md.shared) if md.target.arch == 90 else None,
        **res,
    )


def compile_variants(selected: list[Variant], arch: int = 90, log=print) -> tuple[list[Compiled], list[str]]:
    """Compile every variant; returns (one Compiled per unique binary, error messages)."""
    from triton.backends.compiler import GPUTarget

    rows: dict[str, Compiled] = {}
    errors: list[str] = []
    current: list[Variant] = []

    def on_compile(name, ck, seconds):
        variant = current[0]
        if ck.hash in rows:
            if variant.entry not in rows[ck.hash].entries:
                rows[ck.hash].entries.append(variant.entry)
            return
        rows[ck.hash] = _describe(name, ck, variant.label, variant.entry, seconds)

    with compile_only(GPUTarget("cuda", arch, 32), on_compile):
        for i, variant in enumerate(selected, 1):
            current[:] = [variant]
            try:
                variant.call()
            except Exception as e:  # a compile error: report it, go on with the others
                errors.append(f"{variant.entry}({variant.label}): {type(e).__name__}: {e}")
                log(f"[{i}/{len(selected)}] FAILED {variant.entry} {variant.label}\n{traceback.format_exc()}")
            else:
                log(f"[{i}/{len(selected)}] {variant.entry} {variant.label}", end="\r" if sys.stdout.isatty() else "\n")
    return list(rows.values()), errors


def check_limits(rows: list[Compiled]) -> list[str]:
    """Launch-time failures we can see now: shared memory above an SM's per-CTA limit."""
    return [f"{r.kernel} {r.variant}: {r.shared_bytes} B shared memory > {SM90_SHARED_PER_CTA} B per CTA on sm_90"
            for r in rows if r.arch.startswith("sm_90") and r.shared_bytes > SM90_SHARED_PER_CTA]


def format_table(rows: list[Compiled]) -> str:
    header = ["kernel", "variant", "launched by", "warps", "stages", "regs", "n_spills", "spill st/ld B",
              "smem KiB", "CTAs/SM", "MMA"]

    def fmt(x):
        return "?" if x is None else str(x)

    body = [[r.kernel, r.variant, ", ".join(r.entries), r.num_warps, r.num_stages, fmt(r.registers),
             fmt(r.n_spills), f"{fmt(r.spill_stores)}/{fmt(r.spill_loads)}", f"{r.shared_bytes / 1024:.1f}",
             fmt(r.ctas_per_sm), r.mma] for r in rows]
    widths = [max(len(str(x)) for x in col) for col in zip(header, *body)]
    lines = ["  ".join(str(x).ljust(w) for x, w in zip(row, widths)).rstrip() for row in [header, *body]]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def preflight() -> str | None:
    """Why this machine cannot compile for an NVIDIA target, or None if it can."""
    try:
        import triton
        from triton import knobs
        from triton.backends import backends
    except Exception as e:  # noqa: BLE001
        return f"triton does not import: {e}"
    if "nvidia" not in backends:
        return f"triton {triton.__version__} has no NVIDIA backend (backends: {sorted(backends)})"
    try:
        path = knobs.nvidia.ptxas.path
        subprocess.run([path, "--version"], capture_output=True, check=True, timeout=60)
    except Exception as e:  # noqa: BLE001
        return f"no working ptxas: {type(e).__name__}: {e}"
    return None


def _rerun_without_interpreter() -> int:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    return subprocess.call([sys.executable, "-m", "tools.hopper_compile", *sys.argv[1:]], env=env)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tools.hopper_compile", description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="D=128, Bs=128 only (every kernel and mode)")
    parser.add_argument("--dtypes", default=",".join(DTYPES),
                        help=f"comma-separated q/k/v dtypes to compile for (default {','.join(DTYPES)})")
    parser.add_argument("--arch", type=int, default=90, help="CUDA compute capability to compile for (default 90)")
    parser.add_argument("--only", default="", help="compile only variants whose kernel entry or label contains this")
    parser.add_argument("--json", help="also write the report to this JSON file")
    args = parser.parse_args(argv)

    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        # The kernels would be interpreter objects; compile in a process that imports triton without it.
        print("TRITON_INTERPRET is set: re-running without it", flush=True)
        return _rerun_without_interpreter()
    reason = preflight()
    if reason:
        print(f"SKIP: cannot compile for sm_{args.arch} on this machine: {reason}")
        return CANNOT_COMPILE_HERE
    torch.set_num_threads(1)  # the inputs are tiny; threads only cost wake-ups

    import triton

    start = time.perf_counter()
    dtypes = [d.strip() for d in args.dtypes.split(",") if d.strip()]
    unknown = sorted(set(dtypes) - set(DTYPES))
    if unknown:
        parser.error(f"unknown dtypes {unknown}; choose from {list(DTYPES)}")
    selected = [v for v in variants(args.quick, dtypes) if args.only in f"{v.entry} {v.label}"]
    rows, errors = compile_variants(selected, args.arch)
    covered = {r.kernel for r in rows}
    if not args.only:  # every kernel must have been compiled at least once
        errors += [f"{name}: no variant launches this kernel (add one to tools/hopper_compile.py)"
                   for name in jit_kernels() if name not in covered]
    errors += check_limits(rows)
    elapsed = time.perf_counter() - start

    print(f"\nTriton {triton.__version__} kernels of triton_impl compiled for sm_{args.arch} "
          f"(no GPU needed): {len(rows)} binaries from {len(selected)} wrapper calls in {elapsed:.1f} s")
    print(format_table(rows))
    print("regs, n_spills: from ptxas -v, what CompiledKernel.n_regs / n_spills report on a GPU (n_spills = stack"
          " frame in 4-byte words); spill st/ld: ptxas, bytes per thread; smem: metadata.shared; CTAs/SM: H100/H200"
          " estimate; MMA: wgmma = Hopper tensor cores, mma.sync = Ampere-style, none = FMA")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(triton=triton.__version__, arch=args.arch, seconds=round(elapsed, 1), errors=errors,
                           kernels=[asdict(r) for r in rows]), f, indent=1)
    if errors:
        print("\nFAILED:\n  " + "\n  ".join(errors))
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
