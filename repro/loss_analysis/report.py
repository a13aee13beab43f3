"""The loss analysis's markdown summary, one function per section; everything from the CSV rows and run.json."""

from __future__ import annotations

import math
import statistics
from pathlib import Path

from ..common import length_label, markdown_table, stamp_line, stamp_of
from ..stats import format_interval
from .analysis import (RTOL, alpha_arms, auc_smaller, group_mean, is_monotone, margin_split, monotone_series, num,
                       overlap, paired, permutation_p, pooled_error, truthy)

GROUPS = ("flipped", "control", "unknown")
IMPL_WORDS = {"triton_impl": "the Triton kernels, in the model's dtype",
              "reference": "the PyTorch reference, in float32"}


def fmt(x, digits: int = 3) -> str:
    x = num(x)
    return "n/a" if math.isnan(x) else f"{x:.{digits}g}"


def _alphas(rows) -> list[float]:
    return sorted({num(r["alpha"]) for r in rows if str(r["alpha"]) != ""})


def _groups(rows) -> list[str]:
    present = {r["group"] for r in rows}
    return [g for g in GROUPS if g in present]


def _monotone_line(rows, series, y: str, what: str, unit: str = "(prompt, layer) series") -> list[str]:
    ok, total, bad = monotone_series(rows, series, y)
    lines = [f"- {what}: non-decreasing in alpha in **{ok} of {total}** {unit}."]
    lines += [f"  - not monotone: {b}" for b in bad[:6]]
    if len(bad) > 6:
        lines.append(f"  - ... and {len(bad) - 6} more (the CSV has them all)")
    return lines


def header_section(tables, info) -> list[str]:
    prompts = tables["prompts"]
    lines = ["# Where FlashPrefill's accuracy loss comes from: layer errors, drift, margins and the needle block", "",
             f"Model: {info.get('model', '?')} ({info.get('dtype', '?')}) on {info.get('device', '?')}; FlashPrefill "
             f"runs as {IMPL_WORDS.get(info.get('impl'), info.get('impl', '?'))}; block size 128, 2 sink blocks, "
             "a window of 4 blocks, the last 2 query blocks dense. Alphas: "
             f"{', '.join(f'{a:g}' for a in info.get('alphas', []))} (default {info.get('default_alpha', 0.12):g}).",
             "", "Two levels, kept apart throughout: the **operator level** (teacher-forced) runs each layer's "
             "FlashPrefill on the q/k/v that Full's forward gave that layer, so its error is the layer's own; "
             "the **in-model** level runs the whole model through the backend at one alpha, so errors compound "
             "over the layers and reach the answer's logits.", ""]
    if prompts:
        lines += [stamp_line(stamp_of(prompts[0])), ""]
    phases = info.get("phase_seconds", {})
    lines += [f"Command: `{info.get('command', '?')}`; wall time {info.get('wall_seconds', '?')} s (model load "
              f"{info.get('load_seconds', '?')} s; Full forwards with capture {phases.get('full', '?')} s, operator "
              f"level {phases.get('operator', '?')} s, in-model {phases.get('in_model', '?')} s).", "",
              f"Prompts: {info.get('choice', '?')}. Samples CSV: `{info.get('samples') or 'none'}`. Layers of the "
              f"operator level: {info.get('layers', 'all')}.", ""]
    scaled = {L: m for L, m in info.get("rope", {}).items() if m != "none"}
    if scaled:
        lines += ["RoPE scaling (repro/long_context/rope.py), every forward: " + ", ".join(
            f"{length_label(int(L))} {m}" for L, m in sorted(scaled.items(), key=lambda x: int(x[0]))) + ".", ""]
    table = [[f"{p['task']} {length_label(p['length'])} s{p['seed']}", p["group"], p["depth"],
              f"[{p['needle_start']}, {p['needle_end']}) / {p['needle_blocks']}", p["question_start"],
              p["csv_full_score"] or "-", p["csv_fp_score"] or "-", fmt(p["full_margin_answer_min"]),
              "yes" if truthy(p["full_answer_greedy"]) else "no"] for p in prompts]
    lines += [markdown_table(["prompt", "group", "depth", "answer tokens / key block", "question from token",
                              "Full (CSV)", "alpha 0.12 (CSV)", "Full answer margin", "Full writes it"], table)
              if table else "No prompt was analysed.", "",
              "Answer margin: the teacher-forced answer's smallest (correct logit - best other logit) over its "
              "tokens under Full; > 0 means greedy decoding writes the answer's tokens (\"writes it\")."]
    for s in info.get("skipped", []):
        lines += ["", f"Skipped: {s}."]
    if info.get("note"):
        lines += ["", f"Note: {info['note']}"]
    return lines


def operator_section(tables) -> list[str]:
    rows = tables["operator"]
    if not rows:
        return []
    alphas = _alphas(rows)
    pooled = pooled_error(rows)
    layers = sorted({int(num(r["layer"])) for r in rows})
    density = group_mean(rows, ("alpha",), "density")
    table = [[layer] + [fmt(pooled[(float(layer), a)]) for a in alphas] for layer in layers]
    every = pooled_error(rows, by=("alpha",))
    table.append(["all"] + [fmt(every[(a,)]) for a in alphas])
    table.append(["density"] + [f"{density[(a,)]:.1%}" for a in alphas])
    lines = ["", "## 1. Operator level (teacher-forced): per-layer error against alpha, and nestedness", "",
             "Relative error ||out - dense|| / ||dense|| of FlashPrefill's output against exact float32 dense "
             "attention, pooled over the prompts (square root of summed squared errors over summed squared norms); "
             "alpha 0 keeps every block, so its column is the rounding floor of the implementation. Density: "
             "kept / causal blocks, mean over prompts and layers.", "",
             markdown_table(["layer"] + [f"alpha {a:g}" for a in alphas], table), "",
             f"Monotone checks (a step may fall by at most {RTOL:.0%} of its value plus the series' alpha-0 "
             "value):"]
    lines += _monotone_line(rows, ("task", "length", "seed", "layer"), "rel_error", "Error per prompt and layer")
    pooled_ok = sum(is_monotone([pooled[(float(layer), a)] for a in alphas], RTOL, pooled.get((float(layer), 0.0), 0))
                    for layer in layers)
    lines.append(f"- Pooled error per layer: monotone in **{pooled_ok} of {len(layers)}** layers.")
    nest = [r for r in rows if str(r.get("prev_alpha", "")) != ""]
    if nest:
        pairs = sorted({(num(r["prev_alpha"]), num(r["alpha"])) for r in nest})
        ntable = []
        for lo, hi in pairs:
            sel = [r for r in nest if (num(r["prev_alpha"]), num(r["alpha"])) == (lo, hi)]
            ntable.append([f"{lo:g} -> {hi:g}", sum(int(num(r["extra_blocks"])) for r in sel),
                           sum(int(num(r["kept_blocks"])) for r in sel),
                           fmt(max(num(r["not_nested"]) for r in sel))])
        lines += ["", "Nestedness: blocks kept at the larger alpha but not at the smaller one (0 when the kept sets "
                  "are nested), summed over prompts, layers and heads:", "",
                  markdown_table(["alphas", "extra blocks", "kept at the larger alpha", "largest fraction of a layer"],
                                 ntable)]
    return lines


def in_model_section(tables) -> list[str]:
    drift, answers = tables["drift"], tables["answers"]
    if not drift:
        return []
    alphas = _alphas(drift)
    last = group_mean(drift, ("layer", "alpha"), "drift_last")
    every = group_mean(drift, ("layer", "alpha"), "drift_tokens")
    layers = sorted({int(num(r["layer"])) for r in drift})
    table = [[layer] + [f"{fmt(last[(float(layer), a)])} / {fmt(every[(float(layer), a)])}" for a in alphas]
             for layer in layers]
    lines = ["", "## 2. In model: drift of each layer's output against Full, and the answer", "",
             "The model runs FlashPrefill at one alpha through the backend (`flashprefill_hf.configure`, as the "
             "powered run's arms do); each layer's output hidden state is compared with Full's (sdpa) on the same "
             "prompt: relative difference at the last prompt token / its mean over all tokens (each token's "
             "own relative difference), mean over prompts; the last layer's is after the final norm. The CSV also "
             "has drift_all, the relative Frobenius difference over all tokens, which weights tokens by their norm "
             "(a few tokens of very large norm, such as attention sinks, can dominate it).", "",
             markdown_table(["layer"] + [f"alpha {a:g}: last / per token" for a in alphas], table), ""]
    for y, what in (("drift_last", "Last-token drift"), ("drift_tokens", "Per-token drift"),
                    ("drift_all", "All-token (Frobenius) drift")):
        lines += _monotone_line(drift, ("task", "length", "seed", "layer"), y, what)
    return lines + answers_subsection(answers, alphas)


def answers_subsection(answers, alphas) -> list[str]:
    """Per alpha: the answer's first token and teacher-forced margin against Full's."""
    full = {_key(r): r for r in answers if r["setting"] == "full"}
    table = []
    for a in alphas:
        sel = [r for r in answers if r["setting"] == "flashprefill" and num(r["alpha"]) == a]
        base = [full[_key(r)] for r in sel]
        change = [num(r["margin_answer_min"]) - num(b["margin_answer_min"]) for r, b in zip(sel, base)]
        lost = sum(truthy(b["answer_greedy"]) and not truthy(r["answer_greedy"]) for r, b in zip(sel, base))
        won = sum(not truthy(b["answer_greedy"]) and truthy(r["answer_greedy"]) for r, b in zip(sel, base))
        table.append([f"{a:g}", f"{sum(num(r['density']) for r in sel) / max(1, len(sel)):.1%}",
                      f"{sum(truthy(r['top1_same']) for r in sel)} / {len(sel)}",
                      f"{sum(truthy(r['answer_greedy']) for r in sel)} / {len(sel)}", f"{lost} / {won}",
                      fmt(sum(change) / max(1, len(change)))])
    n_full = sum(truthy(r["answer_greedy"]) for r in full.values())
    blank = sum(not r["top1_text"].strip() for r in full.values())
    lines = ["", f"Answers (Full writes the answer in {n_full} of {len(full)} prompts, teacher-forced): in-model "
             "density; first generated token equal to Full's; greedy would write the answer; prompts lost / won "
             f"against Full; mean change of the answer margin (logits). Full's first generated token is blank (a "
             f"space before the answer) in {blank} of {len(full)} prompts: the first-token margin (`margin_first` "
             "in the CSV) then measures that space, the answer margin the answer's own tokens.", "",
             markdown_table(["alpha", "density", "first token = Full's", "writes the answer", "lost / won",
                             "margin change"], table), ""]
    drops = [dict(r, margin_drop=num(full[_key(r)]["margin_answer_min"]) - num(r["margin_answer_min"]))
             for r in answers if r["setting"] == "flashprefill"]
    return lines + _monotone_line(drops, ("split", "task", "length", "seed"), "margin_drop",
                                  "The answer margin's drop below Full's", unit="prompts")


def flip_section(tables) -> list[str]:
    answers = tables["answers"]
    if not answers:
        return []
    lines = ["", "## 3. Do the flips happen where Full's margin is small?", "",
             "Full margin = the teacher-forced answer margin under Full (section 2). AUC = the probability that a "
             "prompt that flips has a smaller Full margin than one that does not (0.5: no relation); p: two-sided "
             "permutation test of AUC = 0.5. 'CSV' flips are the powered run's (Full right, the arm wrong; the "
             "analysed prompts were chosen half flipped at alpha 0.12); 'in-model' flips are Full writing the "
             "answer and the alpha run not (teacher-forced, this run).", ""]
    full_writes = {_key(r): truthy(r["answer_greedy"]) for r in answers if r["setting"] == "full"}

    def csv_flip(r):
        return truthy(r["csv_flipped"]) if str(r["csv_flipped"]) else None

    def model_flip(r):  # only prompts whose answer Full writes can flip
        return not truthy(r["answer_greedy"]) if full_writes.get(_key(r)) else None

    table = []
    for a in _alphas(answers):
        for source, flip_of in (("CSV", csv_flip), ("in-model", model_flip)):
            flips, others = margin_split(answers, a, flip_of)
            if not flips and not others:
                continue
            table.append([f"{a:g}", source, f"{len(flips)} / {len(flips) + len(others)}",
                          fmt(_median(flips)), fmt(_median(others)), fmt(auc_smaller(flips, others), 2),
                          fmt(permutation_p(flips, others), 2)])
    if not table:
        return lines + ["No prompt with a known outcome."]
    return lines + [markdown_table(["alpha", "flips", "flipped / prompts", "median Full margin, flipped",
                                    "median, not flipped", "AUC", "p"], table)]


def needle_section(tables, info) -> list[str]:
    needle, operator = tables["needle"], tables["operator"]
    if not needle:
        return []
    alpha = num(needle[0]["alpha"])
    groups = _groups(needle)
    between = group_mean(needle, ("layer", "group"), "kept_between")
    ratio = group_mean(needle, ("layer", "group"), "needle_ratio")
    kept_last = group_mean(needle, ("layer", "group"), "kept_last")
    layers = sorted({int(num(r["layer"])) for r in needle})
    table = [[layer] + [fmt(d.get((float(layer), g)), 2) for d in (between, kept_last, ratio) for g in groups]
             for layer in layers]
    overall = group_mean(needle, ("group",), "kept_between")
    forced = [r for r in needle if str(r["question_forced"]) != ""]
    n_forced = sum(num(r["question_forced"]) == 1 for r in forced)
    undecided = sum(num(r["n_decided"]) == 0 for r in needle)
    header = ["layer"] + [f"{what}, {g}" for what in ("kept between", "kept last", "score ratio") for g in groups]
    lines = ["", f"## 4. Is the needle's key block kept? (operator level, alpha {alpha:g})", "",
             f"(a) The question's query blocks: the pairs (question block, needle block) are forced by the safety "
             f"net in {n_forced} of {len(forced)} (prompt, layer, head) rows (the prompt's tail lies in the last 2 "
             "query blocks, always dense), so there the needle block is always kept.", "",
             "(b) Between the needle and the end: 'kept between' = the fraction of the decided pairs (query block "
             "after the needle, not forced by the sinks, the window or the dense last rows) whose needle key block "
             "is kept; 'kept last' = the same for the last decided query block, just before the dense tail; "
             "'score ratio' = the median over the decided pairs of Score / row max (kept iff >= alpha). Mean over "
             f"heads and prompts. {undecided} rows have no decided pair (needle in a sink block or within the "
             "window of the end).", "",
             markdown_table(header, table), "",
             "Over all layers: " + ", ".join(f"{g} {fmt(overall[(g,)], 2)}" for g in groups) + "."]
    if operator and "needle_kept_between" in operator[0]:
        per_alpha = group_mean(operator, ("alpha", "group"), "needle_kept_between")
        rows = [[f"{a:g}"] + [fmt(per_alpha.get((a, g)), 2) for g in groups] for a in _alphas(operator)]
        lines += ["", "Kept between, mean over heads, layers and prompts, at every alpha:", "",
                  markdown_table(["alpha"] + groups, rows)]
    return lines


def samples_section(tables) -> list[str]:
    rows = tables.get("samples_used") or []
    lines = ["", "## 5. The samples CSV: accuracy against alpha on all its prompts", ""]
    if not rows:
        return lines + ["Skipped: no samples CSV (nothing to pair)."]
    arms = alpha_arms(rows)
    n = len({(r["task"], r["length"], r["seed"]) for r in rows if r["arm"] == "full"})
    lengths = ", ".join(length_label(L) for L in sorted({int(r["length"]) for r in rows}))
    lines += [f"The powered run's {n} {rows[0]['split']} prompts of the {rows[0]['family']} family at {lengths}, "
              "every plain FlashPrefill arm it has; differences in points with 95% paired-bootstrap intervals and "
              "the exact McNemar test (repro/stats.py).", ""]
    table = []
    for alpha, arm in arms:
        table.append([f"{alpha:g} ({arm})", "Full", _compare(rows, "full", arm)])
    for (a, arm_a), (b, arm_b) in zip(arms, arms[1:]):
        table.append([f"{b:g} ({arm_b})", f"{a:g} ({arm_a})", _compare(rows, arm_a, arm_b)])
    lines += [markdown_table(["arm", "against", "difference"], table), "",
              "Prompts lost against Full (Full right, the arm wrong) at two alphas, against the number expected if "
              "the two alphas lost prompts independently of each other:", ""]
    otable = []
    for i, (a, arm_a) in enumerate(arms):
        for b, arm_b in arms[i + 1:]:
            o = overlap(rows, arm_a, arm_b)
            otable.append([f"{a:g} / {b:g}", o["n_right"], o["lost_a"], o["lost_b"], o["both"], fmt(o["expected"], 2)])
    return lines + [markdown_table(["alphas", "Full right", "lost at the first", "at the second", "at both",
                                    "expected if independent"], otable)]


def _compare(rows, a: str, b: str) -> str:
    try:
        return format_interval(paired(rows, a, b))
    except ValueError as e:
        return f"not paired: {e}"


def _median(xs) -> float:
    return statistics.median(xs) if xs else math.nan


def _key(row) -> tuple:
    return row["split"], row["task"], row["length"], row["seed"]


def write_report(path: Path, tables: dict, info: dict) -> Path:
    lines = header_section(tables, info) + operator_section(tables) + in_model_section(tables)
    lines += flip_section(tables) + needle_section(tables, info) + samples_section(tables)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path
