"""The accuracy study's markdown summary: one function per section, each returning its lines (empty when the run
has no rows for it), and `write_report` joining them. Rows are run_samples' rows (or the samples CSV read back with
`typed`, which restores their types); `args` is the run's parsed command line (the planned prompts), plus its note."""

from __future__ import annotations

import math
import shlex
from collections import defaultdict
from pathlib import Path

from repro.common import markdown_table, stamp_line

from .experiments import CALIBRATION_SEED, NIAH_TASKS, mean
from .tasks import RULER_TASKS


def typed(rows):
    """Rows read back from the CSVs (`read_long_csv`: strings) -> the types run_samples and layer_errors produce:
    numbers as floats / ints, "" (Full's alpha, the RULER rows' depth) kept. Rows that already hold numbers pass
    through unchanged, so the summary and the figures accept either."""
    out = []
    for r in rows:
        r = dict(r)
        for k in ("score", "density", "rel_error", "ref_density", "ref_rel_error", "seconds"):
            if k in r and r[k] != "":
                r[k] = float(r[k])
        for k in ("length", "tokens", "seed", "layer"):
            if k in r and r[k] != "":
                r[k] = int(r[k])
        for k in ("alpha", "depth"):
            if k in r and r[k] != "":
                r[k] = float(r[k])
        out.append(r)
    return out


def summarize(rows):
    """{(experiment, task, length, method, alpha): (mean score, mean density, n)}."""
    acc = defaultdict(list)
    for r in rows:
        acc[(r["experiment"], r["task"], r["length"], r["method"], r["alpha"])].append(r)
    return {k: (mean(r["score"] for r in v), mean(r["density"] for r in v), len(v)) for k, v in acc.items()}


def prompt_key(r):
    """A prompt's identity in a row."""
    return (r["experiment"], r["task"], r["length"], r["depth"], r["seed"])


def sweep_keys(rows, L, alphas):
    """The prompts of length L that ran at every alpha of `alphas`."""
    per_alpha = [{prompt_key(r) for r in rows if r["length"] == L and r["alpha"] == a} for a in alphas]
    return set.intersection(*per_alpha) if per_alpha else set()


def _fmt(x, digits=1):
    return "n/a" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.{digits}f}"


def _fmt_err(x: float) -> str:
    """A relative error: 4 decimals, or 2 significant digits below 1e-3 (float32 rounding is ~1e-7)."""
    return "n/a" if math.isnan(x) else f"{x:.4f}" if x >= 1e-3 or x == 0 else f"{x:.1e}"


def _dtype_words(rows) -> str:
    dtypes = sorted({r.get("model_dtype") for r in rows if r.get("model_dtype")})
    return f" in {'/'.join(dtypes)}" if dtypes else ""


def _path_words(rows, stamp) -> str:
    """Which attention ran the prefill, from what the rows recorded (falls back to the device)."""
    impls = {r.get("impl") for r in rows if r["method"] == "flashprefill" and r.get("impl")}
    device = "GPU" if stamp["device"] == "cuda" else "CPU"
    if impls:
        names = {"triton": "the Triton kernels (triton_impl.flash_prefill)",
                 "reference": "the PyTorch reference (reference.flash_prefill)"}
        fp = " and ".join(names.get(i, i) for i in sorted(impls))
    else:
        fp = "Triton kernels" if stamp["device"] == "cuda" else "the PyTorch reference"
    return (f"Full = transformers' sdpa attention on the {device}; FlashPrefill prefill on {fp}, through the "
            f"flashprefill_hf backend")


def header_section(rows, args, name, default_alpha, stamp, wall) -> list[str]:
    """Title, machine, command line with wall time, what ran, and the run's note."""
    return [f"# Accuracy: FlashPrefill vs Full on {name}" + (" (quick mode)" if args.quick else ""), "",
            stamp_line(stamp), "",
            f"Command: `python -m repro.accuracy.run {shlex.join(args.argv)}` — wall time {wall / 60:.1f} min. "
            f"Model: {name}{_dtype_words(rows)}; FlashPrefill default alpha {default_alpha} (block 128, sink 2, "
            f"window 4, last 2 dense blocks, every layer sparse unless --dense-layers); {_path_words(rows, stamp)}; "
            f"greedy decoding (dense attention while decoding, for both methods); RULER string-match scores in "
            f"percent; density = kept causal blocks / all causal blocks, averaged over layers and heads. Prompts: "
            f"seeds {args.seeds} (evaluation), never used for tuning.",
            "", *([args.note, ""] if getattr(args, "note", "") else [])]


def coverage_section(rows, args, default_alpha) -> list[str]:
    """How many prompts ran per phase, against how many the command asked for (a time budget can cut a phase)."""
    n_niah = len(args.niah_tasks) * len(args.lengths) * args.depths * len(args.seeds)
    n_ruler = len(args.ruler_tasks) * len(args.ruler_lengths or []) * len(args.seeds)
    sweep = [a for a in (args.alphas or []) if a != default_alpha]
    n_sweep = 0
    if sweep:
        niah_l = [L for L in args.lengths if not args.sweep_lengths or L in args.sweep_lengths]
        ruler_l = [L for L in (args.ruler_lengths or []) if not args.sweep_lengths or L in args.sweep_lengths]
        n_sweep = (len(args.niah_tasks) * len(niah_l) * args.depths * len(args.seeds) * (args.sweep_on != "ruler")
                   + len(args.ruler_tasks) * len(ruler_l) * len(args.seeds) * (args.sweep_on != "niah"))
    body = []
    for label, sel, planned in [
        ("Full", lambda r: r["method"] == "full", n_niah + n_ruler),
        (f"FlashPrefill alpha {default_alpha}", lambda r: r["method"] == "flashprefill" and r["alpha"] == default_alpha,
         n_niah + n_ruler),
        *[(f"FlashPrefill alpha {a}", (lambda a: lambda r: r["method"] == "flashprefill" and r["alpha"] == a)(a),
           n_sweep) for a in sorted({r["alpha"] for r in rows if r["method"] == "flashprefill"} - {default_alpha})],
    ]:
        rs = [r for r in rows if sel(r)]
        if not rs:
            continue
        seeds = sorted({r["seed"] for r in rs})
        body.append([label, len(rs), planned if planned >= len(rs) else "-", " ".join(map(str, seeds)),
                     " ".join(str(L) for L in sorted({r["length"] for r in rs})),
                     f"{sum(float(r.get('seconds') or 0) for r in rs) / 60:.1f}"])
    if not body:
        return []
    complete = all(b[2] == "-" or b[1] == b[2] for b in body)
    return ["Prompts answered per method (planned: what the command asked for; '-' where rows of several runs "
            "were merged). " + ("Every planned prompt ran." if complete else
                                "**Incomplete:** fewer prompts ran than planned (a --time-budget stops a phase "
                                "early; phases run seed by seed, so it drops the last seeds)."),
            "", markdown_table(["method", "prompts", "planned", "seeds", "lengths", "decode+prefill min"], body), ""]


def niah_section(rows, summary, args, default_alpha, prefix) -> list[str]:
    """Passkey and single-needle NIAH per task and length, the overall verdict and the paper's figure."""
    from repro.paper import PAPER_NIAH

    niah = [r for r in rows if r["experiment"] == "niah"]
    if not niah:
        return []
    lines = ["## Passkey and single-needle NIAH", "",
             f"Depths: {sorted({r['depth'] for r in niah})}; samples per cell: {len(args.seeds)}.", ""]
    header = ["task", "length", "Full", f"FlashPrefill (alpha {default_alpha})", "delta", "density", "n"]
    body = []
    for task in NIAH_TASKS:
        for L in sorted({r["length"] for r in niah}):
            f = summary.get(("niah", task, L, "full", ""))
            s = summary.get(("niah", task, L, "flashprefill", default_alpha))
            if f and s:
                body.append([task, L, _fmt(f[0]), _fmt(s[0]), f"{s[0] - f[0]:+.1f}", f"{100 * s[1]:.1f}%", s[2]])
    lines += [markdown_table(header, body), ""]
    full_all = mean(r["score"] for r in niah if r["method"] == "full")
    fp_all = mean(r["score"] for r in niah if r["method"] == "flashprefill" and r["alpha"] == default_alpha)
    verdict = "met" if fp_all >= full_all - 1.0 else "missed"
    return lines + [f"Overall passkey+NIAH: Full {_fmt(full_all)}, FlashPrefill {_fmt(fp_all)} "
                    f"({fp_all - full_all:+.1f} points): goal (within 1 point) **{verdict}** at alpha {default_alpha}.",
                    f"Paper: NIAH {PAPER_NIAH} (7B-30B models).", "",
                    f"![NIAH heatmaps]({prefix}niah_heatmap.png)", ""]


def ruler_section(rows, summary, args, default_alpha) -> list[str]:
    """The RULER-style suite per task and length, the average's verdict and the paper's figures."""
    from repro.paper import PAPER_INFINITEBENCH, PAPER_RULER

    ruler = [r for r in rows if r["experiment"] == "ruler"]
    if not ruler:
        return []
    lengths = sorted({r["length"] for r in ruler})
    lines = ["## RULER-style suite", "", f"One task per RULER family, {len(args.seeds)} sample(s) per task and length.",
             ""]
    header = ["task"] + [f"{m} {L}" for L in lengths for m in ("Full", "FP")]
    body = []
    for task in RULER_TASKS:
        row = [task]
        for L in lengths:
            f = summary.get(("ruler", task, L, "full", ""))
            s = summary.get(("ruler", task, L, "flashprefill", default_alpha))
            row += [_fmt(f[0]) if f else "-", _fmt(s[0]) if s else "-"]
        body.append(row)
    avg = ["**average**"]
    verdicts = []
    for L in lengths:
        f = mean(r["score"] for r in ruler if r["length"] == L and r["method"] == "full")
        s = mean(r["score"] for r in ruler if r["length"] == L and r["alpha"] == default_alpha)
        avg += [_fmt(f), _fmt(s)]
        verdicts.append(f"{L}: Full {_fmt(f)}, FlashPrefill {_fmt(s)} ({s - f:+.1f}, goal within 1.5 "
                        f"**{'met' if s >= f - 1.5 else 'missed'}**)")
    body.append(avg)
    return lines + [markdown_table(header, body), "", "; ".join(verdicts) + ".",
                    f"Paper: RULER {PAPER_RULER['model']} Full {PAPER_RULER['Full']} vs FlashPrefill "
                    f"{PAPER_RULER['FlashPrefill']}; InfiniteBench {PAPER_INFINITEBENCH['model']} Full "
                    f"{PAPER_INFINITEBENCH['Full']} vs FlashPrefill {PAPER_INFINITEBENCH['FlashPrefill']}.", ""]


def same_as_full_section(rows, default_alpha) -> list[str]:
    """Agreement with Full, prompt by prompt (sensitive even where the model is wrong with Full attention)."""
    full_pred = {prompt_key(r): r["prediction"] for r in rows if r["method"] == "full"}
    fp_rows = [r for r in rows
               if r["method"] == "flashprefill" and r["alpha"] == default_alpha and prompt_key(r) in full_pred]
    if not fp_rows:
        return []
    lines = ["## Same answer as Full", "",
             "Fraction of prompts where FlashPrefill's greedy answer is identical to Full's (first 200 "
             "characters), right or wrong: a direct measure of how much the sparse prefill changes the model's "
             "output, meaningful even on tasks a 135M model fails.", ""]
    body = []
    for exp in ("niah", "ruler"):
        for L in sorted({r["length"] for r in fp_rows if r["experiment"] == exp}):
            rs = [r for r in fp_rows if r["experiment"] == exp and r["length"] == L]
            same = sum(r["prediction"] == full_pred[prompt_key(r)] for r in rs)
            body.append([exp, L, f"{same}/{len(rs)}", f"{100 * mean(r['density'] for r in rs):.1f}%"])
    return lines + [markdown_table(["prompts", "length", f"identical (alpha {default_alpha})", "density"], body), ""]


def sweep_section(rows, prefix) -> list[str]:
    """Score and density per alpha, on the prompts of each length that ran at every alpha."""
    from repro.paper import PAPER_V2_ALPHA, PAPER_V2_NIAH_DENSITY

    sweep_alphas = sorted({r["alpha"] for r in rows if r["method"] == "flashprefill"})
    if len(sweep_alphas) <= 1:
        return []
    lengths = [L for L in sorted({r["length"] for r in rows}) if sweep_keys(rows, L, sweep_alphas)]
    lines = ["## Alpha sweep (the prompts of each length that ran at every alpha)", ""]
    header = ["alpha"] + [f"score {L}" for L in lengths] + [f"density {L}" for L in lengths]
    body = []
    for a in [None] + sweep_alphas:
        sel = [r for r in rows if (r["alpha"] == a if a is not None else r["method"] == "full")]
        sc, de = [], []
        for L in lengths:
            # Compare like with like: only the prompts that also ran at every sweep alpha.
            keys = sweep_keys(rows, L, sweep_alphas)
            rs = [r for r in sel if r["length"] == L and prompt_key(r) in keys]
            sc.append(_fmt(mean(r["score"] for r in rs)))
            de.append(f"{100 * mean(r['density'] for r in rs):.1f}%" if rs else "-")
        body.append(["Full" if a is None else a] + sc + de)
    return lines + [markdown_table(header, body), "",
                    "Paper (V2 selection, alpha %.2f, real 7B-30B models), density on NIAH prompts: %s." % (
                        PAPER_V2_ALPHA, ", ".join(f"{L // 1024}K {100 * lo:.0f}-{100 * hi:.0f}%"
                                                  for L, (lo, hi) in PAPER_V2_NIAH_DENSITY.items() if L <= 16384)),
                    "", f"![alpha sweep]({prefix}alpha_sweep.png)", ""]


def skipped_section(skipped) -> list[str]:
    return ["Time budget: " + "; ".join(skipped) + ".", ""] if skipped else []


def calibration_section(calibrated) -> list[str]:
    if not calibrated:
        return []
    return ["## Calibration (separate seeds)", "",
            "Largest alpha within the goal of Full on calibration prompts (seed >= %d): %s." % (
                CALIBRATION_SEED, ", ".join(f"{L}: {a}" for L, a in calibrated.items())), ""]


def layer_error_section(err_rows, prefix) -> list[str]:
    """Relative error and density per alpha and length, and the reference's cross-check of the kernels."""
    if not err_rows:
        return []
    impl, dtype = err_rows[0]["impl"], err_rows[0].get("dtype") or "float32"
    lines = ["## Per-layer relative error of sparse vs dense attention (real activations)", "",
             "Relative error norm(FlashPrefill(q,k,v) - dense(q,k,v)) / norm(dense) per layer, on the q/k/v of "
             "a NIAH prompt "
             f"(calibration seed), implementation {impl} in {dtype}; dense = exact attention in float32 on the "
             "same inputs." + (" Alpha 0 keeps every block: its error is the kernel's own rounding error in "
                               f"{dtype}, the floor under the other rows." if 0.0 in
                               {r["alpha"] for r in err_rows} else ""), ""]
    lengths = sorted({r["length"] for r in err_rows})
    alphas = sorted({r["alpha"] for r in err_rows})
    header = ["alpha"] + [f"mean rel. error {L}" for L in lengths] + [f"max {L}" for L in lengths] + \
        [f"density {L}" for L in lengths]
    body = []
    for a in alphas:
        rs = {L: [r for r in err_rows if r["alpha"] == a and r["length"] == L] for L in lengths}
        body.append([a] + [_fmt_err(mean(r['rel_error'] for r in rs[L])) for L in lengths]
                    + [_fmt_err(max((r['rel_error'] for r in rs[L]), default=float("nan"))) for L in lengths]
                    + [f"{100 * mean(r['density'] for r in rs[L]):.1f}%" for L in lengths])
    lines += [markdown_table(header, body), ""]
    cross = [r for r in err_rows if r.get("ref_rel_error") not in (None, "")]
    if cross:
        a = cross[0]["alpha"]
        same = sum(abs(r["density"] - r["ref_density"]) < 1e-6 for r in cross)
        worst = max(abs(r["density"] - r["ref_density"]) for r in cross)
        lines += [f"Cross-check on the same activations, alpha {a}: the float32 PyTorch reference "
                  f"(reference.flash_prefill) kept the same fraction of blocks as the {impl} kernels in "
                  f"{same}/{len(cross)} checked layers (every fourth layer and the last, at each length; "
                  f"largest density difference {100 * worst:.2f} points: scores within rounding of the "
                  f"threshold can flip); mean relative error reference "
                  f"{_fmt_err(mean(r['ref_rel_error'] for r in cross))} vs {impl} "
                  f"{_fmt_err(mean(r['rel_error'] for r in cross))}.", ""]
    return lines + [f"![layer error]({prefix}layer_error.png)", ""]


def transfer_section(args) -> list[str]:
    """What a 135M model can and cannot say about the paper's claims, and the noise of a cell."""
    return ["## What transfers from a 135M model and what does not", "",
            "Transfers: the mechanics — the backend runs FlashPrefill inside a real pretrained transformer, "
            "decoding stays exact, and the measured densities and per-layer errors are those of real attention "
            "patterns (sinks, local windows, retrieval heads) rather than synthetic ones; a prompt the dense model "
            "answers and the sparse one does not is a real failure of the selection. "
            "Does not transfer: absolute scores (a 135M model fails most multi-needle, aggregation and tracking "
            "tasks even with Full attention, so those rows cannot show a loss), the paper's 7B-30B accuracy "
            "numbers, and densities at 16K-256K (SmolLM2's context is 8K, and density falls with length, so "
            "sparsity and speedup at 4-8K are far from the paper's 256K figures). With "
            f"{len(args.seeds)} sample(s) per cell, one flipped answer moves a cell by "
            f"{100 / max(1, len(args.seeds)):.0f} points: differences of a few points are within noise.", ""]


def write_report(path: Path, rows, err_rows, args, name, default_alpha, stamp, wall, calibrated, prefix,
                 skipped=()) -> None:
    """The summary markdown. wall: the run's wall time in seconds; calibrated: {length: alpha} of --calibrate;
    skipped: what the time budget cut, in words."""
    summary = summarize(rows)
    lines = (header_section(rows, args, name, default_alpha, stamp, wall)
             + coverage_section(rows, args, default_alpha)
             + niah_section(rows, summary, args, default_alpha, prefix)
             + ruler_section(rows, summary, args, default_alpha)
             + same_as_full_section(rows, default_alpha)
             + sweep_section(rows, prefix)
             + skipped_section(skipped)
             + calibration_section(calibrated)
             + layer_error_section(err_rows, prefix)
             + transfer_section(args))
    path.write_text("\n".join(lines))
