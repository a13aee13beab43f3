"""The markdown report of a sparsity_accuracy run: one function per section, each returning its lines, and
`write_report` joining them. Rows are the CSV's (strings); `args` is the first command's parsed arguments (the
planned prompts) plus the note, the sparsity CSV and whether the figure was written."""

from __future__ import annotations

import math
from pathlib import Path

from block_selectors import PEERS, SELECTORS

from ..common import ROOT, markdown_table, stamp_line
from .experiment import prompt_key
from .summary import error_matched, matched, selector_name, summarize


def _shown(path: Path) -> str:
    """A path as the report names it: relative to the repository root when inside it."""
    path = Path(path).resolve()
    return str(path.relative_to(ROOT)) if path.is_relative_to(ROOT) else str(path)


def _pct(x: float) -> str:
    return f"{100 * x:.1f}%"


def _match_words(summary, match, fp, key) -> str:
    what = {"score": "score", "same": "agreement with Full"}[key]

    def val(s):
        return f"{s['score']:.1f}" if key == "score" else f"{round(s['same'] * s['n'])}/{s['n']}"
    words = []
    for peer in PEERS:
        m = match[peer]
        if m is None:
            words.append(f"{selector_name(peer)}: no grid setting reaches FlashPrefill's {what} {val(fp)}")
            continue
        sparsest = min((s for s in summary if s["method"] == peer), key=lambda s: s["density"])
        edge = " (the sparsest setting of its grid: a sparser one might match too)" if m is sparsest else ""
        words.append(f"{selector_name(peer)} {m['param']} {m['value']:g}{edge}, density {_pct(m['density'])} vs "
                     f"FlashPrefill {_pct(fp['density'])} ({what} {val(m)} vs {val(fp)})")
    return "; ".join(words)


def run_lines(rows: list[dict], walls: dict[str, float]) -> list[str]:
    """One markdown line per run whose rows are in `rows` (in order): its command, wall time, commit and date."""
    runs: dict[str, list[dict]] = {}
    for r in rows:
        runs.setdefault(r.get("command", ""), []).append(r)
    lines = []
    for cmd, rs in runs.items():
        wall = walls.get(cmd, math.nan)
        lines.append(f"Command: `python -m repro.sparsity_accuracy {cmd}` — wall time "
                     f"{'n/a' if math.isnan(wall) else f'{wall / 60:.1f}'} min; {len(rs)} answers; commit "
                     f"{rs[0].get('commit', '?')}, {rs[0].get('date', '?')}.")
    return lines


def header_section(rows, args, stamp, walls, skipped) -> list[str]:
    """Title, machine, the commands, the prompts, the selectors, the matching rule and the note."""
    name = rows[0]["model"] if rows else "?"
    lengths = sorted({int(r["length"]) for r in rows})
    prompts = sorted({prompt_key(r) for r in rows})
    tasks = sorted({r["task"] for r in rows})
    planned = len(args.seeds) * len(args.lengths) * len(args.tasks)
    lines = [f"# Density vs task accuracy per block selector on {name}" + (" (quick mode)" if args.quick else ""),
             "", stamp_line(stamp), "",
             *run_lines(rows, walls), "",
             f"Model threads {args.threads}, one thread inside the CPU reference. With several commands, the later "
             "ones ran more settings on the prompts of the first (--append), or answered some of its prompts again "
             "with every setting, replacing their rows (--append --redo); each CSV row names its command and carries "
             "its own environment stamp.", "",
             f"Every setting answered the same {len(prompts)} prompt(s) (of {planned} planned"
             + (f"; {'; '.join(skipped)}" if skipped else "") + f"): tasks {', '.join(tasks)}; lengths "
             f"{', '.join(map(str, lengths))} tokens (budget; the chat-formatted prompts have "
             f"{min(int(r['tokens']) for r in rows)}-{max(int(r['tokens']) for r in rows)} tokens); seeds "
             f"{sorted({int(r['seed']) for r in rows})} — a seed range of its own, distinct from the evaluation "
             f"seeds 0-2 of the committed accuracy runs; needle depths {args.depths} (one per seed). Greedy "
             "decoding, dense attention while decoding; score = RULER string match in percent; same as Full = the "
             "greedy answer is identical to Full attention's; density = kept causal blocks / all causal blocks, "
             "mean over the 30 layers, all heads and the prompts.", "",
             "Selectors: FlashPrefill = `reference.flash_prefill` (block 128, sink 2, window 4, last 2 dense blocks); "
             "FlexPrefill = `peers.flexprefill_select` (tau 0.1, min_budget 1024 tokens, block 128; knob "
             "gamma); XAttention = `peers.xattention_select` (stride 8, block 128, sink and diagonal kept; "
             "knob threshold). The peers are our PyTorch readings of their papers, attending with "
             "`reference.block_sparse_attention` on this CPU.", "",
             "**Accuracy-matched** (marked *matched*): per peer, the grid setting of lowest density whose score is >= "
             f"FlashPrefill's at alpha {args.alpha} on these prompts.", ""]
    return lines + ([f"Note: {args.note}", ""] if args.note else [])


def error_matched_section(err: dict, sparsity_md: str) -> list[str]:
    """Which settings `python -m repro.sparsity` matched by attention-output error, and their densities there."""
    if not err:
        return []
    L_err = next(iter(err.values()))["L"]
    return [f"*error-matched* marks the settings that `python -m repro.sparsity` matched by attention-output error "
            f"instead ({sparsity_md}: real SmolLM2 activations, {L_err} tokens, 5 layers; density there "
            + ", ".join(f"{selector_name(k)} {SELECTORS[k].knob} {v['value']:g} {_pct(v['density'])}"
                        for k, v in err.items()) + ").", ""]


def length_section(rows, L: int, alpha: float, err: dict) -> list[str]:
    """The settings' table at one length, the matched settings (by score and by agreement), the per-task table."""
    summary = summarize(rows, L)
    if not summary:
        return []
    match = matched(summary, alpha)
    n = summary[0]["n"]
    lines = [f"## {L} tokens ({n} prompts per setting)", ""]
    body = []
    for s in summary:
        mark = []
        if s["paper_default"]:
            mark.append("paper default" if s["method"] != "flashprefill" else "V1 default")
        if s["method"] in PEERS and match.get(s["method"]) is s:
            mark.append("**matched**")
        if s["method"] in PEERS and s["method"] in err and err[s["method"]]["value"] == s["value"]:
            mark.append("*error-matched*")
        body.append([selector_name(s["method"]), "-" if s["value"] is None else f"{s['param']} {s['value']:g}",
                     f"{s['score']:.1f}", f"{round(s['same'] * n)}/{n}", _pct(s["density"]), ", ".join(mark)])
    lines += [markdown_table(["selector", "setting", "score", "same as Full", "density", "note"], body), ""]
    fp = next((s for s in summary if s["method"] == "flashprefill" and s["value"] == alpha), None)
    if fp is not None:
        by_agreement = matched(summary, alpha, "same")
        lines += [f"Accuracy-matched at this length: {_match_words(summary, match, fp, 'score')}.", "",
                  "The same rule on agreement with Full instead of score (same as Full >= FlashPrefill's "
                  f"{round(fp['same'] * n)}/{n}): {_match_words(summary, by_agreement, fp, 'same')}.", ""]
    return lines + per_task_table(rows, summary, L)


def per_task_table(rows: list[dict], summary: list[dict], length: int) -> list[str]:
    """Score per task (columns) and setting (rows), over the prompts of `summary`, as markdown lines."""
    rows = [r for r in rows if int(r["length"]) == length]
    tasks = sorted({r["task"] for r in rows})
    if len(tasks) < 2:
        return []
    common = set.intersection(*({prompt_key(r) for r in rows if r["setting"] == s["setting"]} for s in summary))
    body = []
    for s in summary:
        cells = []
        for task in tasks:
            sc = [float(r["score"]) for r in rows if r["setting"] == s["setting"] and r["task"] == task
                  and prompt_key(r) in common]
            cells.append(f"{sum(sc) / len(sc):.0f}" if sc else "-")
        body.append([s["setting"]] + cells)
    n = {t: len({prompt_key(r) for r in rows if r["task"] == t and prompt_key(r) in common}) for t in tasks}
    return ["Score per task (mean over its prompts; prompts per task: "
            + ", ".join(f"{t} {n[t]}" for t in tasks) + "):", "", markdown_table(["setting", *tasks], body), ""]


def context_section(rows, sparsity_md: str) -> list[str]:
    """The paper's densities for context, and the caveats of the matching."""
    from repro.paper import PAPER_DENSITY_256K

    lengths = sorted({int(r["length"]) for r in rows})
    prompts = {prompt_key(r) for r in rows}
    return [f"For context, **paper** (seed poster, 256K tokens, their 7B-30B models; not comparable with "
            f"{'/'.join(f'{L // 1024}K' for L in lengths)} on a 135M model, where every selector keeps far more "
            "blocks): density " + ", ".join(f"{k} {100 * v:.1f}%" for k, v in PAPER_DENSITY_256K.items()) + ".",
            "",
            "Caveats: with few prompts per setting, one prompt flipping between 0 and 100 moves a setting's mean "
            f"score by {100 / max(1, len(prompts)):.0f} points, so the matching is "
            "coarse: a matched setting is the sparsest one that lost nothing measurable on these prompts, not a "
            "calibrated equivalence. A 135M model fails some tasks even with Full attention (passkey at >= 2K in "
            "the committed runs), where scores cannot show a loss: the same-as-Full column still can. Densities "
            "at 2-8K are far from the 256K regime the paper's densities describe (density falls with length). "
            f"The error-matched comparison on activations is {sparsity_md}.", ""]


def write_report(path: Path, rows: list[dict], args, stamp: dict, walls: dict[str, float],
                 skipped: list[str]) -> None:
    """The markdown report. args: the first run's arguments (the planned prompts), plus note, sparsity_csv and
    plot_written; walls: command (as in the rows' `command` column) -> wall time in seconds."""
    err = error_matched(args.sparsity_csv)
    sparsity_md = _shown(args.sparsity_csv.with_suffix(".md"))
    lines = header_section(rows, args, stamp, walls, skipped) + error_matched_section(err, sparsity_md)
    for L in sorted({int(r["length"]) for r in rows}):
        lines += length_section(rows, L, args.alpha, err)
    lines += context_section(rows, sparsity_md)
    if args.plot_written:
        lines += [f"![score and same-as-Full vs density]({path.stem}.png)", ""]
    path.write_text("\n".join(lines))
