"""The measurements of repro.sparsity, one CSV row (a dict) per measurement.

* `measure_synthetic`  density, selection time and (CUDA) peak memory of each setting on planted synthetic q/k;
* `measure_real`       density, selection time and attention-output error vs dense on real q/k/v, per layer and over
                       all layers;
* `match_errors`       per selector, the sparsest sweep setting whose error does not exceed FlashPrefill's at 0.12;
* `density_check`      Triton vs reference FlashPrefill densities, where both ran.

Every selection is timed with `repro.timing.measure_call` (one untimed warm-up call, whose lists are measured, then
the median of `repeats` calls).
"""

from __future__ import annotations

import math
import statistics
import time

import torch
from tqdm import tqdm

from block_selectors import SELECTORS
from reference import block_sparse_attention, causal_block_density, dense_attention
from reference.synthetic import planted_qkv

from ..common import error_sums
from ..timing import measure_call
from .settings import (BLOCK, DENSITY_TOLERANCE, MATCH_GRID, REAL, REFERENCE, SYNTHETIC, TRITON, V1_ALPHA, impl_label,
                       pct)


def measure_synthetic(lengths, settings, shape, device, repeats, seed) -> list[dict]:
    """One row per (L, setting) on planted_qkv inputs of `shape` (B = 1); prints one line per length."""
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
            bar.set_postfix_str(f"L={L} {s.name} {impl_label(s).split()[0]}")
            (counts, _), ms, peak_mib = measure_call(lambda: s.select(q, k), device, repeats)
            rows.append(dict(what="selection", input=SYNTHETIC, layer="", L=L, selector=s.name, param=s.param,
                             value=s.value, setting=s.label, impl=impl_label(s),
                             density=float(causal_block_density(counts)), rel_error="", select_ms=round(ms, 3),
                             repeats=repeats, peak_mib="" if peak_mib is None else round(peak_mib, 1), B=1,
                             Hq=shape["q_heads"], Hkv=shape["kv_heads"], D=shape["head_dim"],
                             dtype=str(dtype).replace("torch.", ""), block_size=BLOCK))
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
                err2, ref2 = error_sums(out, ref)
                density = float(causal_block_density(counts))
                a = agg[s]
                a[0] += err2
                a[1] += ref2
                a[2].append(density)
                a[3].append(ms)
                rows.append(dict(what="selection", input=REAL, layer=layer, L=L, selector=s.name, param=s.param,
                                 value=s.value, setting=s.label, impl=impl_label(s), density=density,
                                 rel_error=math.sqrt(err2 / ref2), select_ms=round(ms, 3), repeats=repeats, B=1,
                                 Hq=q.shape[2], Hkv=k.shape[2], D=q.shape[3], dtype=str(q.dtype).replace("torch.", ""),
                                 block_size=BLOCK))
                bar.update()
        for s, (e2, r2, dens, ms) in agg.items():
            rows.append(dict(what="selection", input=REAL, layer="all", L=L, selector=s.name, param=s.param,
                             value=s.value, setting=s.label, impl=impl_label(s), density=statistics.mean(dens),
                             rel_error=math.sqrt(e2 / r2), select_ms=round(sum(ms), 3), repeats=repeats, B=1,
                             Hq=q8.shape[2], Hkv=k8.shape[2], D=q8.shape[3], dtype=str(q8.dtype).replace("torch.", ""),
                             block_size=BLOCK))
    bar.close()
    return rows


def match_errors(sweep_rows: list[dict], L: int) -> list[dict]:
    """Per selector of MATCH_GRID: the sparsest grid setting whose all-layer error is <= FlashPrefill's at alpha
    0.12 (or, when none is, the one of lowest error)."""
    agg = [r for r in sweep_rows if r["layer"] == "all" and r["L"] == L]
    target = next(r for r in agg if r["selector"] == SELECTORS["flashprefill"].name and r["value"] == V1_ALPHA)
    out = []
    for key in MATCH_GRID:
        selector = SELECTORS[key].name
        cands = [r for r in agg if r["selector"] == selector]
        ok = [r for r in cands if r["rel_error"] <= target["rel_error"]]
        best = min(ok, key=lambda r: r["density"]) if ok else min(cands, key=lambda r: r["rel_error"])
        out.append(dict(what="error_matched", input=REAL, layer="all", L=L, selector=selector, param=best["param"],
                        value=best["value"], setting=f"{selector} {best['param']}={best['value']:g}",
                        density=best["density"], rel_error=best["rel_error"], target_rel_error=target["rel_error"],
                        impl=best["impl"], matched=bool(ok), select_ms=best["select_ms"], B=1, Hq=best["Hq"],
                        Hkv=best["Hkv"], D=best["D"], dtype=best["dtype"], block_size=BLOCK))
    return out


def density_check(rows) -> tuple[list[tuple[int, float, float]], list[int]]:
    """[(L, Triton density, reference density)] at every synthetic length where both FlashPrefill alpha = 0.12
    implementations ran, and the lengths where they differ by more than DENSITY_TOLERANCE."""
    d = {(r["L"], r["impl"]): r["density"] for r in rows if r["input"] == SYNTHETIC and r["selector"] == "FlashPrefill"
         and r["value"] == V1_ALPHA}
    pairs = [(L, d[L, TRITON], d[L, REFERENCE]) for L in sorted({L for L, _ in d})
             if (L, TRITON) in d and (L, REFERENCE) in d]
    return pairs, [L for L, a, b in pairs if abs(a - b) > DENSITY_TOLERANCE]
