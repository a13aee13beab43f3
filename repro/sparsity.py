"""Block density of FlashPrefill vs FlexPrefill vs XAttention on the same inputs, with selection time and
attention-output error (the paper's sparsity comparison: 3.5% / 8.4% / 18.5% at 256K).

    python -m repro.sparsity [--lengths 4096 ...] [--real-lengths 1024 ...] [--device cpu|cuda] [--no-match]
                             [--synthetic-only] [--tag NAME] [--out-dir DIR]

Selectors (all in this repo, same list format, same sparse attention):
  FlashPrefill  stages 1-4 (mean_pool_keys, block_scores, select_blocks + compact_blocks), V1 safety net (sink 2,
                window 4, last-dense 2 blocks), alpha 0.12 (the V1 default, Qwen3-30B-A3B, the model of the paper's
                256K density figure) and alpha 0.1 (the V2 paper's setting). Two implementations:
                * "Triton kernels": triton_impl.mean_pool_keys, block_scores, select_and_compact (the selection
                  triton_impl.flash_prefill runs before its attention), the timed FlashPrefill selector on a GPU
                  (and on a CPU under TRITON_INTERPRET=1, for dry runs);
                * "reference stages": the readable PyTorch stages of `reference`, alpha 0.12 only when the Triton
                  rows run (a second, separately labelled row; its density must equal the Triton one), both alphas
                  otherwise.
  FlexPrefill   `reference.peers.flexprefill_select`, paper defaults gamma 0.9, tau 0.1, min_budget 1024 tokens;
  XAttention    `reference.peers.xattention_select`, paper defaults threshold 0.9, stride 8.
                The peers exist in PyTorch only (written by us from the papers; no Triton version here).
Block size 128 everywhere.

Inputs:
  (a) real: SmolLM2-135M q/k/v dumps (repro/activations/, a NIAH prompt, 5 layers, Hq=9, Hkv=3, D=64), truncated
      to each length of --real-lengths (a causal prefix of real activations is the prefix prompt's activations).
      Skipped, with a message, when the dumps are absent (python -m repro.dump_activations makes them) or with
      --synthetic-only. FlashPrefill runs the reference stages here on every device.
  (b) synthetic: `reference.synthetic.planted_qkv` (sinks, local decay, slashes, vertical stripes; **synthetic**,
      no model), B=1, CPU Hq=8 Hkv=2 D=64 float32 / GPU Hq=32 Hkv=4 D=128 bfloat16, lengths --lengths.

Measured: density = kept causal blocks / all causal blocks over heads (and layers), from the lists the timed
selector returned; selection time = one untimed warm-up call, then the median of --repeats calls (CUDA: each call
between two CUDA events; CPU: wall clock, one thread); on CUDA, the peak memory one call allocates beyond its
inputs. On the real activations, the relative error ||O_sparse - O_dense||_F / ||O_dense||_F of
reference.block_sparse_attention with each selector's lists against reference.dense_attention. "Error-matched"
(unless --no-match): at the longest real length, each peer's parameter is swept and the sparsest setting whose
error is <= FlashPrefill's error at alpha 0.12 is reported. This matches attention-output error, not task accuracy.

Where the Triton and reference FlashPrefill rows both run, their densities must agree to 1e-3: the run fails
otherwise (after writing the CSV, for diagnosis).

Writes <out-dir>/<tag>.csv (long format), <tag>.md, <tag>_density.png and, with real activations, <tag>_error.png;
--out-dir defaults to the run folder repro/runs/<date>-<device>/sparsity/ (the committed runs are in
repro/results/sparsity/). The tag defaults to "sparsity" on a CPU and "sparsity_<gpu>" (e.g. sparsity_h200) on
CUDA, so the results of different machines never overwrite each other.
"""

from __future__ import annotations

import argparse
import math
import statistics
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import matplotlib
import torch
from matplotlib.figure import Figure
from tqdm import tqdm

import triton_impl
from reference import (block_scores, block_sparse_attention, causal_block_density, compact_blocks, dense_attention,
                       mean_pool_keys, select_blocks)
from reference.peers import flexprefill_select, xattention_select
from reference.synthetic import planted_qkv
from triton_impl.common import interpreting

from .common import default_device, device_slug, environment_stamp, markdown_table, run_dir, stamp_line, write_long_csv
from .paper import PAPER_DENSITY_256K

CPU_LENGTHS = [4096, 8192, 16384, 32768, 65536]
GPU_LENGTHS = [4096, 8192, 16384, 32768, 65536, 131072, 262144]
REAL_LENGTHS = [1024, 2048, 4096, 8192]
CPU_SHAPE = dict(q_heads=8, kv_heads=2, head_dim=64)
GPU_SHAPE = dict(q_heads=32, kv_heads=4, head_dim=128)  # docs/DESIGN.md's standard shape (Qwen3-30B-A3B)
BLOCK = 128
SAFETY_NET = dict(sink_blocks=2, window_blocks=4, last_dense_blocks=2)
SYNTHETIC = "synthetic planted_qkv"
DENSITY_TOLERANCE = 1e-3  # Triton vs reference FlashPrefill density (they differ only at exact threshold ties)
# Sweeps for the error matching (each peer's own knob; the paper default is in each grid).
MATCH_GRID = {
    "FlashPrefill": ("alpha", [0.02, 0.05, 0.08, 0.1, 0.12, 0.18, 0.3]),
    "FlexPrefill": ("gamma", [0.8, 0.85, 0.9, 0.95, 0.98, 0.99, 0.995]),
    "XAttention": ("threshold", [0.5, 0.7, 0.8, 0.9, 0.95, 0.98, 0.99]),
}
# Which code computed a row's lists (the `impl` column).
REFERENCE = "reference stages (PyTorch)"
TRITON = "Triton kernels"
PYTORCH = "PyTorch (ours; no Triton version)"


@dataclass(frozen=True)
class Setting:
    selector: str
    param: str
    value: float
    label: str
    impl: str

    def select(self, q, k):
        return SELECT[self.selector, self.impl](q, k, **{self.param: self.value})


def flashprefill_lists(q, k, alpha: float = 0.12):
    scores = block_scores(q, mean_pool_keys(k, BLOCK), BLOCK)
    return compact_blocks(select_blocks(scores, alpha, **SAFETY_NET))


def flashprefill_lists_triton(q, k, alpha: float = 0.12):
    """The same selection with the Triton kernels (public entry points, input checks included)."""
    scores = triton_impl.block_scores(q, triton_impl.mean_pool_keys(k, BLOCK), BLOCK)
    return triton_impl.select_and_compact(scores, alpha, **SAFETY_NET)


SELECT: dict[tuple[str, str], Callable] = {
    ("FlashPrefill", REFERENCE): flashprefill_lists,
    ("FlashPrefill", TRITON): flashprefill_lists_triton,
    ("FlexPrefill", PYTORCH): lambda q, k, gamma=0.9: flexprefill_select(q, k, gamma=gamma, tau=0.1, min_budget=1024,
                                                                          block_size=BLOCK),
    ("XAttention", PYTORCH): lambda q, k, threshold=0.9: xattention_select(q, k, threshold=threshold, stride=8,
                                                                            block_size=BLOCK),
}
PEER_SETTINGS = [
    Setting("FlexPrefill", "gamma", 0.9, "FlexPrefill gamma=0.9 tau=0.1 (paper default)", PYTORCH),
    Setting("XAttention", "threshold", 0.9, "XAttention tau=0.9 S=8 (paper default)", PYTORCH),
]
# Without Triton (a CPU without the interpreter; always on the real activations): the reference stages.
DEFAULT_SETTINGS = [
    Setting("FlashPrefill", "alpha", 0.12, "FlashPrefill alpha=0.12 (V1 default)", REFERENCE),
    Setting("FlashPrefill", "alpha", 0.1, "FlashPrefill alpha=0.1 (V2 paper)", REFERENCE),
    *PEER_SETTINGS,
]
# With Triton (CUDA, or the interpreter): Triton is the timed FlashPrefill; the reference stages stay as a separately
# labelled row at alpha 0.12, for their time and as the density cross-check.
TRITON_SETTINGS = [
    Setting("FlashPrefill", "alpha", 0.12, "FlashPrefill alpha=0.12 (V1 default)", TRITON),
    Setting("FlashPrefill", "alpha", 0.1, "FlashPrefill alpha=0.1 (V2 paper)", TRITON),
    Setting("FlashPrefill", "alpha", 0.12, "FlashPrefill alpha=0.12 (V1 default), reference stages", REFERENCE),
    *PEER_SETTINGS,
]
COLORS = {"FlashPrefill": "tab:blue", "FlexPrefill": "tab:orange", "XAttention": "tab:green"}


def impl_of(row) -> str:
    """A row's implementation; CSVs written before the `impl` column ran FlashPrefill's reference stages."""
    return row.get("impl") or (REFERENCE if row["selector"] == "FlashPrefill" else PYTORCH)


def line_style(label: str) -> str:
    """Dashed for the V2 alpha, dotted crosses for the reference-stages twin of a Triton row."""
    return "x:" if label.endswith("reference stages") else "o--" if "V2" in label else "o-"


def output_tag(stamp) -> str:
    """File stem: "sparsity" on a CPU, "sparsity_<gpu>" on CUDA ("NVIDIA H200" -> sparsity_h200, the GPU slug of
    the run folders and of bench_speed), so results of different machines never overwrite each other."""
    if stamp["device"] != "cuda":
        return "sparsity"
    return "sparsity_" + device_slug(stamp["device_name"])


def measure_call(fn, device, repeats: int):
    """(result of an untimed warm-up call, median ms of `repeats` more calls, peak MiB of the warm-up call).

    The warm-up call absorbs Triton compilation and allocator growth; its result is what the caller measures. On
    CUDA each timed call sits between two CUDA events (the GPU's time, launches included) and the peak is
    torch.cuda.max_memory_allocated beyond what was allocated before the call; on a CPU the time is wall clock and
    the peak is None."""
    cuda = torch.device(device).type == "cuda"
    if cuda:
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
    result = fn()
    peak_mib = None
    if cuda:
        torch.cuda.synchronize(device)
        peak_mib = (torch.cuda.max_memory_allocated(device) - before) / 2**20
    times = []
    for _ in range(repeats):
        if cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            fn()
            times.append(1e3 * (time.perf_counter() - t0))
    return result, statistics.median(times), peak_mib


def relative_error(out, ref) -> tuple[float, float]:
    """(||out - ref||^2, ||ref||^2) in float64, to be summed over layers before the square root."""
    return float((out.double() - ref.double()).pow(2).sum()), float(ref.double().pow(2).sum())


def measure_synthetic(lengths, settings, shape, device, repeats, seed) -> list[dict]:
    rows = []
    cuda = torch.device(device).type == "cuda"
    # bfloat16 on a GPU (the standard shape's dtype); float32 on a CPU (the interpreter computes bfloat16 dots wrongly).
    dtype = torch.bfloat16 if cuda else torch.float32
    start = time.perf_counter()
    bar = tqdm(total=len(lengths) * len(settings), desc="synthetic", unit="sel", disable=None)
    for L in lengths:
        q, k, v = planted_qkv(1, L, shape["q_heads"], shape["kv_heads"], shape["head_dim"], seed=seed, dtype=dtype,
                              device=device)
        del v  # selection reads q and k only
        for s in settings:
            bar.set_postfix_str(f"L={L} {s.selector} {s.impl.split()[0]}")
            (counts, _), ms, peak_mib = measure_call(lambda: s.select(q, k), device, repeats)
            rows.append(dict(what="selection", input=SYNTHETIC, layer="", L=L, selector=s.selector, param=s.param,
                             value=s.value, setting=s.label, impl=s.impl, density=float(causal_block_density(counts)),
                             rel_error="", select_ms=round(ms, 3), repeats=repeats,
                             peak_mib="" if peak_mib is None else round(peak_mib, 1), B=1, Hq=shape["q_heads"],
                             Hkv=shape["kv_heads"], D=shape["head_dim"], dtype=str(dtype).replace("torch.", ""),
                             block_size=BLOCK))
            bar.update()
        # One line per length (tqdm is silent in a log): what a run cut short still tells.
        print(f"L={L} ({time.perf_counter() - start:.0f} s): " + "; ".join(
            f"{r['setting']} [{r['impl'].split()[0]}] {pct(r['density'])} {r['select_ms']:.3g} ms"
            for r in rows if r["L"] == L), flush=True)
        del q, k
        if cuda:
            torch.cuda.empty_cache()  # the next length's inputs are 2x larger
    bar.close()
    return rows


def density_check(rows) -> tuple[list[tuple[int, float, float]], list[int]]:
    """[(L, Triton density, reference density)] at every synthetic length where both FlashPrefill alpha = 0.12
    implementations ran, and the lengths where they differ by more than DENSITY_TOLERANCE."""
    d = {(r["L"], r["impl"]): r["density"] for r in rows if r["input"] == SYNTHETIC and r["selector"] == "FlashPrefill"
         and r["value"] == 0.12}
    pairs = [(L, d[L, TRITON], d[L, REFERENCE]) for L in sorted({L for L, _ in d})
             if (L, TRITON) in d and (L, REFERENCE) in d]
    return pairs, [L for L, a, b in pairs if abs(a - b) > DENSITY_TOLERANCE]


def measure_real(acts, lengths, settings, device, repeats, desc) -> list[dict]:
    """One row per (layer, L, setting) with density, relative error vs dense and selection time, plus one
    aggregate row per (L, setting) with layer='all' (density averaged, error over all layers together)."""
    rows = []
    bar = tqdm(total=len(lengths) * len(acts) * len(settings), desc=desc, unit="sel", disable=None)
    for L in lengths:
        agg = {s: [0.0, 0.0, [], []] for s in settings}
        for layer, (q8, k8, v8) in acts.items():
            q, k, v = (t[:, :L].to(device).contiguous() for t in (q8, k8, v8))
            ref = dense_attention(q, k, v)
            for s in settings:
                (counts, indices), ms, _ = measure_call(lambda: s.select(q, k), device, repeats)
                out = block_sparse_attention(q, k, v, counts, indices, BLOCK)
                err2, ref2 = relative_error(out, ref)
                density = float(causal_block_density(counts))
                a = agg[s]
                a[0] += err2
                a[1] += ref2
                a[2].append(density)
                a[3].append(ms)
                rows.append(dict(what="selection", input="real SmolLM2-135M", layer=layer, L=L, selector=s.selector,
                                 param=s.param, value=s.value, setting=s.label, impl=s.impl, density=density,
                                 rel_error=math.sqrt(err2 / ref2), select_ms=round(ms, 3), repeats=repeats, B=1,
                                 Hq=q.shape[2], Hkv=k.shape[2], D=q.shape[3], dtype=str(q.dtype).replace("torch.", ""),
                                 block_size=BLOCK))
                bar.update()
        for s, (e2, r2, dens, ms) in agg.items():
            rows.append(dict(what="selection", input="real SmolLM2-135M", layer="all", L=L, selector=s.selector,
                             param=s.param, value=s.value, setting=s.label, impl=s.impl, density=statistics.mean(dens),
                             rel_error=math.sqrt(e2 / r2), select_ms=round(sum(ms), 3), repeats=repeats, B=1,
                             Hq=q8.shape[2], Hkv=k8.shape[2], D=q8.shape[3], dtype=str(q8.dtype).replace("torch.", ""),
                             block_size=BLOCK))
    bar.close()
    return rows


def match_errors(sweep_rows: list[dict], L: int) -> list[dict]:
    """Per peer: the sparsest grid setting whose all-layer error is <= FlashPrefill's at alpha 0.12."""
    agg = [r for r in sweep_rows if r["layer"] == "all" and r["L"] == L]
    target = next(r for r in agg if r["selector"] == "FlashPrefill" and r["value"] == 0.12)
    out = []
    for selector in MATCH_GRID:
        cands = [r for r in agg if r["selector"] == selector]
        ok = [r for r in cands if r["rel_error"] <= target["rel_error"]]
        best = min(ok, key=lambda r: r["density"]) if ok else min(cands, key=lambda r: r["rel_error"])
        out.append(dict(what="error_matched", input="real SmolLM2-135M", layer="all", L=L, selector=selector,
                        param=best["param"], value=best["value"], setting=f"{selector} {best['param']}={best['value']:g}",
                        density=best["density"], rel_error=best["rel_error"], target_rel_error=target["rel_error"],
                        impl=best["impl"], matched=bool(ok), select_ms=best["select_ms"], B=1, Hq=best["Hq"],
                        Hkv=best["Hkv"], D=best["D"], dtype=best["dtype"], block_size=BLOCK))
    return out


# ------------------------------------------------------------------------------------------------ reporting

def pct(x) -> str:
    return "-" if x == "" or x is None else f"{100 * x:.1f}%"


def tokens(L: int) -> str:
    """8192 -> "8K"; lengths that are not whole K stay in tokens."""
    return f"{L // 1024}K" if L % 1024 == 0 else str(L)


def paper_cell(s: Setting) -> str:
    """The paper's 256K density for a selector's default setting (FlashPrefill: alpha 0.12), labelled "paper"."""
    quoted = s.selector != "FlashPrefill" or s.value == 0.12
    return f"{100 * PAPER_DENSITY_256K[s.selector]:.1f}% (paper)" if quoted else "-"


def write_markdown(path: Path, rows, stamp, args, settings, shape, real_note) -> str:
    syn = [r for r in rows if r["input"] == SYNTHETIC]
    real = [r for r in rows if r["input"] != SYNTHETIC and r["what"] == "selection" and r["layer"] == "all"
            and any(r["setting"] == s.label for s in DEFAULT_SETTINGS)]
    matched = [r for r in rows if r["what"] == "error_matched"]
    device = stamp["device_name"]
    parts = ["# Block density: FlashPrefill vs FlexPrefill vs XAttention (same inputs, same sparse attention)", ""]

    if syn:
        Ls = sorted({r["L"] for r in syn})
        d = {(r["setting"], r["L"]): r for r in syn}
        length_head = [tokens(L) for L in Ls]

        def table(cell, extra_head=(), extra=lambda s: []):
            body = [[s.label, s.impl] + [cell(d[s.label, L]) if (s.label, L) in d else "-" for L in Ls] + extra(s)
                    for s in settings]
            return markdown_table(["selector (setting)", "implementation"] + length_head + list(extra_head), body)

        parts += [f"## Density vs length on **synthetic** inputs ({SYNTHETIC})", "",
                  table(lambda r: pct(r["density"]), ["**paper** @256K (Qwen3-30B-A3B, real)"],
                        lambda s: [paper_cell(s)]), "",
                  f"Synthetic planted-pattern Q/K (sinks, local decay, slashes, vertical stripes; no model), B=1, "
                  f"Hq={shape['q_heads']}, Hkv={shape['kv_heads']}, D={shape['head_dim']}, Bs={BLOCK}, "
                  f"{syn[0]['dtype']}, on {device}. Lengths {', '.join(length_head)}"
                  + ("" if max(Ls) >= 262144 else " (256K was not run here: it needs a GPU; "
                     "`python -m repro.sparsity --device cuda` runs it)") + ". The **paper** column quotes the "
                  "paper's 256K densities on a real model (docs/DESIGN.md section 7); synthetic densities show how "
                  "each rule scales with L, not the paper's values.", ""]
        if 262144 in Ls:
            ours = {}  # selector -> its first default setting measured at 256K (FlashPrefill: Triton when run)
            for s in settings:
                if paper_cell(s) != "-" and (s.label, 262144) in d:
                    ours.setdefault(s.selector, d[s.label, 262144])
            parts += ["At 256K: " + "; ".join(f"{sel} {pct(r['density'])} (ours, **synthetic**) vs "
                                              f"{100 * PAPER_DENSITY_256K[sel]:.1f}% (**paper**, real model)"
                                              for sel, r in ours.items()) + ".", ""]
        pairs, bad = density_check(syn)
        if pairs:
            worst = max(abs(a - b) for _, a, b in pairs)
            parts += [f"Triton vs reference stages (FlashPrefill alpha 0.12): densities "
                      + ("**DIFFER** beyond " if bad else "agree within ") + f"{DENSITY_TOLERANCE:g} at "
                      f"{', '.join(tokens(L) for L, _, _ in pairs)} (largest difference {worst:.2g}).", ""]
        timed = "one timed call" if args.repeats == 1 else f"the median of {args.repeats} timed calls"
        timer = (f"one untimed warm-up call, then {timed}, each between two CUDA events" if stamp["device"] == "cuda"
                 else f"one untimed warm-up call, then {timed} (wall clock, one thread)")
        parts += [f"### Selection time (ms, {device}; synthetic inputs)", "",
                  table(lambda r: f"{r['select_ms']:.3g}" if r["select_ms"] < 100 else f"{r['select_ms']:.0f}"), "",
                  f"Selection only (no attention): {timer}. Implementations: **{TRITON}** = "
                  "triton_impl.mean_pool_keys + block_scores + select_and_compact (the selection "
                  f"triton_impl.flash_prefill runs); **{REFERENCE}** = the readable stages of `reference`; the peers "
                  f"are **{PYTORCH}**: our readable PyTorch from their papers (the official FlexPrefill and XAttention "
                  "use fused Triton kernels), so their times are not the papers' speeds. Compare the peers with "
                  "FlashPrefill's reference-stages row (all three readable PyTorch)."
                  + (" FlashPrefill's Triton kernels did not run here (they need CUDA, or TRITON_INTERPRET=1)."
                     if not any(s.impl == TRITON for s in settings) else "" if stamp["device"] == "cuda" else
                     " The Triton kernels ran under the CPU interpreter (a dry run): their times say nothing about "
                     "speed."), ""]
        if any(r["peak_mib"] != "" for r in syn):
            parts += [f"### Peak GPU memory of one selection call (MiB beyond its inputs, {device})", "",
                      table(lambda r: f"{r['peak_mib']:.0f}"), "",
                      "torch.cuda.max_memory_allocated during the warm-up call minus what was allocated before it "
                      "(q and k). The peers' estimates run in chunks (reference/peers.py) to stay a few GiB at 256K.",
                      ""]
    if real:
        Ls = sorted({r["L"] for r in real})
        d = {(r["setting"], r["L"]): r for r in real}
        head = ["selector (setting)"] + [f"{tokens(L)} density / error" for L in Ls]
        table = [[s.label] + [f"{pct(d[s.label, L]['density'])} / {d[s.label, L]['rel_error']:.3f}"
                              if (s.label, L) in d else "-" for L in Ls] for s in DEFAULT_SETTINGS]
        parts += ["## Real SmolLM2-135M activations: density and attention-output error vs dense", "",
                  markdown_table(head, table), "",
                  "q/k/v of SmolLM2-135M-Instruct (Hq=9, Hkv=3, D=64) on a NIAH prompt, layers "
                  f"{', '.join(map(str, args.layers_used))}, truncated to each length, on {device}. FlashPrefill: "
                  "the reference stages. Density averaged over the "
                  "layers; error = ||O_sparse - O_dense||_F / ||O_dense||_F over all layers together "
                  "(reference.block_sparse_attention with each selector's lists vs reference.dense_attention, "
                  "float32). FlexPrefill is dense (density 100%, error 0) whenever L <= its minimum budget of 1024 "
                  "tokens (its short-input rule).", ""]
    elif real_note:
        parts += ["## Real SmolLM2-135M activations", "", real_note, ""]
    if matched:
        L = matched[0]["L"]
        table = [[r["selector"], f"{r['param']} = {r['value']:g}", pct(r["density"]), f"{r['rel_error']:.4f}",
                  "yes" if r["matched"] else "no (lowest error in the grid)"] for r in matched]
        parts += [f"## Error-matched settings (real SmolLM2 activations, {tokens(L)})", "",
                  markdown_table(["selector", "setting", "density", "rel. error", "error <= target"], table), "",
                  f"Target: FlashPrefill's error at alpha = 0.12, {matched[0]['target_rel_error']:.4f}. For each "
                  "selector, the sparsest setting of its grid "
                  + "; ".join(f"{k}: {p} in {v}" for k, (p, v) in MATCH_GRID.items())
                  + " whose all-layer error does not exceed the target. This is **error-matched** (attention-output "
                  "error); the matching by task accuracy, with every selector inside SmolLM2 on the same prompts, "
                  "is `python -m repro.sparsity_accuracy` (sparsity_accuracy.md).", ""]
    parts += [stamp_line(stamp), ""]
    text = "\n".join(parts)
    path.write_text(text)
    return text


def plot_density(path: Path, rows, stamp, settings, shape) -> None:
    syn = [r for r in rows if r["input"] == SYNTHETIC]
    real = [r for r in rows if r["input"] != SYNTHETIC and r["what"] == "selection" and r["layer"] == "all"]
    fig = Figure(figsize=(15, 4.8), layout="constrained")
    axes = fig.subplots(1, 3)
    for ax, data, shown, title in (
            (axes[0], syn, settings, f"synthetic planted_qkv (Hq={shape['q_heads']}, D={shape['head_dim']})"),
            (axes[1], real, DEFAULT_SETTINGS, "real SmolLM2-135M activations (5 layers)")):
        for s in shown:
            pts = sorted((r["L"], r["density"]) for r in data if r["setting"] == s.label)
            if pts:
                ax.plot(*zip(*pts), line_style(s.label), color=COLORS[s.selector], label=s.label)
        ax.set_xscale("log", base=2)
        ax.set_xlabel("sequence length L (tokens)")
        ax.set_ylabel("density (kept / causal blocks)")
        ax.set_ylim(0, 1.02)
        ax.grid(alpha=0.3)
        ax.set_title(title, fontsize=10)
        if not data:
            ax.text(0.5, 0.5, "not measured (inputs absent)", transform=ax.transAxes, ha="center")
    for sel, dens in PAPER_DENSITY_256K.items():
        axes[0].plot(262144, dens, "*", color=COLORS[sel], markersize=14, markeredgecolor="black",
                     label=f"paper @256K {sel} {100 * dens:.1f}% (real model)")
    axes[0].legend(fontsize=7)
    for s in settings:
        pts = sorted((r["L"], r["select_ms"]) for r in syn if r["setting"] == s.label)
        if pts:
            axes[2].plot(*zip(*pts), line_style(s.label), color=COLORS[s.selector], label=f"{s.label} [{s.impl}]")
    axes[2].set_xscale("log", base=2)
    axes[2].set_yscale("log")
    axes[2].set_xlabel("sequence length L (tokens)")
    axes[2].set_ylabel(f"selection time (ms, {stamp['device']})")
    axes[2].set_title(f"selection time, synthetic inputs, {stamp['device']}", fontsize=10)
    axes[2].grid(alpha=0.3, which="both")
    axes[2].legend(fontsize=6)
    fig.suptitle(f"Block density per selector (Bs={BLOCK}) — {stamp['device_name']}, torch {stamp['torch']}, "
                 f"commit {stamp['commit']}", fontsize=10)
    fig.savefig(path, dpi=110)


def plot_error(path: Path, rows, stamp) -> bool:
    real = [r for r in rows if r["input"] != SYNTHETIC and r["what"] == "selection" and r["layer"] == "all"]
    if not real:
        return False
    L = max(r["L"] for r in real)
    fig = Figure(figsize=(8, 5), layout="constrained")
    ax = fig.subplots()
    for sel in MATCH_GRID:
        pts = sorted({(r["density"], r["rel_error"], r["value"]) for r in real
                      if r["selector"] == sel and r["L"] == L})
        if not pts:
            continue
        ax.plot([p[0] for p in pts], [p[1] for p in pts], "o-", color=COLORS[sel],
                label=f"{sel} ({MATCH_GRID[sel][0]} sweep)")
        for dens, err, val in pts:
            ax.annotate(f"{val:g}", (dens, err), fontsize=6, xytext=(3, 3), textcoords="offset points")
    for s in DEFAULT_SETTINGS:
        r = next((r for r in real if r["setting"] == s.label and r["L"] == L), None)
        if r:
            ax.plot(r["density"], r["rel_error"], "*", color=COLORS[s.selector], markersize=14,
                    markeredgecolor="black", label=f"default: {s.label}")
    ax.set_xlabel("density (kept / causal blocks)")
    ax.set_ylabel("relative output error vs dense (Frobenius)")
    ax.set_yscale("log")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=7)
    ax.set_title(f"Attention-output error vs density, real SmolLM2-135M activations, L = {L}\n"
                 f"{stamp['device_name']}, commit {stamp['commit']}", fontsize=9)
    fig.savefig(path, dpi=110)
    return True


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="python -m repro.sparsity", description=__doc__.split("\n")[0])
    parser.add_argument("--device", default=default_device(), help="(default: %(default)s)")
    parser.add_argument("--lengths", type=int, nargs="+", default=None,
                        help=f"synthetic lengths (default: CPU {CPU_LENGTHS}, GPU {GPU_LENGTHS})")
    parser.add_argument("--real-lengths", type=int, nargs="+", default=REAL_LENGTHS, help="(default: %(default)s)")
    parser.add_argument("--activations", type=Path, default=None, help="dump folder (default: repro/activations/)")
    parser.add_argument("--synthetic-only", action="store_true", help="skip the real-activation part")
    parser.add_argument("--no-match", action="store_true", help="skip the error-matching sweep")
    parser.add_argument("--repeats", type=int, default=None,
                        help="timed calls per selection after the warm-up (default: CPU 1, GPU 10)")
    parser.add_argument("--seed", type=int, default=0, help="(default: %(default)s)")
    parser.add_argument("--out-dir", type=Path, default=None,
                        help="(default: the run folder repro/runs/<date>-<device>/sparsity/)")
    parser.add_argument("--tag", default=None,
                        help="file name stem (default: sparsity on a CPU, sparsity_<gpu> on CUDA, e.g. sparsity_h200)")
    args = parser.parse_args(argv)
    matplotlib.use("Agg")
    torch.set_grad_enabled(False)
    on_gpu = torch.device(args.device).type == "cuda"
    if not on_gpu:
        torch.set_num_threads(1)  # small tensors on a 2-core VM: one thread is 5-50x faster
    lengths = args.lengths or (GPU_LENGTHS if on_gpu else CPU_LENGTHS)
    shape = GPU_SHAPE if on_gpu else CPU_SHAPE
    settings = TRITON_SETTINGS if on_gpu or interpreting() else DEFAULT_SETTINGS
    args.repeats = args.repeats or (10 if on_gpu else 1)
    start = time.perf_counter()
    stamp = environment_stamp(args.device)
    args.tag = args.tag or output_tag(stamp)
    args.out_dir = args.out_dir or run_dir("sparsity", args.device)
    print(f"FlashPrefill selectors: {', '.join(sorted({s.impl for s in settings if s.selector == 'FlashPrefill'}))}"
          f"; writing {args.out_dir / args.tag}.*")

    rows = measure_synthetic(lengths, settings, shape, args.device, args.repeats, args.seed)

    real_note = ""
    acts = {}
    if args.synthetic_only:
        real_note = "Skipped (--synthetic-only)."
    else:
        from .dump_activations import load_activations
        acts = load_activations(args.activations, max_length=max(args.real_lengths))
        if not acts:
            real_note = ("Skipped: no SmolLM2 activation dumps in repro/activations/ (make them with "
                         "`python -m repro.dump_activations`).")
    args.layers_used = list(acts)
    if real_note:
        print(real_note)
    else:
        avail = next(iter(acts.values()))[0].shape[1]
        # A dump "L8192" holds the prompt's real token count (a little under 8192): the longest length is capped.
        real_lengths = sorted({min(L, avail) for L in args.real_lengths})
        rows += measure_real(acts, real_lengths, DEFAULT_SETTINGS, args.device, 1, "real")
        if not args.no_match:
            L = max(real_lengths)
            sweep = [Setting(sel, p, v, f"{sel} {p}={v:g} (sweep)", REFERENCE if sel == "FlashPrefill" else PYTORCH)
                     for sel, (p, vals) in MATCH_GRID.items() for v in vals]
            sweep_rows = measure_real(acts, [L], sweep, args.device, 1, f"error sweep @{L}")
            rows += sweep_rows
            rows += match_errors(sweep_rows, L)

    args.out_dir.mkdir(parents=True, exist_ok=True)
    csv_path = write_long_csv(args.out_dir / f"{args.tag}.csv", rows, stamp)
    pairs, bad = density_check(rows)
    if bad:  # the CSV is written, for diagnosis; nothing else
        raise SystemExit(f"FAIL: Triton and reference FlashPrefill densities differ by more than {DENSITY_TOLERANCE:g}"
                         f" at L = {bad}: " + ", ".join(f"{L}: {a:.5f} vs {b:.5f}" for L, a, b in pairs if L in bad)
                         + f" (rows in {csv_path})")
    if on_gpu and not pairs:
        raise SystemExit("FAIL: no length ran both the Triton and the reference FlashPrefill selection")
    md_path = args.out_dir / f"{args.tag}.md"
    text = write_markdown(md_path, rows, stamp, args, settings, shape, real_note)
    png1 = args.out_dir / f"{args.tag}_density.png"
    plot_density(png1, rows, stamp, settings, shape)
    png2 = args.out_dir / f"{args.tag}_error.png"
    wrote_err = plot_error(png2, rows, stamp)
    print(text)
    print(f"wrote {csv_path}, {md_path}, {png1}" + (f", {png2}" if wrote_err else "")
          + f" in {time.perf_counter() - start:.1f} s")


if __name__ == "__main__":
    main()
