"""The long-context run's markdown report: the RoPE choice on dev, then the powered report's test sections
(each arm paired with Full) and the per-layer densities."""

from __future__ import annotations

from pathlib import Path

from ..common import length_label, markdown_table, stamp_line, stamp_of
from ..powered import report as powered
from ..powered.summary import arms_in, splits_in
from ..stats import format_interval
from .rope import CONTROL, ROPE_METHODS
from .summary import choose_methods, full_dev_score, layer_density, method_comparisons

COLLAPSED = 10.0  # Full test score (points) under which a task counts as collapsed at a length


def _lengths(rows) -> list[int]:
    return sorted({int(r["length"]) for r in rows})


def header_section(rows, info) -> list[str]:
    prompts = {}  # (split, length) -> the prompts Full answered (on dev once per RoPE method)
    for r in rows:
        if r["arm"] == "full":
            prompts.setdefault((r["split"], int(r["length"])), set()).add((r["family"], r["task"], r["seed"]))
    counts = {key: len(v) for key, v in prompts.items()}
    lines = ["# Longer real contexts: SmolLM2-135M at 16K-32K with RoPE scaling", "",
             f"Model: {info.get('model', '?')} (trained context 8K), bf16 where on a GPU, greedy decoding, the powered "
             "evaluation's task families and seeds (repro/powered) at lengths past the trained context. RoPE scaling "
             "through transformers' own initialisers (repro/long_context/rope.py): linear interpolation, dynamic NTK "
             "or YaRN with factor length / 8K, chosen per length by Full's dev score; 'none' (the trained RoPE "
             "extrapolated) is a control. Every test arm runs with the chosen method and is paired with Full on "
             "the same prompts (differences in points, 95% paired-bootstrap interval, McNemar).", "",
             stamp_line(stamp_of(rows[0])), "", "Commands: " + "; ".join(f"`{c}`" for c in info.get("commands", [])),
             f"Wall time: {info.get('wall_seconds', '?')} s.", "",
             "Prompts per length: " + "; ".join(f"{length_label(L)}: dev {counts.get(('dev', L), 0)} (per method), "
                                                f"test {counts.get(('test', L), 0)}" for L in _lengths(rows)) + "."]
    if info.get("note"):
        lines += ["", f"Note: {info['note']}"]
    return lines


def rope_section(rows) -> list[str]:
    """Full's dev score per method and length, each method against the chosen one."""
    chosen, against = choose_methods(rows), method_comparisons(rows)
    table = []
    for L, best in chosen.items():
        for method in (CONTROL, *ROPE_METHODS):
            score = full_dev_score(rows, method, L)
            if score != score:
                continue
            vs = "**chosen**" if method == best else format_interval(against[L][method])
            table.append([length_label(L), method, f"{score:.1f}", vs])
    return ["", "## RoPE scaling chosen on dev (Full only)", "",
            "Rule (fixed before the run): the method of linear / dynamic / yarn with the best Full dev score per "
            "length (ties: that order). Last column: the method's score minus the chosen one's, paired on the dev "
            "prompts.", "", markdown_table(["length", "RoPE", "Full dev score", "minus chosen"], table)]


def collapse_section(rows, powered_rows=()) -> list[str]:
    """Full's test score per length and task, and the tasks on which it collapsed (below COLLAPSED points);
    powered_rows: the 2K-8K powered run's, for Full's scores within the trained context."""
    if "test" not in splits_in(rows):
        return []
    lengths, cells = _lengths(rows), {}
    for r in rows:
        if r["arm"] == "full" and r["split"] == "test":
            cells.setdefault((r["task"], int(r["length"])), []).append(float(r["score"]))
    tasks = sorted({t for t, _ in cells})
    mean = {k: sum(v) / len(v) for k, v in cells.items()}
    table = [[t] + [f"{mean[(t, L)]:.1f}" if (t, L) in mean else "" for L in lengths] for t in tasks]
    collapsed = [f"{t} at {length_label(L)}" for (t, L), m in sorted(mean.items()) if m < COLLAPSED]
    within = {}
    for r in powered_rows:
        if r["arm"] == "full" and r["split"] == "test":
            within.setdefault(int(r["length"]), []).append(float(r["score"]))
    reference = ("; for reference, Full over the same tasks in the committed 2K-8K powered run: " + ", ".join(
        f"{length_label(L)} {sum(v) / len(v):.1f}" for L, v in sorted(within.items()))) if within else ""
    per_length = {L: [x for (t, L2), v in cells.items() if L2 == L for x in v] for L in lengths}
    overall = ", ".join(f"{length_label(L)} {sum(v) / len(v):.1f}" for L, v in per_length.items())
    return ["", "## Does Full itself hold up?", "",
            f"Full's test score per task; over all test prompts: {overall}{reference}.", "",
            markdown_table(["task"] + [length_label(L) for L in lengths], table), "",
            (f"Full scores below {COLLAPSED:g} points (collapsed) on: {', '.join(collapsed)}. Differences on those "
             "cells say little about sparsity." if collapsed else
             f"Full scores at least {COLLAPSED:g} points on every task and length.")]


def layers_section(layers) -> list[str]:
    arms = [a for a in dict.fromkeys(r["arm"] for r in layers)]
    if not arms:
        return []
    lines = ["", "## Density per layer (test)", "",
             "Kept fraction of causal blocks per layer, averaged over the test prompts (first, median and last "
             "layer, and the range over layers)."]
    table = []
    for arm in arms:
        for L, per in layer_density(layers, arm).items():
            values = sorted(per.values())
            table.append([powered._label(arm), length_label(L), f"{per[min(per)]:.1%}",
                          f"{values[len(values) // 2]:.1%}", f"{per[max(per)]:.1%}",
                          f"{values[0]:.1%} - {values[-1]:.1%}"])
    return lines + ["", markdown_table(["arm", "length", "layer 0", "median layer", "last layer", "range"], table)]


def write_report(path: Path, rows, layers, info, powered_rows=()) -> Path:
    lines = (header_section(rows, info) + rope_section(rows) + collapse_section(rows, powered_rows)
             + powered.headline_section(rows) + powered.family_section(rows) + powered.arms_section(rows)
             + layers_section(layers) + powered.power_section(rows) + powered.skipped_section(info))
    if "test" in splits_in(rows) and "fp" not in arms_in(rows):
        lines += ["", "The default FlashPrefill arm did not run (see Skipped)."]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path
