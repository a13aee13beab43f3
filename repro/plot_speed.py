"""Plots and summary tables from a `repro.bench_speed` CSV (no GPU needed).

    python -m repro.plot_speed [--csv repro/results/speed/speed_h200.csv] [--out-dir DIR]

Reads the CSV (and <stem>_1m.csv beside it, when there is one) and writes into --out-dir (default: the run folder
repro/runs/<date>-<device>/speed/; `--out-dir repro/results/speed` refreshes the committed figures on purpose):
<stem>_speedup.png (speedup vs length against FlashAttention-2 and cuDNN),
<stem>_density.png (time vs realised density with the ideal line rho x T(cuDNN)), <stem>_stages.png (selection
stages and attention of the whole pipeline) and <stem>_summary.md (the tables, with the paper's figures beside
ours, labelled "paper"). All inputs are synthetic; "operator" rows exclude selection, "+ selection" rows include it.
"""

from __future__ import annotations

import argparse
from collections import defaultdict
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from repro.common import RESULTS_DIR, markdown_table, read_long_csv, run_dir  # noqa: E402
from repro.paper import PAPER_DENSITY_256K, PAPER_OPERATOR_SPEEDUP  # noqa: E402

LOW_DENSITY = PAPER_DENSITY_256K["FlashPrefill"]  # the controlled-density row compared with the paper


def load(path: Path):
    """{(what, target_density or None): {L: row}} with ms and density as floats."""
    table = defaultdict(dict)
    rows = read_long_csv(path)
    for r in rows:
        r["ms"], r["density"], r["L"] = float(r["ms"]), float(r["density"]), int(r["L"])
        target = float(r["target_density"]) if r.get("target_density") else None
        table[(r["what"], target)][r["L"]] = r
    return table, rows[0]


def k_label(L: int) -> str:
    return f"{L // 1024}K" if L < 1 << 20 else f"{L >> 20}M"


def speedup_rows(t):
    """Per length: dense times, physical @ 3.5% target, selection, and the speedups."""
    out = []
    for L in sorted(t[("sdpa_flash", None)]):
        fa2, cudnn = t[("sdpa_flash", None)][L]["ms"], t[("sdpa_cudnn", None)][L]["ms"]
        phys = t[("physical", LOW_DENSITY)].get(L)
        sel = t[("selection_total", None)].get(L)
        fp = t[("flash_prefill", None)].get(L)
        if not (phys and sel and fp):
            continue
        total = phys["ms"] + sel["ms"]
        at_target = t[("flash_prefill_at_target", LOW_DENSITY)].get(L)
        out.append(dict(L=L, fa2=fa2, cudnn=cudnn, dense=t[("triton_dense", None)][L]["ms"], phys=phys["ms"],
                        rho=phys["density"], sel=sel["ms"], total=total, fp=fp["ms"], fp_rho=fp["density"],
                        at_target=at_target))
    return out


def save(fig, path: Path, stamp):
    """Write the figure with a footer naming what produced its numbers (GPU, versions, commit)."""
    fig.text(0.005, 0.005, f"{stamp['device_name']}, torch {stamp['torch']}, triton {stamp['triton']}, "
             f"commit {stamp['commit']}, {stamp['date']}", fontsize=6, color="0.4")
    fig.tight_layout(rect=(0, 0.02, 1, 1))
    fig.savefig(path, dpi=130)
    plt.close(fig)


def plot_speedup(rows, path: Path, stamp):
    device = stamp["device_name"]
    fig, ax = plt.subplots(figsize=(8, 5))
    Ls = [r["L"] for r in rows]
    ax.plot(Ls, [r["fa2"] / r["phys"] for r in rows], "o-", c="C0", label="vs FA2: attention only (operator)")
    ax.plot(Ls, [r["fa2"] / r["total"] for r in rows], "s--", c="C0", label="vs FA2: attention + selection")
    ax.plot(Ls, [r["cudnn"] / r["phys"] for r in rows], "o-", c="C1", label="vs cuDNN: attention only (operator)")
    ax.plot(Ls, [r["cudnn"] / r["total"] for r in rows], "s--", c="C1", label="vs cuDNN: attention + selection")
    ax.plot(Ls, [r["fa2"] / r["fp"] for r in rows], "^:", c="C2",
            label="vs FA2: flash_prefill on planted inputs (own density)")
    targeted = [r for r in rows if r["at_target"]]
    if targeted:
        ax.plot([r["L"] for r in targeted], [r["fa2"] / r["at_target"]["ms"] for r in targeted], "D-", c="C3",
                label=f"vs FA2: flash_prefill on planted inputs, alpha set to keep {LOW_DENSITY:.1%}")
        ax.plot([r["L"] for r in targeted], [r["cudnn"] / r["at_target"]["ms"] for r in targeted], "D--", c="C3",
                mfc="none", label=f"vs cuDNN: flash_prefill on planted inputs, alpha set to keep {LOW_DENSITY:.1%}")
    paper = sorted(PAPER_OPERATOR_SPEEDUP.items())
    ax.plot([L for L, _ in paper], [s for _, s in paper], "k*", ms=12, label="paper: vs FA2, Qwen3-30B-A3B, 3.5% @256K")
    for r in rows:
        ax.annotate(f"{r['rho']:.1%}", (r["L"], r["fa2"] / r["phys"]), textcoords="offset points", xytext=(0, 6),
                    fontsize=7, ha="center", color="C0")
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xticks(Ls, [k_label(L) for L in Ls])
    ax.set_xlabel("sequence length (tokens)")
    ax.set_ylabel("speedup over dense causal attention")
    ax.set_title(f"FlashPrefill speedup, {device}, bf16 B=1 Hq=32 Hkv=4 D=128\n"
                 "random block masks at target 3.5% (realised density annotated; forced blocks dominate < 64K); "
                 "synthetic", fontsize=9)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7)
    save(fig, path, stamp)


def plot_density(t, path: Path, stamp):
    device = stamp["device_name"]
    lengths = sorted({L for (what, target), by_L in t.items() if what == "physical" for L in by_L})[-2:]
    fig, axes = plt.subplots(1, len(lengths), figsize=(6 * len(lengths), 4.5), squeeze=False)
    for ax, L in zip(axes[0], lengths):
        cudnn = t[("sdpa_cudnn", None)][L]["ms"]
        for what, style in (("physical", "o-"), ("logical", "s--")):
            pts = sorted((r["density"], r["ms"]) for (w, _), by_L in t.items() if w == what and L in by_L
                         for r in [by_L[L]])
            ax.plot([d for d, _ in pts], [ms for _, ms in pts], style, label=f"{what} skip (operator)")
        rho = [0.0, 0.32]
        ax.plot(rho, [r * cudnn for r in rho], "k-", lw=1, label="ideal: rho x T(cuDNN dense)")
        ax.plot(rho, [1.15 * r * cudnn for r in rho], "k:", lw=1, label="goal: 1.15 x ideal")
        ax.set_xlabel("realised block density rho")
        ax.set_ylabel("ms")
        ax.set_title(f"L = {k_label(L)} ({device}, synthetic random masks)", fontsize=9)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    save(fig, path, stamp)


def plot_stages(t, path: Path, stamp):
    device = stamp["device_name"]
    Ls = sorted(t[("flash_prefill", None)])
    parts = {name: [t[(name, None)][L]["ms"] for L in Ls] for name in ("pool", "score", "select_compact")}
    attention = [t[("flash_prefill", None)][L]["ms"] - t[("selection_total", None)][L]["ms"] for L in Ls]
    fig, ax = plt.subplots(figsize=(8, 4.5))
    x = range(len(Ls))
    bottom = [0.0] * len(Ls)
    for name, ms in list(parts.items()) + [("attention (rest of flash_prefill)", attention)]:
        share = [m / t[("flash_prefill", None)][L]["ms"] for m, L in zip(ms, Ls)]
        ax.bar(x, share, bottom=bottom, label=name)
        bottom = [b + s for b, s in zip(bottom, share)]
    ax.set_xticks(list(x), [f"{k_label(L)}\n{t[('flash_prefill', None)][L]['density']:.0%}" for L in Ls])
    ax.set_ylabel("share of flash_prefill time")
    ax.set_xlabel("length / realised density (planted synthetic inputs, alpha 0.12)")
    ax.set_title(f"flash_prefill stage breakdown ({device}); stages timed separately", fontsize=9)
    ax.legend(fontsize=7)
    save(fig, path, stamp)


def cell(t, what, L, field, fmt="{:.3f}") -> str:
    """One measured value, or "-" where the run did not take it (older CSVs, lengths past a limit)."""
    value = t[(what, None)].get(L, {}).get(field, "")
    return fmt.format(float(value)) if value != "" else "-"


def ratio(t, what, over, L, fmt) -> str:
    a, b = t[(what, None)].get(L), t[(over, None)].get(L)
    return fmt.format(a["ms"] / b["ms"]) if a and b else "-"


def summary(t, rows, stamp) -> str:
    """<stem>_summary.md without the 1M-token section: the header, then one section per table."""
    return "\n".join([summary_header(stamp), speedup_section(rows), whole_call_section(rows), efficiency_section(t),
                      stages_section(t)])


def summary_header(stamp) -> str:
    return f"""# FlashPrefill operator speed on {stamp['device_name']}

bf16, B=1, Hq=32, Hkv=4, D=128, causal, Bs=128. Inputs are **synthetic** (reference.synthetic.planted_qkv). Dense
baselines: torch SDPA FLASH_ATTENTION backend (FlashAttention-2, the paper's baseline) and CUDNN_ATTENTION
backend. Medians of triton.testing.do_bench. torch {stamp['torch']}, triton {stamp['triton']}, commit
{stamp['commit']}, {stamp['date']}. Produced by `python -m repro.bench_speed` then `python -m repro.plot_speed`.
"""


def speedup_section(rows) -> str:
    """Dense times, attention and selection at the paper's 3.5% target (random masks), speedups, paper's beside."""
    speed = markdown_table(
        ["L", "FA2 ms", "cuDNN ms", "our dense ms", "realised rho", "attention ms", "selection ms",
         "total ms", "x FA2 (op / +sel)", "x cuDNN (op / +sel)", "paper x FA2"],
        [[k_label(r["L"]), f"{r['fa2']:.2f}", f"{r['cudnn']:.2f}", f"{r['dense']:.2f}", f"{r['rho']:.1%}",
          f"{r['phys']:.2f}", f"{r['sel']:.2f}", f"{r['total']:.2f}",
          f"{r['fa2'] / r['phys']:.1f} / {r['fa2'] / r['total']:.1f}",
          f"{r['cudnn'] / r['phys']:.1f} / {r['cudnn'] / r['total']:.1f}",
          f"{PAPER_OPERATOR_SPEEDUP[r['L']]} (paper)" if r["L"] in PAPER_OPERATOR_SPEEDUP else "-"]
         for r in rows])
    return f"""## Speedup at the paper's density (random masks with target 3.5%, forced blocks included)

"attention" is `block_sparse_attention` alone (operator only); "selection" is pool + score + select + compact
timed on planted inputs of the same length; "total" adds them. Below 64K the forced blocks (sinks, window, dense
last rows) alone exceed 3.5%, so the realised density is higher. The paper's speedups are for Qwen3-30B-A3B
activations at its own selection's density (paper: {PAPER_DENSITY_256K['FlashPrefill']:.1%} at 256K) on its GPU.

{speed}
"""


def whole_call_section(rows) -> str:
    """flash_prefill with alpha bisected to keep the paper's density (`flash_prefill_at_target` rows)."""
    targeted = [r for r in rows if r["at_target"]]
    whole_call = markdown_table(
        ["L", "alpha", "realised density", "flash_prefill ms (selection included)", "x FA2 (goal at 256K 35)",
         "x cuDNN (goal at 256K 22)", "paper x FA2"],
        [[k_label(r["L"]), r["at_target"]["alpha"], f"{r['at_target']['density']:.2%}",
          f"{r['at_target']['ms']:.2f}", f"{r['fa2'] / r['at_target']['ms']:.1f}",
          f"{r['cudnn'] / r['at_target']['ms']:.1f}",
          f"{PAPER_OPERATOR_SPEEDUP[r['L']]} (paper)" if r["L"] in PAPER_OPERATOR_SPEEDUP else "-"]
         for r in targeted]) if targeted else "(not in this run)"
    title = ("## Whole flash_prefill at the paper's density (planted inputs, alpha set so its selection keeps "
             f"{LOW_DENSITY:.1%})")
    return f"""{title}

The call a user makes, selection included, on the structured synthetic inputs; alpha found by bisection on the
selection's realised density (`bench_speed --pipeline-densities`). Unlike the random masks above, the heads' lists
overlap (planted patterns: at 16K, alpha 0.3, 85% of a head's blocks are also kept by the next head), so a K/V
tile fetched for one head of a GQA group is reused from L2 by the others; how much real heads overlap depends on
the model. Lengths below 64K are missing where the forced blocks alone exceed {LOW_DENSITY:.1%}.

{whole_call}
"""


def efficiency_section(t) -> str:
    """Physical skip against rho x T(cuDNN dense), with the logical skip beside, per target density and length."""
    eff_rows = []
    for (what, target), by_L in sorted(t.items(), key=lambda kv: (kv[0][0], kv[0][1] or 0)):
        if what != "physical":
            continue
        for L, r in sorted(by_L.items()):
            if L not in t[("sdpa_cudnn", None)]:  # past --max-dense-length: no dense reference
                continue
            ideal = r["density"] * t[("sdpa_cudnn", None)][L]["ms"]
            logical = t[("logical", target)][L]["ms"]
            eff_rows.append([f"{target:.1%}", k_label(L), f"{r['density']:.1%}", f"{r['ms']:.2f}", f"{ideal:.2f}",
                             f"{r['ms'] / ideal:.2f}", f"{logical:.2f}", f"{logical / r['ms']:.2f}"])
    efficiency = markdown_table(["target", "L", "rho", "physical ms", "rho x T(cuDNN) ms", "ratio (goal <= 1.15)",
                                 "logical ms", "logical / physical"], eff_rows)
    return f"""## Per-block efficiency: physical skip against rho x T(cuDNN dense)

{efficiency}
"""


def stages_section(t) -> str:
    """The selection stages, the whole call, its CUDA graph replay, host enqueue time and selection memory."""
    stages = markdown_table(
        ["L", "density", "pool", "score", "select+compact", "selection total", "% of cuDNN dense (goal 1%)",
         "flash_prefill", "/ cuDNN (goal at 4K 0.9)", "graph replay", "host enqueue", "selection peak MiB"],
        [[k_label(L), f"{t[('flash_prefill', None)][L]['density']:.1%}"]
         + [f"{t[(s, None)][L]['ms']:.3f}" for s in ("pool", "score", "select_compact", "selection_total")]
         + [ratio(t, "selection_total", "sdpa_cudnn", L, "{:.2%}"), f"{t[('flash_prefill', None)][L]['ms']:.3f}",
            ratio(t, "flash_prefill", "sdpa_cudnn", L, "{:.2f}"), cell(t, "flash_prefill_cuda_graph", L, "ms"),
            cell(t, "flash_prefill_host", L, "ms"), cell(t, "flash_prefill", L, "selection_peak_mib")]
         for L in sorted(t[("flash_prefill", None)])])
    return f"""## Whole pipeline and selection stages (ms), planted synthetic inputs, alpha 0.12, its own density

Stages are timed alone (each launched through its public function); "flash_prefill" is the whole call as a user
makes it. "graph replay": the same call captured once in a CUDA graph and replayed (no Python, no launch
overhead; only measured up to 32K). "host enqueue": CPU time to enqueue one call (Python, checks, launches), which
bounds short sequences from below: where it exceeds the graph replay, the call waits on the host (4K; its value
varies with the host CPU between machines). "selection peak MiB": peak GPU allocation of the call beyond q, k, v and the
output (selection buffers; flash_prefill scores and lists at most 1 GiB of query blocks at a time).

{stages}
"""


def one_million_section(t1m, first, t) -> str:
    """The 1M-token pipeline run (`bench_speed --lengths 1048576 --modes pipeline --tag <tag>_1m`): no dense
    baseline was run there (cuDNN would take ~17 s a call), so the cuDNN time is extrapolated from 256K as L^2."""
    L = max(t1m[("flash_prefill", None)])
    fp, sel = t1m[("flash_prefill", None)][L], t1m[("selection_total", None)][L]
    cudnn_256k = t[("sdpa_cudnn", None)].get(262144)
    extrapolated = f"{cudnn_256k['ms'] * (L / 262144) ** 2 / 1e3:.1f} s" if cudnn_256k else "-"
    table = markdown_table(
        ["L", "density", "flash_prefill ms", "selection ms", "score ms", "selection peak MiB", "peak beyond q, k, v MiB",
         "cuDNN dense, extrapolated L^2 from 256K (not measured)"],
        [[k_label(L), f"{fp['density']:.1%}", f"{fp['ms']:.1f}", f"{sel['ms']:.1f}",
          f"{t1m[('score', None)][L]['ms']:.1f}", fp.get("selection_peak_mib", "-"), fp.get("extra_peak_mib", "-"),
          extrapolated]])
    at_target = t1m[("flash_prefill_at_target", LOW_DENSITY)].get(L)
    if at_target:
        table += (f"\n\nThe same call with alpha {at_target['alpha']} (bisected so that the selection keeps "
                  f"{LOW_DENSITY:.1%}): {at_target['ms']:.1f} ms at {at_target['density']:.2%} density.")
    main_commit = next(iter(t[("sdpa_cudnn", None)].values()))["commit"]
    same_commit = "" if main_commit == first["commit"] else (
        f" The main tables are from `{main_commit}`: repro/NOTES.md says what changed in between.")
    return f"""
## 1M tokens (standard shape, planted synthetic inputs, alpha 0.12, one H200)

From `{first['commit']}` ({first['date']}): `python -m repro.bench_speed --lengths 1048576 --modes pipeline
--max-dense-length 0 --tag speed_h200_1m`. flash_prefill scores, selects and attends 512 query blocks at a time, so
its selection buffers stay near 1 GiB (goal: <= 2 GB); the 8 GiB output comes on top.{same_commit}

{table}
"""


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--csv", type=Path, default=RESULTS_DIR / "speed" / "speed_h200.csv",
                        help="a bench_speed CSV (default: the committed H200 run, %(default)s)")
    parser.add_argument("--out-dir", type=Path, default=None,
                        help="(default: the run folder repro/runs/<date>-<device>/speed/)")
    args = parser.parse_args(argv)
    out = args.out_dir or run_dir("speed")
    out.mkdir(parents=True, exist_ok=True)
    t, first = load(args.csv)
    stem = args.csv.stem
    rows = speedup_rows(t)
    plot_speedup(rows, out / f"{stem}_speedup.png", first)
    plot_density(t, out / f"{stem}_density.png", first)
    plot_stages(t, out / f"{stem}_stages.png", first)
    text = summary(t, rows, first)
    long_csv = args.csv.with_name(f"{stem}_1m.csv")
    if long_csv.exists():
        text += one_million_section(*load(long_csv), t)
    (out / f"{stem}_summary.md").write_text(text)
    print(text)
    print(f"wrote {stem}_{{speedup,density,stages}}.png and {stem}_summary.md in {out}")


if __name__ == "__main__":
    main()
