"""Operator level (teacher-forced): every layer's FlashPrefill on the q/k/v of one Full forward, at every alpha.

For one layer's q (1, L, Hq, D), k and v (1, L, Hkv, D), as Full's forward fed them to attention:

* the output error of FlashPrefill at each alpha against exact float32 dense attention,
  rel_error = ||out - dense|| / ||dense|| over all rows and heads (the inputs are Full's at every layer, so the
  error is this layer's own, with no drift from earlier layers);
* its density (kept / causal 128 x 128 blocks) and nestedness: `extra_blocks`, the blocks kept at this alpha but not
  at the next smaller alpha of the list, and `not_nested` = extra_blocks / kept_blocks (0 when the kept sets are
  nested, as they must be for the same scores: keep iff Score >= alpha * max is monotone in alpha);
* the needle's key block(s) (`needle_kept`, below), per head at the default alpha (one row per head) and as the
  mean over heads at every alpha (columns of the layer row).

Needle blocks. For query block I and needle key block J the pair is *forced* (kept whatever alpha) when J is a sink
block, I - J < window_blocks, or I is one of the last `last_dense_blocks` query blocks; the question's query blocks
(the prompt's tail, a few dozen tokens) are always among the last ones, so (a) `kept_question` is forced to 1 and
`question_forced` says so. The informative measure is (b) `kept_between`: the fraction of the *decided* pairs
(not forced, J <= I) between the needle and the end that the selection keeps, with `needle_ratio`, the median over
those pairs of Score[I, J] / max_J' Score[I, J'] (the pair is kept iff the ratio >= alpha), and `kept_last`, the
decision for the last decided query block (the one just before the dense tail).
"""

from __future__ import annotations

import math

import torch

import reference
from reference.selection import safety_net_mask

from ..common import error_sums


def implementation(device: torch.device):
    """FlashPrefill's module for `device`: the Triton kernels on CUDA (model dtype), the reference elsewhere."""
    if device.type == "cuda":
        import triton_impl

        return triton_impl
    return reference


def needle_kept(masks: torch.Tensor, ratios: torch.Tensor, blocks, question_start: int, *, block_size: int,
                sink_blocks: int, window_blocks: int, last_dense_blocks: int) -> dict[str, torch.Tensor]:
    """Per head: is the needle's key block kept?

    masks: (Hq, M, M) bool, the kept blocks; ratios: (Hq, M, M) Score / causal row max (or None); blocks: the
    needle's key blocks; question_start: the first token of the prompt's tail. Returns per head (Hq,) float
    tensors: kept_question, kept_between, kept_last (NaN where there is no such pair), needle_ratio (median over
    the decided pairs, NaN without ratios), and the counts question_forced (1.0 when every question pair is
    forced), n_decided."""
    Hq, M, _ = masks.shape
    device = masks.device
    J = torch.tensor(sorted(blocks), device=device)
    forced = safety_net_mask(M, sink_blocks, window_blocks, last_dense_blocks, device=device)[:, J]  # (M, nJ)
    I = torch.arange(M, device=device).view(M, 1)
    causal = J.view(1, -1) <= I
    kept = masks[:, :, J]  # (Hq, M, nJ)
    question = (I >= question_start // block_size).expand_as(causal) & causal
    decided = causal & ~forced
    last_decided_row = M - last_dense_blocks - 1
    last = decided & (I == last_decided_row)
    nan = torch.full((Hq,), math.nan, device=device)

    def fraction(pairs: torch.Tensor) -> torch.Tensor:
        n = int(pairs.sum())
        return kept[:, pairs].float().mean(dim=1) if n else nan

    all_forced = float(bool(forced[question].all())) if int(question.sum()) else math.nan
    out = dict(kept_question=fraction(question), kept_between=fraction(decided), kept_last=fraction(last),
               question_forced=torch.full((Hq,), all_forced, device=device),
               n_decided=torch.full((Hq,), float(decided.sum()), device=device))
    if ratios is not None and int(decided.sum()):
        out["needle_ratio"] = ratios[:, :, J][:, decided].float().median(dim=1).values
    else:
        out["needle_ratio"] = nan
    return out


def score_ratios(impl, q: torch.Tensor, k: torch.Tensor, block_size: int) -> torch.Tensor:
    """(Hq, M, M) Score[I, J] / max_{J' <= I} Score[I, J'] of batch 0 (0 above the diagonal)."""
    scores = impl.block_scores(q, impl.mean_pool_keys(k, block_size), block_size)[0].float()
    M = scores.shape[-1]
    causal = torch.ones(M, M, dtype=torch.bool, device=scores.device).tril()
    row_max = scores.masked_fill(~causal, float("-inf")).amax(dim=-1, keepdim=True)
    return torch.where(causal, scores / row_max.clamp_min(1e-30), torch.zeros((), device=scores.device))


@torch.inference_mode()
def measure_layer(impl, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, alphas, *, default_alpha: float,
                  needle=None, block_size: int = 128, sink_blocks: int = 2, window_blocks: int = 4,
                  last_dense_blocks: int = 2) -> tuple[list[dict], list[dict]]:
    """One layer at every alpha: (layer rows, one per alpha; needle rows, one per head at `default_alpha`).

    q (1, L, Hq, D), k and v (1, L, Hkv, D) on the device `impl` runs on, in the dtype it runs (the model's on
    CUDA, float32 on the CPU). needle: a `prompts.NeedleLocation` or None (no needle columns)."""
    safety = dict(sink_blocks=sink_blocks, window_blocks=window_blocks, last_dense_blocks=last_dense_blocks)
    dense = reference.dense_attention(q.float(), k.float(), v.float())  # the float32 ground truth
    ratios = score_ratios(impl, q, k, block_size) if needle is not None else None
    rows, needle_rows, previous = [], [], None
    for alpha in sorted(alphas):
        out, stats = impl.flash_prefill(q, k, v, alpha=alpha, block_size=block_size, return_stats=True, **safety)
        masks = reference.lists_to_mask(stats.counts, stats.indices)[0]  # (Hq, M, M)
        err2, ref2 = error_sums(out, dense)
        kept_blocks = int(masks.sum())
        row = dict(alpha=alpha, density=float(stats.density), rel_error=math.sqrt(err2 / ref2), err2=err2, ref2=ref2,
                   kept_blocks=kept_blocks)
        if previous is not None:
            extra = int((masks & ~previous[1]).sum())
            row.update(prev_alpha=previous[0], extra_blocks=extra, not_nested=extra / max(1, kept_blocks))
        if needle is not None:
            per_head = needle_kept(masks, ratios, needle.blocks, needle.question_start, block_size=block_size,
                                   **safety)
            row.update(needle_kept_between=_nanmean(per_head["kept_between"]),
                       needle_kept_last=_nanmean(per_head["kept_last"]))
            if alpha == default_alpha:
                values = {name: t.tolist() for name, t in per_head.items()}
                needle_rows += [dict(alpha=alpha, head=h, **{name: values[name][h] for name in values})
                                for h in range(masks.shape[0])]
        rows.append(row)
        previous = (alpha, masks)
    return rows, needle_rows


def _nanmean(x: torch.Tensor) -> float:
    return float(x.nanmean()) if bool((~x.isnan()).any()) else math.nan
