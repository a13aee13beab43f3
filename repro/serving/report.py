"""The serving check's markdown report, one function per section. Rows are scenarios.row's (values may be strings,
as read back from the CSV); `info` is the run's JSON (command, wall time, settings, the path evidence)."""

from __future__ import annotations

from pathlib import Path

from ..common import length_label, markdown_table, stamp_line, stamp_of
from ..stats import format_interval, paired_difference
from .evidence import aggregate, problems

MAX_DIFFERING = 20  # differing answers listed in full


def _groups(rows) -> list[tuple[str, str, str]]:
    """(attention, scenario, variant) in first-seen order."""
    return list(dict.fromkeys((r["attention"], r["scenario"], r["variant"]) for r in rows))


def header_section(rows, info) -> list[str]:
    s = info["settings"]
    lines = ["# Serving-style calls vs one-shot FlashPrefill", "",
             f"Model: {info.get('model', '?')}; FlashPrefill alpha {s['alpha']}, block size {s['block_size']}, "
             f"greedy decoding; held-out test prompts of the powered evaluation ({', '.join(s['families'])}), "
             f"{s['n']} per length. Does a serving-style call give the same greedy answer, token for token, as "
             "one-shot FlashPrefill on the same prompt, and what does that do to the task score (RULER's string "
             "match, 0-100)?", "",
             "- **chunked**: the prompt prefilled in chunks of " + " and ".join(map(str, s["chunks"])) + " tokens "
             "(one forward call per chunk over a DynamicCache; generate prefills the last chunk and decodes)"
             + (", and again in chunks of " + " and ".join(map(str, s["declared_chunks"])) + " declared (the chunks "
                "before the last inside flashprefill_hf.more_chunks_follow)" if s.get("declared_chunks") else "")
             + ", vs generate on the whole prompt in one call;",
             "- **padded**: prompts of different lengths (the same family and index at every length) left-padded "
             "into one batch with an attention mask, vs each prompt alone;",
             "- **multi_turn**: turn 1 (the context and a first question) generated into a cache, turn 2 (answer 1 "
             "and the real question) continuing it, vs a one-shot prefill of the whole conversation (the same ids); "
             "the turn-2 answers are compared.", ""]
    if rows:
        lines += [stamp_line(stamp_of(rows[0])), ""]
    lines += [f"Command: `{info['command']}`; wall time {info.get('wall_seconds', '?')} s."]
    if info.get("note"):
        lines += ["", f"Note: {info['note']}"]
    return lines


def check_section(info) -> list[str]:
    """The verdict, then every run's prefill calls per kind (evidence.py), summed per variant, side and lengths."""
    found = problems(info["evidence"])
    verdict = ("**Path check: PASSED.** No prefill call of a FlashPrefill run fell back to dense attention, and "
               "every serving run ran FlashPrefill's varlen layout (with a cached prefix where its scenario has one)."
               if not found else "**Path check: FAILED.**\n\n" + "\n".join(f"- {p}" for p in found))
    table = [[g["attention"], g["variant"], g["side"], g["lengths"], g["runs"],
              ", ".join(f"{k} {n}" for k, n in sorted(g["calls"].items())) or "none", g["max_prefix"]]
             for g in aggregate(info["evidence"])]
    return ["", "## Which attention ran", "", verdict, "",
            "Prefill calls recorded by the backend's DensityRecorder (one per layer per model call; decoding steps, "
            "dense by design, are not recorded), per kind: flashprefill/batch (whole unpadded prompts), "
            "flashprefill/varlen (padded rows or a chunk after a cached prefix), dense_fallback (reason). "
            "Prefix: the longest cached prefix of a varlen call, in tokens. Runs under sdpa (the dense floor) do "
            "not go through the backend.", "",
            markdown_table(["attention", "variant", "side", "lengths", "runs", "prefill calls", "prefix"], table)]


def answers_section(rows) -> list[str]:
    """Per attention, variant and length (and over all lengths): identical answers, scores, densities."""
    table = []
    for attention, scenario, variant in _groups(rows):
        group = [r for r in rows if (r["attention"], r["scenario"], r["variant"]) == (attention, scenario, variant)]
        lengths = sorted({int(r["length"]) for r in group})
        for L in lengths + (["all"] if len(lengths) > 1 else []):
            cell = [r for r in group if L == "all" or int(r["length"]) == L]
            same = sum(int(r["identical"]) for r in cell)
            one_shot = [float(r["score_one_shot"]) for r in cell]
            served = [float(r["score"]) for r in cell]
            diff = paired_difference(one_shot, served)
            table.append([attention, variant, L if L == "all" else length_label(L), len(cell),
                          f"{same}/{len(cell)} ({100 * same / len(cell):.0f}%)", f"{diff.mean_b:.1f}",
                          f"{diff.mean_a:.1f}", format_interval(diff), _mean(cell, "density"),
                          _mean(cell, "density_one_shot")])
    return ["", "## Answers", "",
            "Identical: the serving call's answer equals one-shot's token for token (up to the end of sequence or "
            "the task's budget). Score: the serving call's, then one-shot's; difference: serving minus one-shot "
            "in points, with a 95% paired-bootstrap interval (and the exact McNemar test where every score is 0 "
            "or 100; repro/stats.py). Density: kept / causal blocks of the prefill calls, mean over layers and "
            "prompts (1.0 under sdpa).", "",
            markdown_table(["attention", "variant", "length", "n", "identical", "score", "one-shot score",
                            "difference", "density", "one-shot density"], table)]


def _mean(rows, field: str) -> str:
    return f"{sum(float(r[field]) for r in rows) / len(rows):.3f}"


def differing_section(rows) -> list[str]:
    differing = [r for r in rows if not int(r["identical"])]
    if not differing:
        return ["", "Every serving answer is identical to its one-shot answer."]
    table = [[r["attention"], r["variant"], length_label(r["length"]), r["task"], r["seed"], r["first_difference"],
              _cell(r["prediction_one_shot"]), _cell(r["prediction"]), r["answer"]]
             for r in differing[:MAX_DIFFERING]]
    more = len(differing) - len(table)
    return ["", f"## Answers that differ ({len(differing)})", "",
            "First difference: the index of the first generated token that differs.", "",
            markdown_table(["attention", "variant", "length", "task", "seed", "first difference", "one-shot",
                            "serving", "expected"], table)] + (["", f"({more} more in the CSV.)"] if more else [])


def _cell(text: str) -> str:
    return text.replace("|", "/")[:80]


def reading_section(info) -> list[str]:
    floor = ("The dense floor (attention sdpa) ran the same calls with transformers' exact attention: a serving "
             "answer that differs there too differs because of floating-point order (other kernel shapes, "
             "batch sizes, chunk boundaries), not because of FlashPrefill." if info["settings"]["dense_floor"] else
             "The dense floor was not run (--dense-floor runs the same calls with sdpa, which tells rounding "
             "from FlashPrefill's chunk semantics).")
    return ["", "## Reading it", "",
            "FlashPrefill is not bit-for-bit invariant to these calls by design: unless the chunks before the last "
            "run inside flashprefill_hf.more_chunks_follow (the \"declared\" variants), the backend takes every call "
            "as the last chunk of its prompt, so each chunk's last query blocks are dense (the one-shot prefill has "
            "dense last blocks only at the prompt's end), and a chunk boundary inside a block scores that block from "
            "the rows each chunk has (docs/DESIGN.md section 9). Undeclared block-aligned chunks therefore keep a few "
            "more blocks than one shot; the density columns show how many; declared ones select as one shot does. "
            + floor]


def write_report(path: Path, rows, info) -> Path:
    lines = (header_section(rows, info) + check_section(info) + answers_section(rows) + differing_section(rows)
             + reading_section(info))
    path = Path(path)
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path
