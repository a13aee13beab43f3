"""Where FlashPrefill's accuracy loss comes from: operator-level error and nestedness per layer, in-model drift, the
Full margin of the prompts that flip, and whether the needle's key block is kept (issue 12, item 2).

    python -m repro.loss_analysis --quick        # CPU, ~2-3 min: 2 generated needle prompts at 2K, layers 0/15/29,
                                                 # alphas 0 0.12 0.3 (no samples CSV: nothing known about flips)
    python -m repro.loss_analysis --samples repro/results/powered/powered_samples.csv.gz --device cuda \\
        --time-budget 200                        # H200: 24 prompts at the CSV's two longest lengths, 30 layers,
                                                 # 6 alphas (~2-3 min)
    python -m repro.loss_analysis --samples repro/results/long_context/long_context_samples.csv.gz \
        --device cuda                            # the same at 16K / 32K, with the RoPE scaling that run chose
    python -m repro.loss_analysis --report-only --in-dir DIR   # redraw the summary and the figure from DIR's CSVs

Per prompt: one Full forward (sdpa) captures every layer's q/k/v (repro.capture) with the hidden states and the
answer logits; the operator level runs FlashPrefill per layer and alpha on those inputs against exact float32 dense
attention (operator_level.py); the in-model level runs the whole model through the backend at each alpha
(in_model.py). Prompts (prompts.py): from the powered run's samples CSV, half "flipped" (Full right, alpha 0.12
wrong), half controls; the analysis of the CSV itself (McNemar between alphas, overlaps of the lost prompts) covers
every prompt of the analysed split, family and lengths (analysis.py).

Outputs in --out-dir (default repro/runs/<date>-<device>/loss_analysis/), named <prefix><name> (prefix loss_, or
loss_quick_ with --quick): prompts.csv.gz, operator.csv.gz, needle.csv.gz, drift.csv.gz, answers.csv.gz (write_long_csv with the
environment stamp; rewritten after every prompt), samples_used.csv.gz (the samples CSV's rows analysed, with their own
stamp), run.json, summary.md and figure.png.
"""

from __future__ import annotations

import argparse
import shlex
import sys
import time
from pathlib import Path

import torch

from block_selectors import FULL, Setting

from ..common import (RESULTS_DIR, environment_stamp, fill_defaults, read_long_csv, read_run_json, run_dir,
                      torch_threads, write_long_csv, write_run_json)
from ..long_context.rope import CONTROL, ROPE_METHODS, scaled_rope
from ..powered.arms import DEFAULT_ALPHA
from .prompts import FLIP_ARM

COMMITTED_SAMPLES = RESULTS_DIR / "powered" / "powered_samples.csv.gz"
COMMITTED = RESULTS_DIR / "loss_analysis"
TABLES = ("prompts", "operator", "needle", "drift", "answers")
DEFAULTS = dict(alphas=[0.0, 0.03, 0.06, 0.12, 0.2, 0.3], max_prompts=24, layers=None)
# CPU-sized: one 2K prefill through the 135M model is ~5 s on 2 cores, a backend forward with the reference ~15 s.
QUICK = dict(alphas=[0.0, 0.12, 0.3], max_prompts=2, layers=[0, 15, 29], lengths=[2048])
GENERATED_LENGTHS = [4096, 8192]  # without a samples CSV (and without --quick)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="CPU-sized run (see above); ignores the committed CSV")
    p.add_argument("--samples", default=None,
                   help="the powered run's samples CSV, or 'none' to generate prompts (default: "
                        f"{COMMITTED_SAMPLES.relative_to(RESULTS_DIR.parent.parent)} when it exists)")
    p.add_argument("--model", default=None, help="GGUF file or local checkpoint (default: SmolLM2-135M GGUF)")
    p.add_argument("--device", default=None, help="cuda or cpu (default: cuda when available)")
    p.add_argument("--max-prompts", type=int, default=None, help="prompts to analyse (default 24; --quick 2)")
    p.add_argument("--alphas", type=float, nargs="+", default=None, help="default 0 0.03 0.06 0.12 0.2 0.3")
    p.add_argument("--lengths", type=int, nargs="+", default=None,
                   help="prompt lengths (default: the CSV's two longest; without a CSV 4096 8192; --quick 2048)")
    p.add_argument("--layers", type=int, nargs="+", default=None,
                   help="layers of the operator level (default: all; --quick 0 15 29); in-model covers all")
    p.add_argument("--rope", choices=["auto", CONTROL, *ROPE_METHODS], default="auto",
                   help="RoPE scaling of every forward (repro/long_context/rope.py); auto: the method the samples "
                        "CSV's test rows ran with per length (its rope column, as repro.long_context writes it), "
                        "else none")
    p.add_argument("--time-budget", type=float, default=None,
                   help="seconds from the start after which no new prompt starts")
    p.add_argument("--out-dir", type=Path, default=None)
    p.add_argument("--prefix", default=None)
    p.add_argument("--report-only", action="store_true", help="redraw summary.md and figure.png from --in-dir")
    p.add_argument("--in-dir", type=Path, default=COMMITTED)
    p.add_argument("--note", default=None, help="a note for the report")
    args = p.parse_args(argv)
    fill_defaults(args, QUICK if args.quick else DEFAULTS)
    if args.samples is None and not args.quick and COMMITTED_SAMPLES.exists():
        args.samples = str(COMMITTED_SAMPLES)
    if args.samples is not None and args.samples.lower() == "none":
        args.samples = None
    args.alphas = sorted(set(args.alphas))
    args.prefix = args.prefix or ("loss_quick_" if args.quick else "loss_")
    return args


def files(directory: Path, prefix: str) -> dict[str, Path]:
    names = [f"{t}.csv" for t in TABLES] + ["samples_used.csv", "run.json", "summary.md", "figure.png"]
    # The tables are per (prompt, layer[, head]): 0.7-1.3 MB each as text, so they are written gzip-compressed.
    return {n: directory / (f"{prefix}{n}.gz" if n.endswith(".csv") else f"{prefix}{n}") for n in names}


def report(tables: dict[str, list[dict]], info: dict, out: dict[str, Path]) -> None:
    from .figures import save_figure
    from .report import write_report

    write_report(out["summary.md"], tables, info)
    save_figure(tables, out["figure.png"])


def read_tables(src: dict[str, Path]) -> dict[str, list[dict]]:
    return {t: read_long_csv(src[f"{t}.csv"]) if src[f"{t}.csv"].exists() else []
            for t in (*TABLES, "samples_used")}


def choose(args, tokenizer):
    """(samples rows analysed, the chosen prompts, lengths, a sentence on the choice)."""
    from .analysis import used_sample_rows
    from .prompts import choose_from_rows, generated, regenerated

    if args.samples is None:
        lengths = args.lengths or GENERATED_LENGTHS
        chosen = generated(tokenizer, lengths, args.max_prompts)
        return [], chosen, lengths, (f"no samples CSV: {len(chosen)} needle prompts of the dev split generated at "
                                     f"{', '.join(map(str, lengths))} tokens; none is known to be flipped (no "
                                     "flipped/control comparison)")
    rows = read_long_csv(args.samples)
    cands, lengths, note = choose_from_rows(rows, args.max_prompts, args.lengths)
    if not cands:
        raise SystemExit(f"error: {args.samples} has no test needle prompt at {lengths} that Full answers right")
    return used_sample_rows(rows, "test", "needle", lengths), regenerated(tokenizer, cands), lengths, note


def rope_methods(option: str, sample_rows, lengths) -> dict[int, str]:
    """length -> the RoPE scaling every forward of its prompts runs with: --rope, or with "auto" the method the
    samples' Full test rows ran with at that length (none where they have no rope column)."""
    if option != "auto":
        return {L: option for L in lengths}
    methods: dict[int, set] = {L: set() for L in lengths}
    for r in sample_rows:
        if r["arm"] == "full" and r["split"] == "test" and r.get("rope") and int(r["length"]) in methods:
            methods[int(r["length"])].add(r["rope"])
    for L, found in methods.items():
        if len(found) > 1:
            raise SystemExit(f"error: the samples' Full test rows at {L} tokens ran with several RoPE methods {found}")
    return {L: found.pop() if found else CONTROL for L, found in methods.items()}


def analyse_prompt(model, tokenizer, switch, impl, prompt, args, device) -> tuple[dict[str, list[dict]], dict]:
    """Every measurement of one prompt: (rows per table, seconds per phase)."""
    from ..capture import capture_qkv
    from ..powered.prompts import prompt_ids
    from .analysis import arm_of_alpha
    from .in_model import answer_ids, forward, measure
    from .operator_level import measure_layer
    from .prompts import locate_needle

    s = prompt.sample
    base = prompt.columns()
    ids = prompt_ids(tokenizer, s)
    needle = locate_needle(tokenizer, s)
    seconds = {}
    t0 = time.perf_counter()
    switch.use(Setting(FULL))
    with capture_qkv(model, set(args.layers) if args.layers else None, dtype=model.dtype) as store:
        full = forward(model, ids, answer_ids(tokenizer, s.answers[0]))
    seconds["full"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    dtype = str(model.dtype).replace("torch.", "")
    operator, needle_rows = [], []
    with torch_threads(1 if device.type == "cpu" else None):
        for layer in sorted(store):
            q, k, v = (t.to(device) for t in store.pop(layer))
            layer_rows, head_rows = measure_layer(impl, q, k, v, args.alphas, default_alpha=DEFAULT_ALPHA,
                                                  needle=needle)
            operator += [dict(base, layer=layer, **r, impl=impl.__name__, dtype=dtype) for r in layer_rows]
            needle_rows += [dict(base, layer=layer, **needle.columns(), **r) for r in head_rows]
            del q, k, v
    seconds["operator"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    drifts, answers = measure(model, tokenizer, switch, ids, s.answers[0], full, args.alphas)
    seconds["in_model"] = time.perf_counter() - t0
    full_score = prompt.scores.get("full", "")
    for r in answers:  # the powered run's outcome for the same setting, where it has one
        arm = "full" if r["setting"] == "full" else arm_of_alpha(r["alpha"])
        score = prompt.scores.get(arm, "")
        r.update(csv_arm=arm if score != "" else "", csv_score=score, csv_full_score=full_score,
                 csv_flipped="" if score == "" or full_score == "" else full_score == 100 and score < 100)
    full_row = answers[0]
    prompt_row = dict(base, **needle.columns(), tokens=ids.shape[1], answer=s.answers[0],
                      csv_full_score=full_score, csv_fp_score=prompt.scores.get(FLIP_ARM, ""),
                      full_top1_text=full_row["top1_text"], full_margin_first=full_row["margin_first"],
                      full_margin_answer_min=full_row["margin_answer_min"],
                      full_answer_greedy=full_row["answer_greedy"],
                      **{f"seconds_{k}": round(v, 2) for k, v in seconds.items()})
    del full
    tables = dict(prompts=[prompt_row], operator=operator, needle=needle_rows,
                  drift=[dict(base, **r) for r in drifts], answers=[dict(base, **r) for r in answers])
    return tables, seconds


def main(argv=None) -> int:
    args = parse_args(argv)
    command = "python -m repro.loss_analysis " + " ".join(map(shlex.quote, sys.argv[1:] if argv is None else argv))
    if args.report_only:
        out_dir = args.out_dir or run_dir("loss_analysis")
        src = files(args.in_dir, args.prefix)
        tables, info = read_tables(src), read_run_json(src["run.json"])
        if args.note is not None:
            info["note"] = args.note
        report(tables, info, files(out_dir, args.prefix))
        print(f"report in {out_dir}")
        return 0

    from tqdm.auto import tqdm

    from ..harness import AttentionSwitch, load_for_run, run_device
    from .operator_level import implementation

    start = time.time()
    device = run_device(args.device)
    out_dir = args.out_dir or run_dir("loss_analysis", device)
    out = files(out_dir, args.prefix)
    model, tokenizer, name = load_for_run(args.model, device)
    sample_rows, chosen, lengths, choice = choose(args, tokenizer)
    impl = implementation(device)
    info = dict(command=command, model=name, device=str(device), dtype=str(model.dtype).replace("torch.", ""),
                impl=impl.__name__, alphas=args.alphas, default_alpha=DEFAULT_ALPHA, lengths=lengths,
                layers=args.layers or "all", samples=args.samples or "", choice=choice, skipped=[],
                note=args.note or "", load_seconds=round(time.time() - start, 1))
    info["rope"] = {str(L): m for L, m in rope_methods(args.rope, sample_rows, lengths).items()}
    print(f"{len(chosen)} prompts: {choice}; RoPE scaling per length: {info['rope']}", flush=True)
    stamp = environment_stamp(device)
    if sample_rows:
        write_long_csv(out["samples_used.csv"], sample_rows)  # rows keep the powered run's own stamp
    tables = {t: [] for t in TABLES}
    phase_seconds = {"full": 0.0, "operator": 0.0, "in_model": 0.0}
    switch = AttentionSwitch(model, cpu_threads=1 if model.device.type == "cpu" else None)
    bar = tqdm(chosen, desc="prompts", unit="prompt", dynamic_ncols=True)
    for n, prompt in enumerate(bar):
        if args.time_budget is not None and time.time() - start > args.time_budget:
            info["skipped"].append(f"{len(chosen) - n} of {len(chosen)} prompts not analysed (time budget "
                                   f"{args.time_budget:.0f} s)")
            break
        L = prompt.sample.length
        with scaled_rope(model, info["rope"][str(L)], L):
            new, seconds = analyse_prompt(model, tokenizer, switch, impl, prompt, args, device)
        for t in TABLES:
            tables[t] += new[t]
            write_long_csv(out[f"{t}.csv"], tables[t], stamp)
        for k, v in seconds.items():
            phase_seconds[k] += v
        bar.set_postfix(task=prompt.sample.task, L=prompt.sample.length, group=new["prompts"][0]["group"],
                        s="/".join(f"{v:.1f}" for v in seconds.values()), refresh=False)
        if device.type == "cuda":
            torch.cuda.empty_cache()
    bar.close()
    info["phase_seconds"] = {k: round(v, 1) for k, v in phase_seconds.items()}
    info["wall_seconds"] = round(time.time() - start, 1)
    print(f"{len(tables['prompts'])} prompts in {info['wall_seconds']:.0f} s (model load {info['load_seconds']:.0f} s;"
          f" Full forwards {phase_seconds['full']:.0f} s, operator level {phase_seconds['operator']:.0f} s, "
          f"in-model {phase_seconds['in_model']:.0f} s)", flush=True)
    write_run_json(out["run.json"], info)
    report({t: read_long_csv(out[f"{t}.csv"]) if tables[t] else [] for t in TABLES} | {"samples_used": sample_rows},
           info, out)  # from the CSVs, as --report-only reads them
    print(f"wrote {out_dir}")
    return 0
