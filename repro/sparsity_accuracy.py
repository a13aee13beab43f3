"""Density vs task accuracy per block selector on a real model: FlashPrefill, FlexPrefill and XAttention at their
paper defaults and on a grid of their own knob, matched by *task accuracy* on the same prompts.

    python -m repro.sparsity_accuracy --quick     # ~2 minutes on a CPU (2K, 2 prompts, 6 settings)
    python -m repro.sparsity_accuracy             # the committed CPU run (4K, <= 12 prompts, ~32 minutes), then
    python -m repro.sparsity_accuracy --append --flex-gammas 0.6 0.7 --xattn-thresholds 0.5 0.7   # sparser
    python -m repro.sparsity_accuracy --append --flex-gammas 0.4 --xattn-thresholds 0.2 0.3       # settings
    python -m repro.sparsity_accuracy --append --redo --tasks niah_multikey niah_multiquery --seeds 10 11 \
        --flex-gammas 0.4 0.6 0.7 0.8 0.9 0.95 0.99 --xattn-thresholds 0.2 0.3 0.5 0.7 0.8 0.9 0.95 0.99
      # (the redo: those prompts depended on PYTHONHASHSEED before f0623f2; see the report's note)
    python -m repro.sparsity_accuracy --report-only   # the committed run's report and figure, into a run folder

repro/sparsity.py matches the peers to FlashPrefill by attention-output error on activations; this script runs
each selector inside SmolLM2-135M-Instruct (flashprefill_hf backend, `FlashPrefillConfig.selector`) on long-context
tasks (repro/accuracy/tasks.py), answers every prompt with every setting (greedy decoding, dense attention while
decoding) and reports per setting: task score (RULER string match, percent), the fraction of prompts whose answer
is identical to Full attention's, and the realised block density (kept causal blocks / all causal blocks, averaged
over the 30 layers and all heads).

Settings: Full (sdpa); FlashPrefill at alpha 0.12 (the V1 default; SmolLM2 is not in the paper); FlexPrefill
(gamma; tau 0.1, min_budget 1024 tokens, block 128) and XAttention (threshold; stride 8, block 128) on a grid that
includes each paper default (0.9). The peers are our PyTorch implementations (reference/peers.py) and attend with
reference.block_sparse_attention on the CPU (triton_impl.block_sparse_attention on a GPU).

Accuracy-matched setting of a peer: the grid setting with the lowest realised density whose mean score is >= the
mean score of FlashPrefill at alpha 0.12 on the same prompts (none if no grid setting reaches it).

Prompts: seeds 10-12 by default: a range of their own, distinct from the evaluation seeds 0-2 of the committed
accuracy runs (repro/results/accuracy/) and from the calibration seeds (>= 100000) of repro/accuracy/run.py.
Prompts run one at a time with every setting, seed by seed, so a --time-budget drops whole prompts (never one
setting of a prompt) and every setting is scored on the same prompts.

Outputs in --out-dir (default: the run folder repro/runs/<date>-<device>/sparsity_accuracy/; the committed run is
in repro/results/sparsity_accuracy/), named by --prefix (sparsity_accuracy, or sparsity_accuracy_quick with
--quick): <prefix>.csv (long format, one row per prompt and setting, with the environment stamp; rewritten after
every prompt), <prefix>.md (the tables, self-contained) and <prefix>.png (score and same-as-Full vs density).
`--append` extends the run already in --out-dir (the committed one only when --out-dir names it).
`--report-only` rewrites the markdown and the figure from the CSV in --in-dir (default: the committed run) into
--out-dir. The report marks the error-matched settings of repro/sparsity.py's CPU run (--sparsity-csv, default the
committed repro/results/sparsity/sparsity.csv).
"""

from __future__ import annotations

import argparse
import math
import re
import shlex
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from repro.accuracy import run as acc
from repro.accuracy.tasks import GENERATORS, Sample, generate
from repro.common import (ROOT, RESULTS_DIR, environment_stamp, markdown_table, read_long_csv, run_dir, stamp_line,
                          write_long_csv)

SELECTOR_NAMES = {"full": "Full", "flashprefill": "FlashPrefill", "flexprefill": "FlexPrefill",
                  "xattention": "XAttention"}
KNOB = {"flashprefill": "alpha", "flexprefill": "gamma", "xattention": "threshold"}
PAPER_DEFAULT = {"flashprefill": 0.12, "flexprefill": 0.9, "xattention": 0.9}  # 0.12: V1 default (not in the paper)
PEERS = ("flexprefill", "xattention")
DEPTH_TASKS = ("passkey", "niah_single", "qa")  # generators that take a needle depth
SEEDS = [10, 11, 12]  # selection seeds: distinct from the evaluation seeds 0-2 of the committed accuracy runs


@dataclass(frozen=True)
class Setting:
    """One attention setting: selector "full" (value None) or a selector with the value of its knob."""

    selector: str
    value: float | None = None

    @property
    def param(self) -> str:
        return KNOB.get(self.selector, "")

    @property
    def paper_default(self) -> bool:
        return self.value is not None and self.value == PAPER_DEFAULT.get(self.selector)

    @property
    def label(self) -> str:
        if self.selector == "full":
            return "Full"
        return f"{SELECTOR_NAMES[self.selector]} {self.param}={self.value:g}"

    def config_changes(self) -> dict:
        """The FlashPrefillConfig fields this setting sets (the other peer parameters keep their paper defaults)."""
        if self.selector == "flashprefill":
            return dict(selector="flashprefill", selector_params={}, alpha=self.value)
        return dict(selector=self.selector, selector_params={self.param: self.value})


class SelectorMethods(acc.Methods):
    """`repro.accuracy.run.Methods` whose settings are `Setting`s: Full or any selector of the backend."""

    def use(self, setting: Setting):
        if setting.selector == "full":
            return super().use(None)
        self.config = self.fh.configure(self.model, self.config, **setting.config_changes())
        self.config.recorder.clear()
        return self.config.recorder

    def columns(self, setting: Setting) -> dict:
        return dict(method=setting.selector, param=setting.param, value="" if setting.value is None else setting.value,
                    setting=setting.label, paper_default=setting.paper_default)


def settings_for(args) -> list[Setting]:
    return ([Setting("full"), Setting("flashprefill", args.alpha)]
            + [Setting("flexprefill", g) for g in args.flex_gammas]
            + [Setting("xattention", t) for t in args.xattn_thresholds])


def make_samples(args, count_tokens) -> list[tuple[str, Sample]]:
    """One prompt per (seed, length, task). Tasks with a needle depth take the seed's depth (depths[i % len] for
    the i-th seed), so three seeds cover three depths; the other tasks place their needles from the seed."""
    samples = []
    for i, seed in enumerate(args.seeds):
        depth = args.depths[i % len(args.depths)]
        for L in args.lengths:
            for task in args.tasks:
                kwargs = dict(depth=depth) if task in DEPTH_TASKS else {}
                samples.append(("needle" if task in DEPTH_TASKS else "ruler", generate(task, L, seed, count_tokens,
                                                                                      **kwargs)))
    return samples


# --------------------------------------------------------------------------------------------------------------
# Summary and matching
# --------------------------------------------------------------------------------------------------------------
def _key(r) -> tuple:
    """A prompt's identity in a row (CSV strings or run_samples' values)."""
    return (r["task"], int(r["length"]), str(r["depth"]), int(r["seed"]))


def _sample_key(sample: Sample) -> tuple:
    """The same identity for a generated sample (run_samples writes depth rounded to 4 digits, "" for none)."""
    return (sample.task, sample.length, "" if sample.depth is None else str(round(sample.depth, 4)), sample.seed)


def summarize(rows: list[dict], length: int | None = None) -> list[dict]:
    """One dict per setting over the prompts every setting answered (at `length`, or all lengths): setting fields,
    n, score, same (fraction of prompts answered exactly as Full), density (mean over prompts)."""
    rows = [r for r in rows if length is None or int(r["length"]) == length]
    by_setting: dict[str, list[dict]] = {}
    for r in rows:
        by_setting.setdefault(r["setting"], []).append(r)
    common = set.intersection(*({_key(r) for r in rs} for rs in by_setting.values())) if by_setting else set()
    full = {_key(r): r["prediction"] for r in rows if r["method"] == "full"}
    out = []
    for label, rs in by_setting.items():
        rs = [r for r in rs if _key(r) in common]
        if not rs:
            continue
        first = rs[0]
        out.append(dict(setting=label, method=first["method"], param=first["param"],
                        value=float(first["value"]) if first["value"] not in ("", None) else None,
                        paper_default=str(first["paper_default"]) == "True", n=len(rs),
                        score=sum(float(r["score"]) for r in rs) / len(rs),
                        same=sum(r["prediction"] == full.get(_key(r)) for r in rs) / len(rs),
                        density=sum(float(r["density"]) for r in rs) / len(rs)))
    order = list(SELECTOR_NAMES)
    return sorted(out, key=lambda s: (order.index(s["method"]), s["value"] or 0.0))


def matched(summary: list[dict], alpha: float, key: str = "score") -> dict[str, dict | None]:
    """Per peer, the grid setting of lowest density whose `key` ("score", or "same": agreement with Full) is >=
    FlashPrefill's at `alpha` (None if none)."""
    fp = next((s for s in summary if s["method"] == "flashprefill" and s["value"] == alpha), None)
    out = {}
    for peer in PEERS:
        ok = [s for s in summary if s["method"] == peer and fp is not None and s[key] >= fp[key] - 1e-9]
        out[peer] = min(ok, key=lambda s: (s["density"], s["value"])) if ok else None
    return out


# --------------------------------------------------------------------------------------------------------------
# Report
# --------------------------------------------------------------------------------------------------------------
def error_matched(path: Path) -> dict[str, dict]:
    """The error-matched settings of a repro/sparsity.py CPU run (its sparsity.csv: attention-output error on real
    SmolLM2 activations), per selector key: {value, density, L}; empty when the file or the rows are absent."""
    if not path.exists():
        return {}
    keys = {v: k for k, v in SELECTOR_NAMES.items()}
    return {keys[r["selector"]]: dict(value=float(r["value"]), density=float(r["density"]), L=int(r["L"]))
            for r in read_long_csv(path) if r.get("matched") == "True" and r.get("selector") in keys}


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
            words.append(f"{SELECTOR_NAMES[peer]}: no grid setting reaches FlashPrefill's {what} {val(fp)}")
            continue
        sparsest = min((s for s in summary if s["method"] == peer), key=lambda s: s["density"])
        edge = " (the sparsest setting of its grid: a sparser one might match too)" if m is sparsest else ""
        words.append(f"{SELECTOR_NAMES[peer]} {m['param']} {m['value']:g}{edge}, density {_pct(m['density'])} vs "
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


def write_report(path: Path, rows: list[dict], args, stamp: dict, walls: dict[str, float],
                 skipped: list[str]) -> None:
    """The markdown report. args: the first run's arguments (the planned prompts), plus note and plot_written;
    walls: command (as in the rows' `command` column) -> wall time in seconds."""
    from repro.paper import PAPER_DENSITY_256K

    name = rows[0]["model"] if rows else "?"
    lengths = sorted({int(r["length"]) for r in rows})
    prompts = sorted({_key(r) for r in rows})
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
             "FlexPrefill = `reference.peers.flexprefill_select` (tau 0.1, min_budget 1024 tokens, block 128; knob "
             "gamma); XAttention = `reference.peers.xattention_select` (stride 8, block 128, sink and diagonal kept; "
             "knob threshold). The peers are our PyTorch readings of their papers, attending with "
             "`reference.block_sparse_attention` on this CPU.", "",
             "**Accuracy-matched** (marked *matched*): per peer, the grid setting of lowest density whose score is >= "
             f"FlashPrefill's at alpha {args.alpha} on these prompts.", ""]
    if args.note:
        lines += [f"Note: {args.note}", ""]
    err = error_matched(args.sparsity_csv)
    sparsity_md = _shown(args.sparsity_csv.with_suffix(".md"))
    if err:
        L_err = next(iter(err.values()))["L"]
        lines += [f"*error-matched* marks the settings that repro/sparsity.py matched by attention-output error "
                  f"instead ({sparsity_md}: real SmolLM2 activations, {L_err} tokens, 5 layers; density there "
                  + ", ".join(f"{SELECTOR_NAMES[k]} {KNOB[k]} {v['value']:g} {_pct(v['density'])}"
                              for k, v in err.items()) + ").", ""]
    for L in lengths:
        summary = summarize(rows, L)
        if not summary:
            continue
        match = matched(summary, args.alpha)
        n = summary[0]["n"]
        lines += [f"## {L} tokens ({n} prompts per setting)", ""]
        body = []
        for s in summary:
            mark = []
            if s["paper_default"]:
                mark.append("paper default" if s["method"] != "flashprefill" else "V1 default")
            if s["method"] in PEERS and match.get(s["method"]) is s:
                mark.append("**matched**")
            if s["method"] in PEERS and s["method"] in err and err[s["method"]]["value"] == s["value"]:
                mark.append("*error-matched*")
            body.append([SELECTOR_NAMES[s["method"]], "-" if s["value"] is None else f"{s['param']} {s['value']:g}",
                         f"{s['score']:.1f}", f"{round(s['same'] * n)}/{n}", _pct(s["density"]), ", ".join(mark)])
        lines += [markdown_table(["selector", "setting", "score", "same as Full", "density", "note"], body), ""]
        fp = next((s for s in summary if s["method"] == "flashprefill" and s["value"] == args.alpha), None)
        if fp is not None:
            by_agreement = matched(summary, args.alpha, "same")
            lines += [f"Accuracy-matched at this length: {_match_words(summary, match, fp, 'score')}.", "",
                      "The same rule on agreement with Full instead of score (same as Full >= FlashPrefill's "
                      f"{round(fp['same'] * n)}/{n}): {_match_words(summary, by_agreement, fp, 'same')}.", ""]
        lines += per_task_table(rows, summary, L)
    lines += [f"For context, **paper** (seed poster, 256K tokens, their 7B-30B models; not comparable with "
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
    if args.plot_written:
        lines += [f"![score and same-as-Full vs density]({path.stem}.png)", ""]
    path.write_text("\n".join(lines))


def per_task_table(rows: list[dict], summary: list[dict], length: int) -> list[str]:
    """Score per task (columns) and setting (rows), over the prompts of `summary`, as markdown lines."""
    rows = [r for r in rows if int(r["length"]) == length]
    tasks = sorted({r["task"] for r in rows})
    if len(tasks) < 2:
        return []
    common = set.intersection(*({_key(r) for r in rows if r["setting"] == s["setting"]} for s in summary))
    body = []
    for s in summary:
        cells = []
        for task in tasks:
            sc = [float(r["score"]) for r in rows if r["setting"] == s["setting"] and r["task"] == task
                  and _key(r) in common]
            cells.append(f"{sum(sc) / len(sc):.0f}" if sc else "-")
        body.append([s["setting"]] + cells)
    n = {t: len({_key(r) for r in rows if r["task"] == t and _key(r) in common}) for t in tasks}
    return ["Score per task (mean over its prompts; prompts per task: "
            + ", ".join(f"{t} {n[t]}" for t in tasks) + "):", "", markdown_table(["setting", *tasks], body), ""]


def plot(rows: list[dict], path: Path, alpha: float) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    lengths = sorted({int(r["length"]) for r in rows})
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
    colors = {"full": "black", "flashprefill": "tab:red", "flexprefill": "tab:blue", "xattention": "tab:green"}
    marks = {L: m for L, m in zip(lengths, "os^D")}
    for L in lengths:
        summary = summarize(rows, L)
        for ax, key, ylabel in ((axes[0], "score", "score (%)"), (axes[1], "same", "same answer as Full (%)")):
            for method in ("full", "flashprefill", *PEERS):
                ss = sorted((s for s in summary if s["method"] == method), key=lambda s: s["density"])
                if not ss:
                    continue
                ax.plot([100 * s["density"] for s in ss], [s[key] * (100 if key == "same" else 1) for s in ss],
                        marker=marks[L], color=colors[method], ls="-" if len(ss) > 1 else "",
                        label=f"{SELECTOR_NAMES[method]} {L}")
                for s in ss:
                    if s["value"] is not None:
                        ax.annotate(f"{s['value']:g}", (100 * s["density"], s[key] * (100 if key == "same" else 1)),
                                    fontsize=6, xytext=(2, 2), textcoords="offset points")
            ax.set_xlabel("realised density (%)")
            ax.set_ylabel(ylabel)
    axes[0].legend(fontsize=7)
    axes[0].set_title(f"task score vs density (FlashPrefill alpha {alpha:g}; peers' knobs annotated)", fontsize=8)
    axes[1].set_title("agreement with Full vs density", fontsize=8)
    fig.suptitle(f"Selectors inside {rows[0]['model']} (real model), same prompts for every setting (ours) - "
                 f"{rows[0]['device_name']}, torch {rows[0]['torch']}, commit {rows[0]['commit']}", fontsize=9)
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)
    return True


# --------------------------------------------------------------------------------------------------------------
# main
# --------------------------------------------------------------------------------------------------------------
# The CPU run: 12 prompts x 10 settings at ~20 s a 4K answer (1 thread) is ~40 min; the budget (no new prompt
# after 31 min) keeps the whole run near 35 min, dropping the last prompts of the last seed if the VM is busy.
FULL_RUN = dict(lengths=[4096], seeds=SEEDS, tasks=["niah_single", "niah_multiquery", "niah_multikey", "passkey"],
                depths=[0.2, 0.5, 0.8], flex_gammas=[0.8, 0.9, 0.95, 0.99], xattn_thresholds=[0.8, 0.9, 0.95, 0.99],
                time_budget=1860.0)
QUICK = dict(lengths=[2048], seeds=[SEEDS[0]], tasks=["niah_single", "niah_multikey"], depths=[0.5],
             flex_gammas=[0.9, 0.99], xattn_thresholds=[0.9, 0.99], time_budget=600.0)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="2K, 2 prompts, 6 settings: a few minutes on a CPU")
    p.add_argument("--model", default=None, help="local checkpoint or .gguf (default: SmolLM2-135M-Instruct GGUF)")
    p.add_argument("--lengths", type=int, nargs="+", help="prompt lengths in tokens")
    p.add_argument("--seeds", type=int, nargs="+", help=f"prompt seeds (default {SEEDS})")
    p.add_argument("--tasks", nargs="+", choices=sorted(GENERATORS), help="tasks, one prompt per seed and length")
    p.add_argument("--depths", type=float, nargs="+", help="needle depth of the i-th seed: depths[i % len]")
    p.add_argument("--alpha", type=float, default=0.12, help="FlashPrefill alpha (the reference point)")
    p.add_argument("--flex-gammas", type=float, nargs="+", help="FlexPrefill gamma grid (paper default 0.9)")
    p.add_argument("--xattn-thresholds", type=float, nargs="+", help="XAttention threshold grid (paper default 0.9)")
    p.add_argument("--threads", type=int, default=1, help="torch threads for the model (1 is fastest on 2 cores)")
    p.add_argument("--ref-threads", type=int, default=1, help="torch threads inside the CPU reference")
    p.add_argument("--time-budget", type=float,
                   help="seconds from the model load after which no new prompt starts (default 1860; quick 600)")
    p.add_argument("--note", default="", help="a paragraph added to the report (kept by --report-only/--append)")
    p.add_argument("--report-only", action="store_true",
                   help="rewrite the report and figure from the CSV in --in-dir, into --out-dir")
    p.add_argument("--in-dir", type=Path, default=RESULTS_DIR / "sparsity_accuracy",
                   help="--report-only: the folder of the run to redraw (default: %(default)s)")
    p.add_argument("--sparsity-csv", type=Path, default=RESULTS_DIR / "sparsity" / "sparsity.csv",
                   help="repro/sparsity.py's CPU run whose error-matched settings the report marks "
                        "(default: %(default)s)")
    p.add_argument("--append", action="store_true",
                   help="add settings to the existing CSV: run only the (prompt, setting) pairs it lacks, on its "
                        "prompts (e.g. --append --xattn-thresholds 0.5 0.7: Full and FlashPrefill are not rerun)")
    p.add_argument("--redo", action="store_true",
                   help="with --append: drop the CSV's rows of this command's prompts (--tasks, --seeds, ...) and "
                        "answer them again with every setting of this command")
    p.add_argument("--device", default=None)
    p.add_argument("--out-dir", type=Path, default=None,
                   help="(default: the run folder repro/runs/<date>-<device>/sparsity_accuracy/)")
    p.add_argument("--prefix", default=None, help="file prefix (default sparsity_accuracy / sparsity_accuracy_quick)")
    args = p.parse_args(argv)
    base = QUICK if args.quick else FULL_RUN
    for key in ("lengths", "seeds", "tasks", "depths", "flex_gammas", "xattn_thresholds", "time_budget"):
        if getattr(args, key) is None:
            setattr(args, key, base[key])
    args.prefix = args.prefix or ("sparsity_accuracy_quick" if args.quick else "sparsity_accuracy")
    if args.redo and not args.append:
        p.error("--redo needs --append")
    args.argv = list(argv) if argv is not None else sys.argv[1:]
    args.plot_written = False
    return args


def report_only(args) -> None:
    rows = read_long_csv(args.in_dir / f"{args.prefix}.csv")
    walls, skipped, note = previous_report(args.in_dir / f"{args.prefix}.md", rows)
    args.out_dir.mkdir(parents=True, exist_ok=True)
    write_outputs(args.out_dir, args.prefix, rows, walls, skipped, args.note or note, args.sparsity_csv)


def previous_report(md: Path, rows: list[dict]) -> tuple[dict[str, float], list[str], str]:
    """What only the earlier markdown knows: each command's wall time (seconds), what the time budget skipped and
    the note (kept until a new --note replaces it). Rows from before the CSV had a `command` column get the
    markdown's first command."""
    old = md.read_text() if md.exists() else ""
    found = re.findall(r"Command: `python -m repro\.sparsity_accuracy ?(.*?)` — wall time ([0-9.]+) min", old)
    walls = {cmd: 60 * float(w) for cmd, w in found}
    for r in rows:
        if r.get("command") is None:
            r["command"] = found[0][0] if found else ""
    skipped = re.search(r"planned; (.*?)\): tasks", old)
    note = re.search(r"^Note: (.*)$", old, re.M)
    return walls, [skipped.group(1)] if skipped else [], note.group(1) if note else ""


def write_outputs(out: Path, prefix: str, rows: list[dict], walls: dict[str, float], skipped: list[str],
                  note: str, sparsity_csv: Path | None = None) -> None:
    """Figure and markdown from the CSV's rows (strings); the first run's command gives the planned prompts (and,
    unless `sparsity_csv` is given, the sparsity CSV whose error-matched settings are marked)."""
    args = parse_args(shlex.split(rows[0]["command"]))
    args.note = note or args.note
    args.sparsity_csv = sparsity_csv or args.sparsity_csv
    stamp = {k: rows[0][k] for k in ("device", "device_name", "torch", "triton", "python", "date", "commit")}
    args.plot_written = plot(rows, out / f"{prefix}.png", args.alpha)
    write_report(out / f"{prefix}.md", rows, args, stamp, walls, skipped)
    print((out / f"{prefix}.md").read_text())


def main(argv=None) -> None:
    args = parse_args(argv)
    device = acc.run_device(args.device)
    args.out_dir = args.out_dir or run_dir("sparsity_accuracy", device)
    if args.report_only:
        return report_only(args)
    if args.threads and device.type == "cpu":
        torch.set_num_threads(args.threads)
    t_start = time.time()
    deadline = t_start + args.time_budget if args.time_budget else None
    model, tokenizer, name = acc.load_for_run(args.model, device)
    methods = SelectorMethods(model, args.ref_threads if device.type == "cpu" else None)
    settings = settings_for(args)
    samples = acc.seed_major(make_samples(args, acc.token_counter(tokenizer)))
    out = args.out_dir
    out.mkdir(parents=True, exist_ok=True)
    csv_path, md_path = out / f"{args.prefix}.csv", out / f"{args.prefix}.md"
    old_rows, walls, skipped = [], {}, []
    if args.append:  # the prompts of the existing CSV; only the settings a prompt has no row for yet
        if not csv_path.exists():
            raise SystemExit(f"--append: {csv_path} does not exist")
        old_rows = read_long_csv(csv_path)
        walls, skipped, note = previous_report(md_path, old_rows)
        args.note = args.note or note
        if args.redo:  # this command's prompts replace their rows, every setting answering them again
            planned = {_sample_key(sample) for _, sample in samples}
            old_rows = [r for r in old_rows if _key(r) not in planned]
        else:
            prompts = {_key(r) for r in old_rows}
            samples = [gs for gs in samples if _sample_key(gs[1]) in prompts]
    done = {(_key(r), r["setting"]) for r in old_rows}
    command = shlex.join(args.argv)
    # Every row carries its run's command and environment stamp, so appended runs stay distinguishable.
    meta = dict(model=name, model_dtype=str(model.dtype).replace("torch.", ""), quick=args.quick, command=command,
                **environment_stamp(device))
    acc.SKIPPED.clear()
    rows = []
    # One prompt at a time (every setting), so the CSV after each prompt holds whole prompts only.
    for i, sample in enumerate(samples):
        if deadline is not None and time.time() > deadline:
            acc.SKIPPED.append(f"{len(samples) - i} prompt(s) skipped by the time budget")
            break
        todo = [s for s in settings if (_sample_key(sample[1]), s.label) not in done]
        if todo:
            rows += [{k: str(v) for k, v in dict(r, **meta).items()}  # the CSV's view, as --report-only reads it
                     for r in acc.run_samples(model, tokenizer, methods, [sample], todo,
                                              f"prompt {i + 1}/{len(samples)}")]
            write_long_csv(csv_path, old_rows + rows)
    walls[command] = time.time() - t_start
    if not rows:
        raise SystemExit("no prompt ran (time budget, or --append found nothing left to run)")
    write_outputs(out, args.prefix, old_rows + rows, walls, skipped + list(acc.SKIPPED), args.note, args.sparsity_csv)
    print(f"done in {walls[command] / 60:.1f} min")


if __name__ == "__main__":
    main()
