"""The Triton kernels compile for Hopper (sm_90) with the real compiler, on any machine (no GPU needed).

The CPU tests run the kernels under the interpreter, which accepts code the compiler rejects (for example a kernel
reading a global that is not a tl.constexpr). `python -m tools.hopper_compile` compiles every kernel exactly
as the Python wrappers launch it; here it runs for every dtype, head dim and block size the public API admits on
a GPU (bf16, fp16; triton_impl.common) and every attention mode (with and without the mean correction; with the
lse store of return_lse=True at the standard shape), in a subprocess without TRITON_INTERPRET
(this process has it set, see conftest.py), and checks shared memory against an H200's limit. Skipped, with the
tool's reason, where Triton has no NVIDIA backend or no working ptxas. Registers, spills and shared memory reported
this way matched a native launch on an H200.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
CANNOT_COMPILE_HERE = 3  # tools.hopper_compile's exit status when this machine cannot compile for sm_90
DTYPES = ("bf16", "fp16")  # every dtype the kernels admit on a GPU (triton_impl.common.GPU_DTYPES)


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    out = tmp_path_factory.mktemp("hopper_compile") / "report.json"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))
    result = subprocess.run(
        [sys.executable, "-m", "tools.hopper_compile", "--dtypes", ",".join(DTYPES), "--json", str(out)],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=600,
    )
    if result.returncode == CANNOT_COMPILE_HERE:
        pytest.skip(result.stdout.strip().splitlines()[-1])
    assert result.returncode == 0, f"hopper_compile failed:\n{result.stdout[-6000:]}\n{result.stderr[-6000:]}"
    return json.loads(out.read_text())


def rows(report, kernel, dtype=None):
    found = [r for r in report["kernels"]
             if r["kernel"] == kernel and (dtype is None or r["variant"].startswith(dtype))]
    assert found, f"no {kernel} {dtype or ''} in the report"
    return found


def test_every_kernel_compiles_for_sm90(report):
    assert not report["errors"]
    assert report["arch"] == 90
    names = {r["kernel"] for r in report["kernels"]}
    assert {"_mean_pool_kernel", "_block_scores_kernel", "_select_kernel", "_compact_kernel",
            "_select_compact_kernel", "_attention_kernel", "_check_lists_kernel"} <= names


@pytest.mark.parametrize("dtype", DTYPES)
def test_every_block_size_and_head_dim_the_api_admits_is_compiled(report, dtype):
    """Each (block size, head dim) that triton_impl's validation lets through reaches the compiler for each kernel
    that depends on them, in every attention mode: a size added to the validation without a compiled (and so
    shared-memory-checked) variant fails here."""
    from triton_impl.common import BLOCK_SIZES, HEAD_DIMS

    def compiled(kernel, **constexprs):
        return {(r["constexprs"]["D"], r["constexprs"]["BLOCK_SIZE"]) for r in rows(report, kernel, dtype)
                if all(r["constexprs"].get(k) == v for k, v in constexprs.items())}

    wanted = {(D, bs) for D in HEAD_DIMS for bs in BLOCK_SIZES}
    assert compiled("_mean_pool_kernel", POOL_V=False) >= wanted
    assert compiled("_mean_pool_kernel", POOL_V=True) >= wanted  # K and V in one pass (mean correction)
    assert compiled("_block_scores_kernel") >= wanted
    for mode in (0, 1):  # physical, logical
        for mean_correction in (False, True):
            assert compiled("_attention_kernel", MODE=mode, MEAN_CORRECTION=mean_correction) >= wanted


def test_shared_memory_fits_an_h200_sm(report):
    """Every compiled variant asks for at most the 227 KiB of shared memory an sm_90 CTA may use (232448 bytes, the
    limit Triton's OutOfResources error quotes on an H200); the interpreter checks none of this."""
    too_big = [(r["kernel"], r["variant"], r["shared_bytes"]) for r in report["kernels"]
               if r["shared_bytes"] > 232448]
    assert too_big == []


@pytest.mark.parametrize("dtype", ["bf16", "fp16"])
def test_attention_compiles_with_both_kv_loads(report, dtype):
    """K/V through TMA descriptors (the default from 8K tokens) and through pointer loads, in every mode; with the
    mean correction, the means the same way as K/V."""
    tiles = rows(report, "_attention_kernel", dtype)
    for tma in (False, True):
        assert {r["constexprs"]["MODE"] for r in tiles if r["constexprs"]["KV_DESCRIPTORS"] == tma} == {0, 1, 2}
        assert {r["constexprs"]["MODE"] for r in tiles if r["constexprs"]["MEAN_CORRECTION"]
                and r["constexprs"]["MEAN_DESCRIPTORS"] == tma == r["constexprs"]["KV_DESCRIPTORS"]} == {0, 1}


@pytest.mark.parametrize("dtype", ["bf16", "fp16"])
def test_attention_uses_wgmma(report, dtype):
    """Every attention mode at the default block size (128) runs its dots on Hopper's warpgroup MMA."""
    tiles = [r for r in rows(report, "_attention_kernel", dtype) if r["constexprs"]["BLOCK_SIZE"] == 128]
    assert {r["constexprs"]["MODE"] for r in tiles} == {0, 1, 2}  # physical, logical, dense
    assert [r["variant"] for r in tiles if r["mma"] != "wgmma"] == []


@pytest.mark.parametrize("dtype", ["bf16", "fp16"])
def test_block_scores_use_wgmma(report, dtype):
    assert [r["variant"] for r in rows(report, "_block_scores_kernel", dtype) if r["mma"] != "wgmma"] == []


def test_block_scores_fit_the_register_cap_without_spilling(report):
    """At block sizes <= 128 without 64-bit offsets the score kernel launches with maxnreg=128, so that four CTAs
    share an SM (triton_impl.scoring._register_cap): there it must hold 128 registers and spill nothing; with 64-bit
    offsets it runs uncapped and must not spill either."""
    found = [r for r in rows(report, "_block_scores_kernel") if r["constexprs"]["BLOCK_SIZE"] <= 128]
    assert any(not r["constexprs"]["WIDE"] for r in found) and any(r["constexprs"]["WIDE"] for r in found)
    for row in found:
        assert row["spill_stores"] == 0 and row["spill_loads"] == 0, row["variant"]
        assert row["constexprs"]["WIDE"] or row["registers"] <= 128, (row["variant"], row["registers"])


def test_standard_shape_attention_does_not_spill(report):
    """bf16, D=128, Bs=128 (the benchmark shape): the physical-skip kernel, with TMA or pointer K/V loads, keeps
    everything in registers."""
    found = [r for r in rows(report, "_attention_kernel", "bf16 D=128 Bs=128 physical")
             if "visits" not in r["variant"] and "+mean" not in r["variant"] and "+lse" not in r["variant"]]
    assert len(found) == 2  # pointer loads, TMA
    for row in found:
        assert row["registers"] is not None and row["registers"] <= 255
        assert row["spill_stores"] == 0 and row["spill_loads"] == 0, row


def test_standard_shape_mean_correction_does_not_spill(report):
    """The same with the mean correction (the means walk after the list walk): at the register limit (255; one CTA
    per SM anyway, shared memory allows no second) but no spills, with pointer or TMA loads (repro/NOTES.md)."""
    found = [r for r in rows(report, "_attention_kernel", "bf16 D=128 Bs=128 physical")
             if "+mean" in r["variant"] and "+lse" not in r["variant"]]
    assert len(found) == 2  # pointer loads, TMA
    for row in found:
        assert row["constexprs"]["MEAN_CORRECTION"] and row["constexprs"]["MEAN_CHUNK"] == 128
        assert row["registers"] is not None and row["registers"] <= 255
        assert row["spill_stores"] == 0 and row["spill_loads"] == 0, row


def test_standard_shape_varlen_does_not_spill(report):
    """flash_prefill_varlen's attention kernel (VARLEN) at the standard shape, in every mode it runs (plain, means,
    lse, both; pointer and TMA K/V loads): no spills, the bar the one-sequence kernel meets."""
    for dtype in DTYPES:
        found = [r for r in rows(report, "_attention_kernel", f"{dtype} D=128 Bs=128 varlen")
                 if r["constexprs"]["VARLEN"]]
        assert len(found) == 8, [r["variant"] for r in found]  # 4 modes x 2 loads
        for row in found:
            assert row["mma"] == "wgmma", row["variant"]
            assert row["registers"] is not None and row["registers"] <= 255, row["variant"]
            assert row["spill_stores"] == 0 and row["spill_loads"] == 0, (row["variant"], row["spill_stores"])


def test_lse_variants_compile_use_wgmma_and_do_not_spill(report):
    """return_lse=True (STORE_LSE) in every mode and with both K/V loads, with and without the mean correction, and
    with 64-bit offsets: compiles for sm_90, fits shared memory, keeps its dots on wgmma, and spills nothing with
    32-bit offsets (the store is a few instructions after the loop: m_i and l_i are live there anyway)."""
    tiles = [r for r in report["kernels"] if r["kernel"] == "_attention_kernel" and r["variant"].endswith("+lse")]
    assert tiles and all(r["constexprs"]["STORE_LSE"] for r in tiles)
    for dtype in DTYPES:
        mine = [r for r in tiles if r["variant"].startswith(dtype)]
        for tma in (False, True):
            assert {r["constexprs"]["MODE"] for r in mine if r["constexprs"]["KV_DESCRIPTORS"] == tma} == {0, 1, 2}
    assert any(r["constexprs"]["WIDE"] and r["constexprs"]["MEAN_CORRECTION"] for r in tiles)
    for row in tiles:
        assert row["mma"] == "wgmma", row["variant"]
        assert row["registers"] is not None and row["registers"] <= 255, row["variant"]
        if not row["constexprs"]["WIDE"]:  # the int64-offset kernel with the means spills with or without the lse
            assert row["spill_stores"] == 0 and row["spill_loads"] == 0, (row["variant"], row["spill_stores"])
