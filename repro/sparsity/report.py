"""<tag>.md of repro.sparsity: one function per section, each returning its lines (an empty list when the run has
nothing for it), joined by `render_markdown`.

    title
    synthetic_density_section   density vs length on synthetic inputs, the paper's 256K densities beside
    at_256k_section             ours vs the paper's at 256K (GPU runs)
    density_check_section       Triton vs reference FlashPrefill densities
    selection_time_section      selection time per setting and length, and what each implementation is
    peak_memory_section         peak GPU memory of one selection call (CUDA runs)
    real_section                density and attention-output error on real activations (or why it was skipped)
    error_matched_section       the error-matched settings
    stamp line
"""

from __future__ import annotations

from pathlib import Path

from block_selectors import SELECTORS

from ..common import length_label, markdown_table, stamp_line
from ..paper import PAPER_DENSITY_256K
from .measure import density_check
from .settings import (BLOCK, DEFAULT_SETTINGS, DENSITY_TOLERANCE, MATCH_GRID, PYTORCH, REFERENCE, SYNTHETIC, TRITON,
                       V1_ALPHA, impl_label, pct)

TITLE = "# Block density: FlashPrefill vs FlexPrefill vs XAttention (same inputs, same sparse attention)"


def write_markdown(path: Path, rows, stamp, *, settings, shape, repeats, layers, real_note) -> str:
    """Write render_markdown's text to `path`; return it."""
    text = render_markdown(rows, stamp, settings=settings, shape=shape, repeats=repeats, layers=layers,
                           real_note=real_note)
    path.write_text(text)
    return text


def render_markdown(rows, stamp, *, settings, shape, repeats, layers, real_note) -> str:
    """The report of a run: `settings` ran on the synthetic inputs of `shape` with `repeats` timed calls; `layers`
    are the real activations' layers; `real_note` says why the real part did not run ("" when it did)."""
    syn = [r for r in rows if r["input"] == SYNTHETIC]
    real = [r for r in rows if r["input"] != SYNTHETIC and r["what"] == "selection" and r["layer"] == "all"
            and any(r["setting"] == s.label for s in DEFAULT_SETTINGS)]
    matched = [r for r in rows if r["what"] == "error_matched"]
    device = stamp["device_name"]
    parts = [TITLE, ""]
    parts += synthetic_density_section(syn, settings, shape, device)
    parts += at_256k_section(syn, settings)
    parts += density_check_section(syn)
    parts += selection_time_section(syn, settings, stamp, repeats)
    parts += peak_memory_section(syn, settings, device)
    parts += real_section(real, layers, device, real_note)
    parts += error_matched_section(matched)
    parts += [stamp_line(stamp), ""]
    return "\n".join(parts)


# --------------------------------------------------------------------------------------------------------------
# Helpers
# --------------------------------------------------------------------------------------------------------------
def paper_cell(s) -> str:
    """The paper's 256K density for a selector's default setting (FlashPrefill: alpha 0.12), labelled "paper"."""
    quoted = s.selector != "flashprefill" or s.value == V1_ALPHA
    return f"{100 * PAPER_DENSITY_256K[s.name]:.1f}% (paper)" if quoted else "-"


def setting_table(syn, settings, cell, extra_head=(), extra=lambda s: []) -> str:
    """One row per setting (label, implementation), one column per synthetic length: cell(row) or "-"."""
    Ls = sorted({r["L"] for r in syn})
    d = {(r["setting"], r["L"]): r for r in syn}
    body = [[s.label, impl_label(s)] + [cell(d[s.label, L]) if (s.label, L) in d else "-" for L in Ls] + extra(s)
            for s in settings]
    head = ["selector (setting)", "implementation"] + [length_label(L) for L in Ls] + list(extra_head)
    return markdown_table(head, body)


# --------------------------------------------------------------------------------------------------------------
# Sections
# --------------------------------------------------------------------------------------------------------------
def synthetic_density_section(syn, settings, shape, device) -> list[str]:
    if not syn:
        return []
    Ls = sorted({r["L"] for r in syn})
    return [f"## Density vs length on **synthetic** inputs ({SYNTHETIC})", "",
            setting_table(syn, settings, lambda r: pct(r["density"]), ["**paper** @256K (Qwen3-30B-A3B, real)"],
                          lambda s: [paper_cell(s)]), "",
            f"Synthetic planted-pattern Q/K (sinks, local decay, slashes, vertical stripes; no model), B=1, "
            f"Hq={shape['q_heads']}, Hkv={shape['kv_heads']}, D={shape['head_dim']}, Bs={BLOCK}, "
            f"{syn[0]['dtype']}, on {device}. Lengths {', '.join(length_label(L) for L in Ls)}"
            + ("" if max(Ls) >= 262144 else " (256K was not run here: it needs a GPU; "
               "`python -m repro.sparsity --device cuda` runs it)") + ". The **paper** column quotes the "
            "paper's 256K densities on a real model (docs/DESIGN.md section 7); synthetic densities show how "
            "each rule scales with L, not the paper's values.", ""]


def at_256k_section(syn, settings) -> list[str]:
    d = {(r["setting"], r["L"]): r for r in syn if r["L"] == 262144}
    if not d:
        return []
    ours = {}  # selector -> its first default setting measured at 256K (FlashPrefill: Triton when run)
    for s in settings:
        if paper_cell(s) != "-" and (s.label, 262144) in d:
            ours.setdefault(s.name, d[s.label, 262144])
    return ["At 256K: " + "; ".join(f"{sel} {pct(r['density'])} (ours, **synthetic**) vs "
                                    f"{100 * PAPER_DENSITY_256K[sel]:.1f}% (**paper**, real model)"
                                    for sel, r in ours.items()) + ".", ""]


def density_check_section(syn) -> list[str]:
    pairs, bad = density_check(syn)
    if not pairs:
        return []
    worst = max(abs(a - b) for _, a, b in pairs)
    return ["Triton vs reference stages (FlashPrefill alpha 0.12): densities "
            + ("**DIFFER** beyond " if bad else "agree within ") + f"{DENSITY_TOLERANCE:g} at "
            f"{', '.join(length_label(L) for L, _, _ in pairs)} (largest difference {worst:.2g}).", ""]


def selection_time_section(syn, settings, stamp, repeats) -> list[str]:
    if not syn:
        return []
    timed = "one timed call" if repeats == 1 else f"the median of {repeats} timed calls"
    timer = (f"one untimed warm-up call, then {timed}, each between two CUDA events" if stamp["device"] == "cuda"
             else f"one untimed warm-up call, then {timed} (wall clock, one thread)")
    return [f"### Selection time (ms, {stamp['device_name']}; synthetic inputs)", "",
            setting_table(syn, settings,
                          lambda r: f"{r['select_ms']:.3g}" if r["select_ms"] < 100 else f"{r['select_ms']:.0f}"), "",
            f"Selection only (no attention): {timer}. Implementations: **{TRITON}** = "
            "triton_impl.mean_pool_keys + block_scores + select_and_compact (the selection "
            f"triton_impl.flash_prefill runs); **{REFERENCE}** = the readable stages of `reference`; the peers "
            f"are **{PYTORCH}**: our readable PyTorch from their papers (the official FlexPrefill and XAttention "
            "use fused Triton kernels), so their times are not the papers' speeds. Compare the peers with "
            "FlashPrefill's reference-stages row (all three readable PyTorch)."
            + (" FlashPrefill's Triton kernels did not run here (they need CUDA, or TRITON_INTERPRET=1)."
               if not any(impl_label(s) == TRITON for s in settings) else "" if stamp["device"] == "cuda" else
               " The Triton kernels ran under the CPU interpreter (a dry run): their times say nothing about "
               "speed."), ""]


def peak_memory_section(syn, settings, device) -> list[str]:
    if not any(r["peak_mib"] != "" for r in syn):
        return []
    return [f"### Peak GPU memory of one selection call (MiB beyond its inputs, {device})", "",
            setting_table(syn, settings, lambda r: f"{r['peak_mib']:.0f}"), "",
            "torch.cuda.max_memory_allocated during the warm-up call minus what was allocated before it "
            "(q and k). The peers' estimates run in chunks (peers/) to stay a few GiB at 256K.",
            ""]


def real_section(real, layers, device, real_note) -> list[str]:
    if not real:
        return ["## Real SmolLM2-135M activations", "", real_note, ""] if real_note else []
    Ls = sorted({r["L"] for r in real})
    d = {(r["setting"], r["L"]): r for r in real}
    head = ["selector (setting)"] + [f"{length_label(L)} density / error" for L in Ls]
    table = [[s.label] + [f"{pct(d[s.label, L]['density'])} / {d[s.label, L]['rel_error']:.3f}"
                          if (s.label, L) in d else "-" for L in Ls] for s in DEFAULT_SETTINGS]
    return ["## Real SmolLM2-135M activations: density and attention-output error vs dense", "",
            markdown_table(head, table), "",
            "q/k/v of SmolLM2-135M-Instruct (Hq=9, Hkv=3, D=64) on a NIAH prompt, layers "
            f"{', '.join(map(str, layers))}, truncated to each length, on {device}. FlashPrefill: "
            "the reference stages. Density averaged over the "
            "layers; error = ||O_sparse - O_dense||_F / ||O_dense||_F over all layers together "
            "(reference.block_sparse_attention with each selector's lists vs reference.dense_attention, "
            "float32). FlexPrefill is dense (density 100%, error 0) whenever L <= its minimum budget of 1024 "
            "tokens (its short-input rule).", ""]


def error_matched_section(matched) -> list[str]:
    if not matched:
        return []
    L = matched[0]["L"]
    table = [[r["selector"], f"{r['param']} = {r['value']:g}", pct(r["density"]), f"{r['rel_error']:.4f}",
              "yes" if r["matched"] else "no (lowest error in the grid)"] for r in matched]
    grids = "; ".join(f"{SELECTORS[key].name}: {SELECTORS[key].knob} in {list(values)}"
                      for key, values in MATCH_GRID.items())
    return [f"## Error-matched settings (real SmolLM2 activations, {length_label(L)})", "",
            markdown_table(["selector", "setting", "density", "rel. error", "error <= target"], table), "",
            f"Target: FlashPrefill's error at alpha = 0.12, {matched[0]['target_rel_error']:.4f}. For each "
            "selector, the sparsest setting of its grid " + grids
            + " whose all-layer error does not exceed the target. This is **error-matched** (attention-output "
            "error); the matching by task accuracy, with every selector inside SmolLM2 on the same prompts, "
            "is `python -m repro.sparsity_accuracy` (sparsity_accuracy.md).", ""]
