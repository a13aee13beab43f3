"""The oracle: FlashPrefill's contract (docs/DESIGN.md section 2) restated independently of `reference/`, and the
rules by which an implementation is compared with it. The tests and `python -m repro.check_triton` import this.

Restatements (float64, explicit masks, plain loops where the formula reads best that way; keep sizes small):

    naive_mean_pool_fp64      step 1: the mean of the valid tokens of each key block
    naive_block_scores_fp64   step 2: Score_IJ (Eq. 1-2) with Python loops and math.exp
    naive_select_blocks       step 3: the alpha * max threshold (Eq. 3) and the safety net, with Python loops
    list_mismatch             step 4: are (counts, indices) exactly the ascending lists of a mask?
    naive_attention           step 5: softmax(scale q k^T) v over the causal tokens of the kept blocks, in any dtype
    naive_mean_corrected_attention_fp64   step 5 with V2's mean correction (Eq. 6): the pruned blocks below the
                              diagonal as extra keys (their means), each with logit + log Bs
                              (`naive_mean_corrected_attention` evaluates the same formula in any dtype)
    (return_lse=True on these: also the log-sum-exp of each row's visible logits, (B, Hq, L), -inf for none)
    naive_chunk_block_scores_fp64   step 2 for one chunk of a sequence over a cached prefix (varlen, section 9):
                              only the chunk's rows contribute, absolute blocks
    naive_chunk_attention     step 5 for one chunk (q_len <= k_len, bottom-right causal) over explicit per-row
                              kept key blocks, optionally with the mean correction, in any dtype

Rules (docs/DESIGN.md section 4), stated here once:

* Outputs follow FlashAttention's rule (`flash_rule`; `corrected_flash_rule` with the mean correction): with the
  float64 oracle `ref` and a PyTorch result `pt` in the input's own precision, on the same inputs and the same block
  set, max |out - ref| <= 2 max |pt - ref| + 1e-5.
* Block sets must be identical except at threshold ties (`block_sets_agree`): |Score - alpha * row max| <=
  TIE_TOLERANCE * row max, and at most MAX_TIE_FRACTION of the blocks (+ 1).
* ATOL: what an output in a dtype may differ from a float64 ground truth on the same inputs (reference tests).

This module imports torch only, so that comparing against it compares against the formulas, not the code under test.
"""

from __future__ import annotations

import math

import torch

TIE_TOLERANCE = 1e-4
MAX_TIE_FRACTION = 0.01
FLASH_RULE_FACTOR, FLASH_RULE_SLACK = 2.0, 1e-5
ATOL = {torch.float64: 1e-10, torch.float32: 2e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}


def num_blocks(L: int, block_size: int) -> int:
    return -(-L // block_size)


# --------------------------------------------------------------------------------------------------------------
# Restatements of steps 1-5
# --------------------------------------------------------------------------------------------------------------
def naive_mean_pool_fp64(k: torch.Tensor, block_size: int) -> torch.Tensor:
    """(B, L, Hkv, D) -> (B, N, Hkv, D) float64: mean over the valid tokens of each key block."""
    L = k.shape[1]
    return torch.stack(
        [k[:, s : min(s + block_size, L)].double().mean(dim=1) for s in range(0, L, block_size)], dim=1
    )


def naive_block_scores_fp64(q: torch.Tensor, kbar: torch.Tensor, block_size: int, scale: float,
                            first_row: int = 0) -> torch.Tensor:
    """Step 2 with plain Python loops and math.exp in float64 (keep sizes tiny).

    Query i of block I contributes to key block J iff i >= (J+1)*Bs - 1 (and first_row <= i < L; first_row > 0: the
    rows before it belong to earlier chunks of a prefill over a cached prefix).
    m_IJ = max s_iJ, S_IJ = sum exp(s_iJ - m_IJ), M_I = max_J m_IJ,
    Score_IJ = S_IJ exp(m_IJ - M_I) / (sum_J' S_IJ' exp(m_IJ' - M_I) + 1e-9); 0 where nobody contributes.
    """
    B, L, Hq, D = q.shape
    Hkv = kbar.shape[2]
    group = Hq // Hkv
    M = N = num_blocks(L, block_size)
    qd = q.double().tolist()
    kd = kbar.double().tolist()
    out = torch.zeros(B, Hq, M, N, dtype=torch.float64)
    for b in range(B):
        for h in range(Hq):
            hk = h // group
            for I in range(M):
                m, S = {}, {}
                for J in range(N):
                    s = [
                        scale * sum(a * c for a, c in zip(qd[b][i][h], kd[b][J][hk]))
                        for i in range(max(first_row, I * block_size), min((I + 1) * block_size, L))
                        if i >= (J + 1) * block_size - 1
                    ]
                    if s:
                        m[J] = max(s)
                        S[J] = sum(math.exp(x - m[J]) for x in s)
                if not m:
                    continue
                M_I = max(m.values())
                total = sum(S[J] * math.exp(m[J] - M_I) for J in m)
                for J in m:
                    out[b, h, I, J] = S[J] * math.exp(m[J] - M_I) / (total + 1e-9)
    return out


def naive_select_blocks(scores: torch.Tensor, alpha: float, sink_blocks: int, window_blocks: int,
                        last_dense_blocks: int) -> torch.Tensor:
    """Step 3 with plain loops (exact for float64 scores, and for float32 scores whose products with alpha are
    exact): m_I = max over the causal J <= I, NaN if one of them is NaN; keep iff causal and
    (NOT(Score < alpha * m_I) or forced)."""
    B, Hq, M, N = scores.shape
    s = scores.tolist()
    out = torch.zeros(B, Hq, M, N, dtype=torch.bool)
    for b in range(B):
        for h in range(Hq):
            for I in range(M):
                causal = s[b][h][I][: I + 1]
                row_max = math.nan if any(math.isnan(x) for x in causal) else max(causal)
                threshold = alpha * row_max
                for J in range(min(I + 1, N)):
                    out[b, h, I, J] = (
                        not s[b][h][I][J] < threshold
                        or J < sink_blocks
                        or I - J < window_blocks
                        or I >= M - last_dense_blocks
                    )
    return out


def list_mismatch(counts: torch.Tensor, indices: torch.Tensor, mask: torch.Tensor) -> str:
    """"" when counts == the row sums of mask and indices[..., :counts] == its kept J in ascending order (int32
    both, nothing past counts read); otherwise what differs, for an assertion message."""
    if counts.dtype != torch.int32 or indices.dtype != torch.int32:
        return f"dtypes {counts.dtype} / {indices.dtype}, not int32"
    if counts.shape != mask.shape[:-1] or indices.shape[:-1] != mask.shape[:-1]:
        return f"shapes {tuple(counts.shape)} / {tuple(indices.shape)} for a mask of {tuple(mask.shape)}"
    expected = mask.sum(dim=-1, dtype=torch.int32)
    if not torch.equal(counts.cpu(), expected.cpu()):
        row = torch.nonzero(counts.cpu() != expected.cpu())[0].tolist()
        return f"counts differ first at row {row}: {int(counts[tuple(row)])} vs {int(expected[tuple(row)])}"
    counts, indices, mask = counts.cpu(), indices.cpu(), mask.cpu()
    for row in torch.nonzero(torch.ones(mask.shape[:-1], dtype=torch.bool)).tolist():
        listed = indices[tuple(row)][: int(counts[tuple(row)])].tolist()
        kept = torch.nonzero(mask[tuple(row)]).flatten().tolist()
        if listed != kept:
            return f"row {row} lists {listed}, the mask keeps {kept}"
    return ""


def assert_lists_match_mask(counts: torch.Tensor, indices: torch.Tensor, mask: torch.Tensor) -> None:
    problem = list_mismatch(counts, indices, mask)
    assert not problem, problem


def token_mask_from_blocks(block_mask: torch.Tensor, L: int, block_size: int) -> torch.Tensor:
    """(B, Hq, M, N) block mask -> (B, Hq, L, L) token mask: causal and inside a kept block."""
    token = block_mask.repeat_interleave(block_size, dim=-2).repeat_interleave(block_size, dim=-1)[..., :L, :L]
    causal = torch.ones(L, L, dtype=torch.bool, device=block_mask.device).tril()
    return token & causal


def naive_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, block_mask: torch.Tensor | None = None,
                    block_size: int | None = None, softmax_scale: float | None = None, *,
                    token_mask: torch.Tensor | None = None, dtype: torch.dtype = torch.float64,
                    return_lse: bool = False):
    """softmax(scale q k^T) v over the visible keys, computed entirely in `dtype` (GQA by repeat_interleave).

    q (B, L, Hq, D), k/v (B, L, Hkv, D). Visible: causal, and inside a kept block of `block_mask` (B, Hq, M, N)
    with `block_size` when given, and where `token_mask` (B, Hq, L, L) bool is True when given. Query rows are
    processed in chunks, so no (L, L) matrix is held (unless token_mask is one). A row with no visible key gives 0;
    NaN and inf in q, k, v propagate as the formula has them. Returns (B, L, Hq, D) in `dtype`; with return_lse
    also lse (B, Hq, L) in `dtype`, log sum over the visible j of exp(scale q_i . k_j) (-inf with none visible).
    """
    B, L, Hq, D = q.shape
    group = Hq // k.shape[2]
    scale = 1.0 / math.sqrt(D) if softmax_scale is None else softmax_scale
    qd = q.to(dtype).transpose(1, 2)
    kd = k.to(dtype).repeat_interleave(group, dim=2).transpose(1, 2)
    vd = v.to(dtype).repeat_interleave(group, dim=2).transpose(1, 2)
    out = torch.zeros_like(qd)
    lse = torch.empty(B, Hq, L, dtype=dtype, device=q.device)
    rows = max(1, (1 << 25) // (B * Hq * L))
    key_pos = torch.arange(L, device=q.device)
    for i0 in range(0, L, rows):
        i1 = min(L, i0 + rows)
        query_pos = torch.arange(i0, i1, device=q.device)
        visible = (key_pos[None, :] <= query_pos[:, None]).expand(B, Hq, i1 - i0, L)
        if block_mask is not None:
            visible = visible & block_mask[:, :, query_pos // block_size][..., key_pos // block_size]
        if token_mask is not None:
            visible = visible & token_mask[:, :, i0:i1]
        s = ((qd[:, :, i0:i1] @ kd.transpose(-1, -2)) * scale).masked_fill(~visible, float("-inf"))
        p = torch.softmax(s, dim=-1)
        p = torch.where(visible.any(dim=-1, keepdim=True), p, 0.0)  # no visible key: 0, not the softmax's NaN
        out[:, :, i0:i1] = p @ vd
        lse[:, :, i0:i1] = torch.logsumexp(s, dim=-1)  # no visible key: -inf
    return (out.transpose(1, 2), lse) if return_lse else out.transpose(1, 2)


def naive_mean_corrected_attention_fp64(q, k, v, block_mask: torch.Tensor, block_size: int,
                                        softmax_scale: float | None = None, *, return_lse: bool = False):
    """float64, one (L + N)-column softmax per row: the L tokens (causal, in a kept block) and N extra columns, one
    per key block J, visible to row i of block I iff J < I and J is not kept, with key k_bar_J, value v_bar_J (the
    means of its Bs tokens) and logit scale q_i . k_bar_J + log Bs. Materialises (L, L + N): keep L small.
    return_lse: also the log-sum-exp of those L + N logits per row, (B, Hq, L)."""
    return naive_mean_corrected_attention(q, k, v, block_mask, block_size, softmax_scale, dtype=torch.float64,
                                          return_lse=return_lse)


def naive_mean_corrected_attention(q, k, v, block_mask: torch.Tensor, block_size: int,
                                   softmax_scale: float | None = None, *, dtype: torch.dtype,
                                   return_lse: bool = False):
    """`naive_mean_corrected_attention_fp64`'s formula computed entirely in `dtype` (the block means too: averaged,
    then held in `dtype`), for the `pt` side of FlashAttention's rule. Returns (B, L, Hq, D) in `dtype` [, lse]."""
    B, L, Hq, D = q.shape
    group = Hq // k.shape[2]
    scale = 1.0 / math.sqrt(D) if softmax_scale is None else softmax_scale
    N = num_blocks(L, block_size)
    qd = q.to(dtype).transpose(1, 2)  # (B, Hq, L, D)
    kd = k.to(dtype).repeat_interleave(group, dim=2).transpose(1, 2)
    vd = v.to(dtype).repeat_interleave(group, dim=2).transpose(1, 2)
    k_bar = torch.stack([kd[:, :, J * block_size : (J + 1) * block_size].mean(dim=2) for J in range(N)], dim=2)
    v_bar = torch.stack([vd[:, :, J * block_size : (J + 1) * block_size].mean(dim=2) for J in range(N)], dim=2)
    token_logits = scale * qd @ kd.transpose(-1, -2)
    token_visible = token_mask_from_blocks(block_mask, L, block_size)
    row_block = torch.arange(L, device=q.device) // block_size  # I of each query row
    J = torch.arange(N, device=q.device)
    pruned = ~block_mask[:, :, row_block] & (J.view(1, 1, 1, N) < row_block.view(1, 1, L, 1))  # (B, Hq, L, N)
    mean_logits = scale * qd @ k_bar.transpose(-1, -2) + math.log(block_size)
    logits = torch.cat([token_logits, mean_logits], dim=-1).masked_fill(~torch.cat([token_visible, pruned], -1),
                                                                        float("-inf"))
    p = torch.softmax(logits, dim=-1).nan_to_num(0.0)  # a row with nothing visible gives 0
    out = (p @ torch.cat([vd, v_bar], dim=2)).transpose(1, 2)
    return (out, torch.logsumexp(logits, dim=-1)) if return_lse else out


# --------------------------------------------------------------------------------------------------------------
# Chunked prefill over a cached prefix (one sequence of a varlen batch; docs/DESIGN.md section 9)
# --------------------------------------------------------------------------------------------------------------
def naive_chunk_block_scores_fp64(q: torch.Tensor, kbar: torch.Tensor, block_size: int, scale: float,
                                  k_len: int) -> torch.Tensor:
    """Step 2 for a chunk, with plain loops in float64 (keep sizes tiny).

    q (Lq, Hq, D): the chunk, its row r at absolute position P + r, P = k_len - Lq; kbar (N, Hkv, D),
    N = ceil(k_len / Bs). Returns Score (Hq, N - I0, N) for the query blocks I0 = P // Bs .. N - 1: query i of block
    I contributes to key block J iff it is one of the chunk's rows (P <= i < k_len) and i >= (J+1)*Bs - 1; then
    Eq. 1-2 as in `naive_block_scores_fp64`; 0 where nobody contributes."""
    Lq, Hq, D = q.shape
    P = k_len - Lq
    q_abs = torch.cat([torch.zeros(P, Hq, D, dtype=q.dtype), q.cpu()])[None]  # the chunk at its absolute rows
    return naive_block_scores_fp64(q_abs, kbar.cpu()[None], block_size, scale, first_row=P)[0, :, P // block_size:]


def naive_chunk_attention(q, k, v, row_blocks: torch.Tensor, block_size: int, softmax_scale: float | None = None,
                          *, mean_correction: bool = False, dtype: torch.dtype = torch.float64,
                          return_lse: bool = False):
    """softmax attention of a chunk over explicit per-row kept key blocks, computed entirely in `dtype`.

    q (Lq, Hq, D), k/v (Lk, Hkv, D), Lq <= Lk; row r of the chunk sits at absolute position p = Lk - Lq + r
    (bottom-right causal alignment). row_blocks (Hq, Lq, N) bool: the key blocks row r keeps (N = ceil(Lk / Bs));
    key j is visible to row r iff j <= p and row_blocks[h, r, j // Bs]. With mean_correction, every block J < p // Bs
    that row r does not keep adds one column: key k_bar_J, value v_bar_J (the means of its Bs keys), logit
    scale q . k_bar_J + log Bs. Materialises (Lq, Lk + N) per head: keep sizes small. A row with nothing visible
    gives 0 (lse -inf). Returns (Lq, Hq, D) in `dtype` [, lse (Hq, Lq)]."""
    Lq, Hq, D = q.shape
    Lk = k.shape[0]
    group = Hq // k.shape[1]
    scale = 1.0 / math.sqrt(D) if softmax_scale is None else softmax_scale
    N = num_blocks(Lk, block_size)
    qd = q.to(dtype).transpose(0, 1)  # (Hq, Lq, D)
    kd = k.to(dtype).repeat_interleave(group, dim=1).transpose(0, 1)  # (Hq, Lk, D)
    vd = v.to(dtype).repeat_interleave(group, dim=1).transpose(0, 1)
    position = torch.arange(Lk - Lq, Lk).view(Lq, 1)  # p of each row
    key_pos = torch.arange(Lk).view(1, Lk)
    token_visible = (key_pos <= position) & row_blocks[:, :, key_pos.flatten() // block_size]  # (Hq, Lq, Lk)
    logits = scale * qd @ kd.transpose(-1, -2)
    values = vd
    visible = token_visible
    if mean_correction:
        k_bar = torch.stack([kd[:, J * block_size : (J + 1) * block_size].mean(dim=1) for J in range(N)], dim=1)
        v_bar = torch.stack([vd[:, J * block_size : (J + 1) * block_size].mean(dim=1) for J in range(N)], dim=1)
        below = torch.arange(N).view(1, N) < position // block_size  # (Lq, N): J < I of the row
        pruned = ~row_blocks & below
        logits = torch.cat([logits, scale * qd @ k_bar.transpose(-1, -2) + math.log(block_size)], dim=-1)
        values = torch.cat([vd, v_bar], dim=1)
        visible = torch.cat([token_visible, pruned], dim=-1)
    logits = logits.masked_fill(~visible, float("-inf"))
    p = torch.softmax(logits, dim=-1).nan_to_num(0.0)  # a row with nothing visible gives 0
    out = (p @ values).transpose(0, 1)
    return (out, torch.logsumexp(logits, dim=-1)) if return_lse else out


# --------------------------------------------------------------------------------------------------------------
# Comparison rules
# --------------------------------------------------------------------------------------------------------------
def max_abs_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    """max |a - b| in float64; NaN if either has a NaN."""
    d = (a.double() - b.double()).abs()
    return float("nan") if d.isnan().any() else float(d.max()) if d.numel() else 0.0


def flash_rule(out, q, k, v, block_mask, block_size: int, scale: float | None = None) -> tuple[bool, float, float]:
    """(ok, max |out - ref64|, max |pt - ref64|) for FlashAttention's rule on the block set `block_mask`."""
    ref = naive_attention(q, k, v, block_mask, block_size, scale, dtype=torch.float64)
    return _judge(out, naive_attention(q, k, v, block_mask, block_size, scale, dtype=q.dtype), ref)


def corrected_flash_rule(out, q, k, v, block_mask, block_size: int,
                         scale: float | None = None) -> tuple[bool, float, float]:
    """`flash_rule` for the mean-corrected attention: (ok, max |out - ref64|, max |pt - ref64|), ref64 and pt the
    corrected formula in float64 and in q's dtype, on the block set `block_mask`."""
    ref = naive_mean_corrected_attention_fp64(q, k, v, block_mask, block_size, scale)
    return _judge(out, naive_mean_corrected_attention(q, k, v, block_mask, block_size, scale, dtype=q.dtype), ref)


def _judge(out, pt, ref) -> tuple[bool, float, float]:
    """FlashAttention's rule: `out` is within FLASH_RULE_FACTOR x the error of the same formula in the input dtype
    (`pt`) of the float64 reference, plus FLASH_RULE_SLACK. (ok, err, pt_err); ok is False for NaN."""
    err, pt_err = max_abs_diff(out, ref), max_abs_diff(pt, ref)
    return err <= FLASH_RULE_FACTOR * pt_err + FLASH_RULE_SLACK, err, pt_err


def block_set_differences(mask, ref_mask, ref_scores, alpha) -> tuple[int, int]:
    """(blocks that differ, of which not at a threshold tie)."""
    differ = mask != ref_mask
    row_max = ref_scores.amax(-1, keepdim=True)
    tie = (ref_scores - alpha * row_max).abs() <= TIE_TOLERANCE * row_max
    return int(differ.sum()), int((differ & ~tie).sum())


def block_sets_agree(mask, ref_mask, ref_scores, alpha) -> bool:
    n_differ, n_off_tie = block_set_differences(mask, ref_mask, ref_scores, alpha)
    return n_off_tie == 0 and n_differ <= MAX_TIE_FRACTION * mask.numel() + 1
