"""The powered evaluation's markdown report, one function per section."""

from __future__ import annotations

from pathlib import Path

from ..common import length_label, markdown_table, stamp_line, stamp_of
from ..stats import format_interval, prompts_needed, stratified
from .arms import ARMS
from .summary import (GOAL_LOSS, GOAL_LOW, PROMPT, arms_in, choose_on_dev, compare, depth_profile,
                      discordant_rate, splits_in)

MIN_PROMPTS = 300  # test prompts per (family, length) before the report calls the goal met or not
# Densities of the default setting in the independent check the issue quotes (SmolLM2, H200, alpha 0.12).
ISSUE_DENSITY = {2048: 0.84, 4096: 0.55, 8192: 0.34}


def _label(arm: str) -> str:
    return ARMS[arm].label if arm in ARMS else arm


def _lengths(rows) -> list[int]:
    return sorted({int(r["length"]) for r in rows})


def _pct(x: float) -> str:
    return f"{x:.1f}"


def header_section(rows, info) -> list[str]:
    counts = {}
    for r in rows:
        if r["arm"] == "full":
            counts[(r["split"], r["family"], int(r["length"]))] = counts.get((r["split"], r["family"],
                                                                             int(r["length"])), 0) + 1
    table = markdown_table(["split", "family"] + [length_label(L) for L in _lengths(rows)],
                           [[s, f] + [counts.get((s, f, L), 0) for L in _lengths(rows)]
                            for s in splits_in(rows) for f in sorted({k[1] for k in counts})])
    lines = ["# Powered held-out evaluation: FlashPrefill vs Full attention", "",
             f"Model: {info.get('model', '?')}, bf16 where on a GPU, greedy decoding; every arm answers every prompt and is compared "
             "with Full (transformers' sdpa) on the same prompts. Scores are RULER's string match (0-100 per "
             "prompt). Differences are arm minus Full in points, with a 95% paired-bootstrap interval and the exact "
             "McNemar p-value (prompts lost / won against Full) where the scores are right/wrong. Densities are the "
             "kept fraction of causal 128 x 128 blocks over all layers and heads (1.0 for Full).", "",
             stamp_line(stamp_of(rows[0])), "", "Commands: " + "; ".join(f"`{c}`" for c in info.get("commands", [])),
             f"Wall time: {' + '.join(str(s) for s in info.get('wall_seconds', []))} s.", "",
             "Prompts per split, family and length (test: reported; dev: for choosing knobs):", "", table]
    if info.get("note"):
        lines += ["", f"Note: {info['note']}"]
    return lines


def headline_section(rows) -> list[str]:
    """Default FlashPrefill and the noise floor on test, per length and over all."""
    arms = [a for a in ("dense_kernels", "fp") if a in arms_in(rows)]
    if "test" not in splits_in(rows) or not arms:
        return []
    lines = ["", "## Test split: the default setting and the noise floor", "",
             "The noise floor is dense attention through the same backend (FlashPrefill at alpha 0: every block "
             "kept), which differs from Full only in floating-point rounding; a sparse arm's difference inside the "
             "floor's is not evidence of an effect of sparsity.", ""]
    table = []
    for arm in arms:
        for c in compare(rows, arm, "test", by=("length",)):
            L = c.group["length"]
            table.append([_label(arm), "all" if L == "all" else length_label(L), c.result.n,
                          _pct(c.result.mean_a), _pct(c.result.mean_b), format_interval(c.result), f"{c.density:.1%}"])
    lines.append(markdown_table(["arm", "length", "prompts", "Full", "arm", "arm - Full", "density"], table))
    return lines


def _meets(result) -> bool:
    return result.diff >= -GOAL_LOSS and result.low >= GOAL_LOW


def goal_section(rows) -> list[str]:
    """The issue's goal for the default, per length and over all lengths; decided only on a powered test set."""
    if "test" not in splits_in(rows) or "fp" not in arms_in(rows):
        return []
    per = compare(rows, "fp", "test", by=("length",))
    cells = {}
    for r in rows:
        if r["arm"] == "fp" and r["split"] == "test":
            cells[(r["family"], r["length"])] = cells.get((r["family"], r["length"]), 0) + 1
    lines = ["", "## The goal", "",
             f"Goal: the default within {GOAL_LOSS:g} point of Full on the test split at every length, with the 95% "
             f"interval's lower end above {GOAL_LOW:g} points, at a density no higher than the independent check's "
             f"({', '.join(f'{length_label(L)} {d:.0%}' for L, d in ISSUE_DENSITY.items())}).", ""]
    table = [[length_label(c.group["length"]) if c.group["length"] != "all" else "all", format_interval(c.result),
              f"{c.density:.1%}", "yes" if _meets(c.result) else "**no**"] for c in per]
    lines.append(markdown_table(["length", "default - Full", "density", "within the goal"], table))
    if min(cells.values()) < MIN_PROMPTS:
        verdict = (f"not decided: {min(cells.values())} prompts in the smallest (family, length) cell; the powered "
                   f"design needs >= {MIN_PROMPTS}")
    else:
        missed = [length_label(c.group["length"]) for c in per[:-1] if not _meets(c.result)]
        verdict = f"not met at {', '.join(missed)}" if missed else "met at every length"
    lines += ["", f"Verdict: **{verdict}**."]
    if "dense_kernels" in arms_in(rows):
        chosen = [r for r in rows if r["arm"] != "full"]
        relabelled = [dict(r, arm="full") if r["arm"] == "dense_kernels" else r for r in chosen]
        floor = compare(relabelled, "fp", "test", by=("length",))
        lines += ["", "The default against the second dense path (FlashPrefill at alpha 0 through the same backend "
                      "and kernels, so that only the block selection differs): "
                      + "; ".join(f"{length_label(c.group['length']) if c.group['length'] != 'all' else 'all'} "
                                  f"{format_interval(c.result)}" for c in floor) + "."]
    return lines


def family_section(rows, arm: str = "fp") -> list[str]:
    if "test" not in splits_in(rows) or arm not in arms_in(rows):
        return []
    table = []
    for by in (("family", "length"), ("task", "length")):
        for c in compare(rows, arm, "test", by=by)[:-1]:
            table.append([c.group[by[0]], length_label(c.group["length"]), c.result.n, _pct(c.result.mean_a),
                          _pct(c.result.mean_b), format_interval(c.result), f"{c.density:.1%}"])
    return ["", f"## Test split per family and per task: {_label(arm)}", "",
            markdown_table(["family / task", "length", "prompts", "Full", "arm", "arm - Full", "density"], table)]


def arms_section(rows) -> list[str]:
    """Every arm on test (overall and per length): the table behind the Pareto figure."""
    if "test" not in splits_in(rows):
        return []
    lengths = _lengths(rows)
    table = []
    for arm in arms_in(rows):
        if arm == "full":
            continue
        per = {c.group["length"]: c for c in compare(rows, arm, "test", by=("length",))}
        table.append([_label(arm), ARMS[arm].group if arm in ARMS else "", format_interval(per["all"].result)]
                     + [f"{per[str(L)].result.diff:+.1f} / {per[str(L)].density:.0%}" for L in lengths])
    return ["", "## Every arm on the test split (accuracy against density: the Pareto table)", "",
            "Per length: difference from Full in points / density.", "",
            markdown_table(["arm", "group", "arm - Full, all lengths"] + [length_label(L) for L in lengths], table)]


def dev_section(rows) -> list[str]:
    pick, looked = choose_on_dev(rows)
    if pick is None:
        return []
    table = [[_label(c.arm), format_interval(c.result), f"{c.density:.1%}", "**chosen**" if c.arm == pick else ""]
             for c in looked]
    lines = ["", "## Knobs chosen on dev, reported on test", "",
             f"Rule (fixed in repro/powered/summary.py before the run): among the FlashPrefill arms, those with a dev "
             f"difference >= -{GOAL_LOSS:g} point and the interval's lower end >= {GOAL_LOW:g}; of those the lowest "
             "dev density; if none qualifies, the largest dev difference.", "",
             markdown_table(["arm (dev)", "arm - Full", "density", ""], table)]
    if "test" in splits_in(rows):
        per = compare(rows, pick, "test", by=("length",))
        lines += ["", f"On test, the chosen arm ({_label(pick)}): "
                  + "; ".join(f"{length_label(c.group['length']) if c.group['length'] != 'all' else 'all'} "
                              f"{format_interval(c.result)} at density {c.density:.1%}" for c in per) + "."]
    return lines


def power_section(rows) -> list[str]:
    if "test" not in splits_in(rows):
        return []
    lines = ["", "## Resolution", ""]
    for arm in [a for a in ("dense_kernels", "fp") if a in arms_in(rows)]:
        psi = discordant_rate(rows, arm, "test")
        n = sum(1 for r in rows if r["arm"] == arm and r["split"] == "test")
        need = prompts_needed(0.01, psi) if psi >= 0.01 else None
        lines.append(f"- {_label(arm)}: scores differ from Full's on {psi:.1%} of the {n} test prompts; resolving a "
                     f"1-point difference at that rate (5% level, 80% power) needs "
                     f"{'about ' + format(need, ',') if need else 'fewer than 100'} prompts.")
    return lines


def depth_section(rows) -> list[str]:
    arms = [a for a in ("full", "dense_kernels", "fp") if a in arms_in(rows)]
    if "test" not in splits_in(rows) or not any(r["family"] == "needle" for r in rows):
        return []
    prof = depth_profile(rows, arms, "test")
    bins = len(next(iter(prof.values())))
    header = ["arm"] + [f"{i / bins:.1f}-{(i + 1) / bins:.1f}" for i in range(bins)]
    return ["", "## Needle family by needle depth (test, all lengths)", "",
            markdown_table(header, [[_label(a)] + [_pct(x) for x in prof[a]] for a in arms])]


# Each FP8 arm and its twin in the model's dtype (the same selection; only the attention's arithmetic differs).
FP8_TWINS = {"fp+fp8": "fp", "dense_fp8": "dense_kernels"}


def fp8_section(rows) -> list[str]:
    """Test split: each FP8 arm minus its bf16 twin on the same prompts (issue 14: FP8 against bf16)."""
    pairs = [(a, b) for a, b in FP8_TWINS.items() if {a, b} <= set(arms_in(rows))]
    if "test" not in splits_in(rows) or not pairs:
        return []
    table = []
    for arm, twin in pairs:
        test = [r for r in rows if r["split"] == "test"]
        for s in stratified(test, PROMPT, {"arm": twin}, {"arm": arm}, by=("length",)):
            L = s.group["length"]
            table.append([_label(arm), _label(twin), length_label(int(L)) if L != "all" else "all", s.result.n,
                          _pct(s.result.mean_a), _pct(s.result.mean_b), format_interval(s.result)])
    return ["", "## FP8 attention against the same setting in bf16 (test split)", "",
            "The attention over the kept blocks in e4m3 (reference/fp8.py: Q, K, V and P quantised per block), "
            "paired with the same arm run in the model's dtype: the selection is the same, so the difference is what "
            "the quantisation costs.", "",
            markdown_table(["arm", "against", "length", "prompts", "bf16", "fp8", "fp8 - bf16"], table)]


def skipped_section(info, rows=()) -> list[str]:
    """What the time budget cut, in the call that cut it; with rows, arms that a later --append call ran are said
    to be run."""
    if not info.get("skipped"):
        return []
    ran = set(arms_in(rows))
    lines = ["", "## Skipped", ""] + [f"- {s}" for s in info["skipped"]]
    if ran:
        never = [a for a in ARMS if a not in ran]
        lines.append(f"- arms not run in any call: {never}" if never else "- every arm has run since (--append)")
    return lines


def write_report(path: Path, rows, info) -> Path:
    lines = (header_section(rows, info) + headline_section(rows) + goal_section(rows) + family_section(rows)
             + dev_section(rows) + arms_section(rows) + fp8_section(rows) + depth_section(rows) + power_section(rows)
             + skipped_section(info, rows))
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path
