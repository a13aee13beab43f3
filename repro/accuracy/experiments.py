"""The accuracy study's experiments: the prompts of the NIAH grid and the RULER-style suite, the per-layer error of
sparse vs dense attention on real activations, and the calibration of alpha on separate seeds.

Calibration: alpha is chosen on prompts of a separate seed range (CALIBRATION_SEED and above), never on the
evaluation prompts (seeds < 1000), then evaluated on the evaluation seeds.
"""

from __future__ import annotations

import time

import torch

from block_selectors import FULL, Setting

from ..capture import capture_qkv
from ..common import torch_threads
from ..harness import AttentionSwitch, build_prompt, run_samples
from .tasks import Sample, generate, niah_single

CALIBRATION_SEED = 100_000  # calibration prompts use seeds >= this; evaluation prompts use seeds < 1000
NIAH_TASKS = ("passkey", "niah_single")
DEFAULT_SWEEP = (0.05, 0.08, 0.12, 0.18, 0.3)


def mean(xs) -> float:
    """The mean, nan for no values."""
    xs = list(xs)
    return sum(xs) / len(xs) if xs else float("nan")


def alpha_setting(alpha: float | None) -> Setting:
    """FlashPrefill at `alpha`; None: Full attention."""
    return Setting(FULL) if alpha is None else Setting("flashprefill", alpha)


def niah_samples(lengths, depths, tasks, seeds, count_tokens) -> list[tuple[str, Sample]]:
    return [("niah", generate(task, L, seed, count_tokens, depth=d))
            for seed in seeds for task in tasks for L in lengths for d in depths]


def ruler_samples(lengths, tasks, seeds, count_tokens) -> list[tuple[str, Sample]]:
    return [("ruler", generate(task, L, seed, count_tokens)) for seed in seeds for task in tasks for L in lengths]


def layer_errors(model, tokenizer, lengths, alphas, layers, count_tokens, cpu_threads, deadline=None,
                 cross_check_alpha=None, use_triton: bool | None = None) -> tuple[list[dict], list[str]]:
    """Relative error ||sparse - dense|| / ||dense|| of every chosen layer's attention output on a real prompt
    (a NIAH prompt of a calibration seed), with the realised density; dense = reference.dense_attention in float32.
    Returns (rows, what was skipped).

    On a GPU the Triton kernels run in the model's dtype (bf16), so alpha 0 gives the dtype's error floor; with
    `cross_check_alpha` the float32 reference also runs at that alpha on the same (bf16-rounded) q/k/v of every
    fourth layer and the last (the reference walks its block lists in Python: ~0.5 s a layer at 8K on a GPU), and
    its density and error are stored beside the kernel's (columns ref_density, ref_rel_error). Lengths past
    `deadline` (time.time()) are skipped. use_triton: None = Triton on a CUDA model (the tests force it under the
    CPU interpreter)."""
    import reference
    from tqdm.auto import tqdm

    triton = None
    if use_triton is None:
        use_triton = model.device.type == "cuda"
    if use_triton:
        import triton_impl as triton
    rows, skipped = [], []
    for n_done, L in enumerate(lengths):
        if deadline is not None and time.time() > deadline:
            skipped.append(f"layer error: lengths {lengths[n_done:]} skipped (time budget)")
            break
        sample = niah_single(L, CALIBRATION_SEED + 1, count_tokens, depth=0.5)
        ids = build_prompt(tokenizer, sample).to(model.device)
        with capture_qkv(model, set(layers) if layers else None, dtype=torch.float32) as store, torch.no_grad():
            model(ids, logits_to_keep=1)
        impl = triton or reference
        cross_layers = set(sorted(store)[::4]) | {max(store)} if store else set()
        for layer in tqdm(sorted(store), desc=f"layer error L={L}", unit="layer", dynamic_ncols=True):
            q, k, v = (t.to(model.device, model.dtype if triton else torch.float32) for t in store[layer])
            with torch_threads(None if triton else (cpu_threads or None)):
                dense = reference.dense_attention(q.float(), k.float(), v.float())
                for alpha in alphas:
                    out, stats = impl.flash_prefill(q, k, v, alpha=alpha, return_stats=True)
                    err = ((out.float() - dense).norm() / dense.norm()).item()
                    row = dict(experiment="layer_error", layer=layer, length=L, tokens=ids.shape[1],
                               alpha=alpha, density=float(stats.density), rel_error=err,
                               impl="triton" if triton else "reference", dtype=str(q.dtype).replace("torch.", ""))
                    if triton and alpha == cross_check_alpha and layer in cross_layers:
                        ref, ref_stats = reference.flash_prefill(q.float(), k.float(), v.float(), alpha=alpha,
                                                                 return_stats=True)
                        row.update(ref_density=float(ref_stats.density),
                                   ref_rel_error=((ref - dense).norm() / dense.norm()).item())
                    rows.append(row)
        del store
    return rows, skipped


def calibrate(model, tokenizer, switch: AttentionSwitch, lengths, alphas, count_tokens, goal: float,
              n: int) -> dict[int, float]:
    """Largest alpha (sparsest) whose NIAH+passkey score on calibration seeds is within `goal` of Full, per length.
    Uses seeds >= CALIBRATION_SEED only."""
    samples = niah_samples(lengths, [i / max(1, n - 1) for i in range(n)], NIAH_TASKS,
                           [CALIBRATION_SEED + 7], count_tokens)
    settings = [alpha_setting(a) for a in [None] + sorted(alphas)]
    rows, _ = run_samples(model, tokenizer, switch, samples, settings, "calibration")
    chosen = {}
    for L in lengths:
        full = mean([r["score"] for r in rows if r["length"] == L and r["method"] == "full"])
        ok = [a for a in sorted(alphas)
              if mean([r["score"] for r in rows if r["length"] == L and r["alpha"] == a]) >= full - goal]
        chosen[L] = max(ok) if ok else min(alphas)
    return chosen
