"""Reference vs Triton, stage by stage, on a few small structured inputs: a fast check for run_all.sh.

    python -m repro.check_triton [--out-dir DIR] [--device cpu|cuda]

Runs every stage of `reference` and `triton_impl` on planted-pattern Q/K/V (`reference.synthetic.planted_qkv`:
sinks, local decay, slashes, stripes; **synthetic**) and compares them. On a machine without CUDA the kernels run
under the Triton interpreter (TRITON_INTERPRET=1, set here before triton is imported) in float32/float16 at small
sizes (the interpreter computes bfloat16 dots wrongly, triton-lang/triton#11584); on a GPU natively in
bfloat16/float16 at larger sizes. Criteria (docs/DESIGN.md section 4):

    kbar, scores              max |triton - reference| <= atol + rtol |reference| (1e-5/1e-5 and 1e-6/1e-4)
    select / compact          identical block sets; on their own scores, differences only at threshold ties
                              (|Score - alpha max| <= 1e-4 max), at most 1% of the blocks + 1
    attention outputs         FlashAttention's rule on the same block set: max |out - ref64| <= 2 max |pt - ref64|
                              + 1e-5, ref64 = float64 oracle, pt = PyTorch in the input's own precision
    visits                    physical = counts, logical = I + 1, both equal to the reference's

Prints a table and writes triton_check.md into --out-dir (default: the run folder
repro/runs/<date>-<device>/triton_check/; the committed ones are in repro/results/triton_check/); exits 1 if any
row FAILs. Every Triton output buffer starts as NaN / -1 (triton_impl.common.POISON_OUTPUTS), so an element a
kernel forgot to write fails.
"""

from __future__ import annotations

import os

import torch

if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"  # before triton is imported anywhere

import argparse  # noqa: E402
import math  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from dataclasses import dataclass  # noqa: E402
from pathlib import Path  # noqa: E402

import reference  # noqa: E402
import triton_impl  # noqa: E402
import triton_impl.common  # noqa: E402
from reference import lists_to_mask  # noqa: E402
from reference.synthetic import planted_qkv  # noqa: E402
from tools import oracle  # noqa: E402
from tools.oracle import TIE_TOLERANCE, block_set_differences, block_sets_agree, list_mismatch, max_abs_diff  # noqa: E402

from .common import default_device, environment_stamp, markdown_table, run_dir, stamp_line  # noqa: E402


@dataclass(frozen=True)
class Case:
    B: int
    L: int
    Hq: int
    Hkv: int
    D: int
    block_size: int
    dtype: torch.dtype
    alpha: float
    seed: int = 0

    @property
    def name(self) -> str:
        dt = str(self.dtype).replace("torch.", "")
        return (f"B{self.B} L{self.L} Hq{self.Hq}/Hkv{self.Hkv} D{self.D} Bs{self.block_size} {dt} "
                f"alpha {self.alpha}")


# Odd lengths (partial last blocks), batch 1-2, GQA groups 1, 4, 7 (8 on the GPU), head dims 64 and 128.
CPU_CASES = [  # small: the interpreter runs every Triton program in Python
    Case(1, 1000, 4, 1, 64, 64, torch.float32, 0.12, seed=1),
    Case(1, 333, 7, 1, 64, 16, torch.float16, 0.1, seed=2),
    Case(2, 520, 2, 2, 128, 32, torch.float16, 0.18, seed=3),
]
GPU_CASES = [
    Case(1, 16384, 32, 4, 128, 128, torch.bfloat16, 0.12, seed=1),
    Case(2, 8191, 28, 4, 64, 128, torch.float16, 0.1, seed=2),
    Case(1, 4097, 8, 1, 128, 64, torch.bfloat16, 0.18, seed=3),
]


@dataclass
class Row:
    case: str
    stage: str
    diff: float | None  # max |triton - reference|
    criterion: str
    blocks: str = ""  # "identical" / "differ" / ""
    ties: str = ""
    ok: bool = True


def close(a, ref, rtol, atol) -> bool:
    excess = (a.double() - ref.double()).abs() - (atol + rtol * ref.double().abs())
    return not a.isnan().any() and bool((excess <= 0).all())


def compare_block_sets(mask, ref_mask, ref_scores, alpha) -> tuple[bool, str, str]:
    """(ok, blocks, ties): identical except at threshold ties, and few of those."""
    n, off_tie = block_set_differences(mask, ref_mask, ref_scores, alpha)
    if n == 0:
        return True, "identical", "0"
    ok = block_sets_agree(mask, ref_mask, ref_scores, alpha)
    return ok, "differ", f"{n - off_tie}" + (f" (+{off_tie} off a tie)" if off_tie else "")


def flash_rule(out, q, k, v, block_mask, block_size) -> tuple[bool, str]:
    ok, err, pt_err = oracle.flash_rule(out, q, k, v, block_mask, block_size)
    slack = f"{oracle.FLASH_RULE_SLACK:g}".replace("e-0", "e-")  # "1e-5"
    return ok, f"fp64 err {err:.2g} {'<=' if ok else 'NOT <='} {oracle.FLASH_RULE_FACTOR:g} x {pt_err:.2g} + {slack}"


@torch.no_grad()
def check_case(c: Case, device: str) -> list[Row]:
    ref, tri = reference, triton_impl
    q, k, v = planted_qkv(c.B, c.L, c.Hq, c.Hkv, c.D, seed=c.seed, dtype=c.dtype, device=device)
    bs, alpha = c.block_size, c.alpha
    net = dict(sink_blocks=2, window_blocks=4, last_dense_blocks=2)
    rows: list[Row] = []

    def add(stage, diff, criterion, ok, blocks="", ties=""):
        rows.append(Row(c.name, stage, diff, criterion, blocks, ties, bool(ok)))

    # 1. mean proxy
    kbar_ref, kbar = ref.mean_pool_keys(k, bs), tri.mean_pool_keys(k, bs)
    add("mean_pool_keys", max_abs_diff(kbar, kbar_ref), "rtol 1e-5, atol 1e-5", close(kbar, kbar_ref, 1e-5, 1e-5))

    # 2. block scores (both from the reference kbar, so that only this stage is compared)
    scores_ref, scores = ref.block_scores(q, kbar_ref, bs), tri.block_scores(q, kbar_ref, bs)
    add("block_scores", max_abs_diff(scores, scores_ref), "rtol 1e-4, atol 1e-6", close(scores, scores_ref, 1e-4, 1e-6))

    # 3. threshold: on the same scores exactly; on each implementation's own scores up to ties
    mask_ref = ref.select_blocks(scores_ref, alpha, **net)
    same = torch.equal(tri.select_blocks(scores_ref, alpha, **net), mask_ref)
    add("select_blocks (same scores)", None, "identical", same, "identical" if same else "differ", "-")
    own = tri.select_blocks(scores, alpha, **net)
    ok, blocks, ties = compare_block_sets(own, mask_ref, scores_ref, alpha)
    add("select_blocks (own scores)", None, "identical up to ties", ok, blocks, ties)

    # 4. compaction, and the fused select + compact of flash_prefill
    counts_ref, indices_ref = ref.compact_blocks(mask_ref)
    counts, indices = tri.compact_blocks(mask_ref)
    same = not list_mismatch(counts, indices, mask_ref)
    add("compact_blocks", None, "identical lists", same, "identical" if same else "differ", "-")
    f_counts, f_indices = tri.select_and_compact(scores, alpha, **net)
    listed_ok = torch.equal(f_counts, lists_to_mask(f_counts, f_indices).sum(-1, dtype=torch.int32))
    ok, blocks, ties = compare_block_sets(lists_to_mask(f_counts, f_indices), mask_ref, scores_ref, alpha)
    add("select_and_compact (own scores)", None, "identical up to ties", ok and listed_ok, blocks, ties)

    # 5. attention on the reference's block set: physical and logical skip, their visits, dense
    out_ref, visits_ref = ref.block_sparse_attention(q, k, v, counts_ref, indices_ref, bs, return_visits=True)
    log_ref, log_visits_ref = ref.block_sparse_attention_logical(q, k, v, mask_ref, bs, return_visits=True)
    out, visits = tri.block_sparse_attention(q, k, v, counts_ref, indices_ref, bs, return_visits=True)
    log, log_visits = tri.block_sparse_attention_logical(q, k, v, mask_ref, bs, return_visits=True)
    ok, crit = flash_rule(out, q, k, v, mask_ref, bs)
    add("block_sparse_attention (physical)", max_abs_diff(out, out_ref), crit, ok)
    ok, crit = flash_rule(log, q, k, v, mask_ref, bs)
    add("block_sparse_attention_logical", max_abs_diff(log, log_ref), crit, ok)
    ok = torch.equal(visits, visits_ref) and torch.equal(log_visits, log_visits_ref) and torch.equal(visits, counts_ref)
    add("visits (physical / logical)", None,
        f"{int(visits.sum())} / {int(log_visits.sum())} = reference's {int(visits_ref.sum())} / "
        f"{int(log_visits_ref.sum())}", ok)
    dense_ref, dense = ref.dense_attention(q, k, v), tri.dense_attention(q, k, v)
    M128 = -(-c.L // 128)
    full = torch.ones(M128, M128, dtype=torch.bool, device=device).tril().expand(c.B, c.Hq, M128, M128)
    ok, crit = flash_rule(dense, q, k, v, full, 128)
    add("dense_attention", max_abs_diff(dense, dense_ref), crit, ok)

    # 6. end to end: the block set flash_prefill chose, and exact attention over it
    fp_ref, st_ref = ref.flash_prefill(q, k, v, alpha=alpha, block_size=bs, return_stats=True, **net)
    fp, st = tri.flash_prefill(q, k, v, alpha=alpha, block_size=bs, return_stats=True, **net)
    fp_mask = lists_to_mask(st.counts, st.indices)
    ok_sets, blocks, ties = compare_block_sets(fp_mask, lists_to_mask(st_ref.counts, st_ref.indices),
                                               ref.block_scores(q, ref.mean_pool_keys(k, bs), bs), alpha)
    ok, crit = flash_rule(fp, q, k, v, fp_mask, bs)
    add("flash_prefill", max_abs_diff(fp, fp_ref),
        f"{crit}; density {float(st.density):.1%} (ref {float(st_ref.density):.1%})", ok and ok_sets, blocks, ties)
    return rows


def fmt(x: float | None) -> str:
    return "-" if x is None else f"{x:.2e}"


def write_markdown(path: Path, rows: list[Row], cases: list[Case], stamp: dict, mode: str, seconds: float) -> None:
    failed = [r for r in rows if not r.ok]
    lines = [
        "# Reference vs Triton, stage by stage (`python -m repro.check_triton`)",
        "",
        stamp_line(stamp),
        "",
        f"Kernels run {mode}. Inputs: **synthetic** `planted_qkv` (sinks, local decay, slashes, stripes), "
        "safety net sink 2 / window 4 / last-dense 2 blocks. Attention stages run on the reference's block set; "
        "`flash_prefill` on its own. Criteria in the module docstring (FlashAttention's 2x rule for outputs; "
        f"threshold ties: |Score - alpha max| <= {TIE_TOLERANCE:g} max).",
        "",
        f"**{'FAIL' if failed else 'PASS'}**: {len(rows) - len(failed)} of {len(rows)} checks pass "
        f"({len(cases)} cases, {seconds:.0f} s).",
        "",
    ]
    for c in cases:
        lines += [f"## {c.name}", ""]
        lines.append(markdown_table(
            ["stage", "max abs diff", "block sets", "ties", "result", "criterion"],
            [[r.stage, fmt(r.diff), r.blocks or "-", r.ties or "-", "PASS" if r.ok else "**FAIL**", r.criterion]
             for r in rows if r.case == c.name]))
        lines.append("")
    path.write_text("\n".join(lines))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out-dir", type=Path, default=None,
                        help="(default: the run folder repro/runs/<date>-<device>/triton_check/)")
    parser.add_argument("--device", default=default_device(), choices=["cpu", "cuda"])
    args = parser.parse_args(argv)
    if args.device == "cpu":
        if not triton_impl.common.interpreting():
            parser.error("--device cpu needs the Triton interpreter: run without CUDA or with TRITON_INTERPRET=1")
        torch.set_num_threads(1)  # small tensors: thread wake-ups cost more than they save on a small VM
    cases = GPU_CASES if args.device == "cuda" else CPU_CASES
    mode = "natively on the GPU" if args.device == "cuda" else "under the Triton interpreter on the CPU"
    stamp = environment_stamp(args.device)
    print(f"reference vs triton_impl, kernels {mode}; {stamp['device_name']}")

    triton_impl.common.POISON_OUTPUTS = True
    start = time.perf_counter()
    rows: list[Row] = []
    for c in cases:
        t = time.perf_counter()
        rows += check_case(c, args.device)
        print(f"  {c.name}: {time.perf_counter() - t:.1f} s", flush=True)
    seconds = time.perf_counter() - start

    header = ["stage", "max abs diff", "block sets", "ties", "result", "criterion"]
    for c in cases:
        body = [[r.stage, fmt(r.diff), r.blocks or "-", r.ties or "-", "PASS" if r.ok else "FAIL", r.criterion]
                for r in rows if r.case == c.name]
        widths = [max(len(str(x)) for x in col) for col in zip(header, *body)]
        print(f"\n{c.name}")
        for i, line in enumerate([header, *body]):
            print("  " + "  ".join(str(x).ljust(w) for x, w in zip(line, widths)).rstrip())
            if i == 0:
                print("  " + "  ".join("-" * w for w in widths))
    args.out_dir = args.out_dir or run_dir("triton_check", args.device)
    args.out_dir.mkdir(parents=True, exist_ok=True)
    out = args.out_dir / "triton_check.md"
    write_markdown(out, rows, cases, stamp, mode, seconds)
    failed = [r for r in rows if not r.ok]
    print(f"\n{'FAIL' if failed else 'PASS'}: {len(rows) - len(failed)}/{len(rows)} checks in {seconds:.1f} s; "
          f"wrote {out}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
