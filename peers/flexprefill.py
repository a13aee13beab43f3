"""FlexPrefill's block selection (Lai et al., ICLR 2025, arXiv 2502.20766), written by us from the paper.

Per head, a vertical-slash pattern estimated from the last query block, or a query-aware pattern from block-pooled
Q and K, chosen by a Jensen-Shannon test against tau; both cover a fraction gamma of the estimated attention mass,
with a minimum budget. Returns FlashPrefill's list format (see peers/__init__.py). The last-block estimate runs a
few kv-head groups at a time (`_FLEX_CHUNK_ELEMENTS`) to bound memory at long L; the chunking changes no value.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from reference.pooling import compute_dtype, mean_pool_keys
from reference.selection import compact_blocks
from reference.validation import check_block_size, check_count, check_qkv, num_blocks, resolve_scale

from ._shared import causal_blocks, check_real, gqa_scores

# Paper defaults (flexprefill_select's docstring says where each comes from).
FLEXPREFILL_DEFAULTS = dict(gamma=0.9, tau=0.1, min_budget=1024, block_size=128)


def check_flexprefill_params(*, gamma=0.9, tau=0.1, min_budget=1024, max_budget=None,
                             block_size=128) -> tuple[float, float]:
    """Validate FlexPrefill's parameters (without tensors); return (gamma, tau) as floats."""
    gamma = check_real("gamma", gamma, low=0.0, high=1.0, low_open=True)
    tau = check_real("tau", tau, low=0.0, high=1.0)
    check_count("min_budget", min_budget, minimum=0)
    if max_budget is not None:
        check_count("max_budget", max_budget, minimum=1)
    check_block_size(block_size)
    return gamma, tau


def _dense_lists(B: int, Hq: int, M: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    return compact_blocks(causal_blocks(M, device).expand(B, Hq, M, M))


def _keep_top(scores: torch.Tensor, n: torch.Tensor) -> torch.Tensor:
    """Bool mask of the n[...] largest entries of each row of scores (..., N); ties broken by the sort order, the
    same for every n, so a larger n always keeps a superset."""
    order = scores.argsort(dim=-1, descending=True, stable=True)
    rank_kept = torch.arange(scores.shape[-1], device=scores.device) < n.unsqueeze(-1)
    return torch.zeros_like(rank_kept).scatter_(-1, order, rank_kept)


def _sqrt_js_divergence(p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """sqrt(JSD(p || q)) over the last dim, natural log, in [0, sqrt(ln 2)]. 0 log 0 = 0."""
    m = 0.5 * (p + q)
    kl_pm = torch.where(p > 0, p * (p / m.clamp_min(1e-30)).log(), torch.zeros_like(p)).sum(-1)
    kl_qm = torch.where(q > 0, q * (q / m.clamp_min(1e-30)).log(), torch.zeros_like(q)).sum(-1)
    return (0.5 * kl_pm + 0.5 * kl_qm).clamp_min(0).sqrt()


_FLEX_CHUNK_ELEMENTS = 1 << 28  # last-block attention probabilities held at once: 1 GiB of float32


def _last_block_masses(q_hat: torch.Tensor, k: torch.Tensor, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """FlexPrefill step 1: Ahat = softmax(scale q_hat K^T) with the causal mask, for the last Bs queries q_hat
    (B, Bs, Hq, D) (positions p_r = L - Bs + r), reduced to the vertical mass a_v[j] = mean_r Ahat[r, j] and the
    slash mass a_s[o] = mean_r Ahat[r, p_r - o], both (B, Hq, L) in q_hat's dtype.

    Ahat is (B, Hq, Bs, L): 4 GiB of float32 per copy at L = 256K with Hq = 32, so it is made for a few kv-head
    groups at a time (heads are independent: the chunking changes no value)."""
    B, Bs, Hq, _ = q_hat.shape
    L, Hkv = k.shape[1], k.shape[2]
    g, device = Hq // Hkv, q_hat.device
    pos = torch.arange(L - Bs, L, device=device).view(Bs, 1)  # p_r
    key = torch.arange(L, device=device).view(1, L)
    idx = pos - key  # (Bs, L): key index j = p_r - o of offset o (the column) in row r
    valid = idx >= 0
    a_v = torch.empty(B, Hq, L, dtype=q_hat.dtype, device=device)
    a_s = torch.empty_like(a_v)
    kv_per_chunk = max(1, _FLEX_CHUNK_ELEMENTS // (B * g * Bs * L))
    for h0 in range(0, Hkv, kv_per_chunk):
        h1 = min(Hkv, h0 + kv_per_chunk)
        heads = slice(h0 * g, h1 * g)  # the query heads that read kv heads h0 .. h1 - 1
        s = gqa_scores(q_hat[:, :, heads], k[:, :, h0:h1].to(q_hat.dtype), scale)
        a_hat = torch.softmax(s.masked_fill_(key > pos, float("-inf")), dim=-1)
        del s
        a_v[:, heads] = a_hat.mean(dim=-2)
        a_s[:, heads] = (torch.gather(a_hat, -1, idx.clamp_min(0).expand_as(a_hat)) * valid).mean(dim=-2)
    return a_v, a_s


def flexprefill_select(
    q: torch.Tensor,
    k: torch.Tensor,
    *,
    gamma: float = 0.9,
    tau: float = 0.1,
    min_budget: int = 1024,
    max_budget: int | None = None,
    block_size: int = 128,
    softmax_scale: float | None = None,
    return_pattern: bool = False,
):
    """FlexPrefill's block selection (Lai et al., ICLR 2025, Algorithms 1-4), per query head.

    Notation: Bs block size; M = N = ceil(L / Bs); Qhat = the last Bs queries (the last query block; positions
    p_r = L - Bs + r); scale = softmax_scale or 1/sqrt(D); head h reads kv head h // (Hq / Hkv).

    0. Short inputs are dense: if L <= max(2 Bs, ceil(min_budget / Bs) Bs) every causal block is kept (as the
       official implementation does).
    1. Estimate from the last query block: Ahat = softmax(scale Qhat K^T) with the causal mask, (B, Hq, Bs, L).
       Vertical mass a_v[j] = mean_r Ahat[r, j]; slash mass a_s[o] = mean_r Ahat[r, p_r - o] (offset o = i - j).
    2. Sparse pattern determination (Alg. 2): abar[J] = sum_{j in J} a_v[j] (the pooled true distribution of the
       last block) and ahat[J] = softmax_J(scale * mean(Qhat) . kbar_J) (the estimate from pooled Q and K, kbar the
       mean of key block J). d = sqrt(JSD(abar || ahat)). d < tau: the pooled estimate is faithful and the head is
       **query-aware**; otherwise it is **vertical-slash**.
    3. Vertical-slash index search (Alg. 3): K_v = the fewest tokens whose a_v, sorted descending, sum to >= gamma;
       n_v = clamp(floor(K_v / Bs) + 1, ceil(min_budget / Bs), ceil(max_budget / Bs)) blocks; keep the n_v key
       blocks with the largest sum_{j in J} a_v[j] as vertical columns (J, all I >= J). The same with a_s gives n_s
       slash offsets s (in blocks) kept as diagonals (I, I - s). Forced: vertical block 0 (attention sink) and
       slash offset 0 (the diagonal). Query-aware heads keep only the minimum budget of vertical and slash blocks.
    4. Query-aware index search (Alg. 4, query-aware heads only): qbar_I, kbar_J = block means of q and k;
       Abar = softmax_J(scale qbar_I . kbar_J) over J <= I, (M, N) per head; flatten, sort descending and keep the
       fewest blocks whose mass reaches gamma * M (each row sums to 1, so gamma of the total); union with step 3.
    5. Compact into ascending lists (`compact_blocks`).

    Paper / official defaults: block_size 128, gamma 0.9 (0.95 for some models in the RULER scripts), tau 0.1,
    min_budget 1024 tokens (the RULER / InfiniteBench scripts; the README example uses 512), max_budget None.
    Simplifications and choices (ours): the budget count n = floor(K / Bs) + 1 converts a token count into blocks
    as the official code does, and the blocks are then ranked by their pooled mass (not by which blocks contain the
    chosen tokens); the query-aware set includes the block that crosses gamma (the fewest blocks that *reach*
    gamma); a slash offset block s marks the block diagonal I - J = s (token slashes near a block edge straddle two
    block diagonals; the pooled mass decides which is kept). Batch > 1 is supported (the official code is B = 1).

    Args:
        q: (B, L, Hq, D); k: (B, L, Hkv, D); Hq divisible by Hkv.
        gamma: coverage in (0, 1]; tau: JS threshold in [0, 1]; min_budget, max_budget: tokens (max None = no cap).
        block_size: Bs, a power of two >= 16. softmax_scale: None means 1/sqrt(D).
        return_pattern: also return query_aware (B, Hq) bool (all False for short dense inputs).
    Returns:
        counts (B, Hq, M) int32, indices (B, Hq, M, N) int32 [, query_aware].
    """
    B, L, Hq, Hkv, D = check_qkv(q, k, k)
    gamma, tau = check_flexprefill_params(gamma=gamma, tau=tau, min_budget=min_budget, max_budget=max_budget,
                                          block_size=block_size)
    scale = resolve_scale(softmax_scale, D)
    Bs, device = block_size, q.device
    M = num_blocks(L, Bs)
    min_blocks = -(-min_budget // Bs)
    max_blocks = M if max_budget is None else min(M, -(-max_budget // Bs))
    min_blocks = min(min_blocks, max_blocks)

    # 0. Short inputs: dense.
    if L <= max(2 * Bs, min_blocks * Bs):
        counts, indices = _dense_lists(B, Hq, M, device)
        pattern = torch.zeros(B, Hq, dtype=torch.bool, device=device)
        return (counts, indices, pattern) if return_pattern else (counts, indices)

    dtype = compute_dtype(q)

    # 1. Vertical and slash masses from the last query block's attention.
    q_hat = q[:, L - Bs:].to(dtype)
    a_v, a_s = _last_block_masses(q_hat, k, scale)

    def pool(x):  # (B, Hq, L) -> (B, Hq, N): sum over each block of Bs tokens / offsets
        return F.pad(x, (0, M * Bs - L)).view(B, Hq, M, Bs).sum(-1)

    v_blocks, s_blocks = pool(a_v), pool(a_s)

    # 2. Pattern determination: JS divergence between the pooled true and pooled estimated distributions.
    kbar = mean_pool_keys(k, Bs).to(dtype)  # (B, N, Hkv, D)
    est = torch.softmax(gqa_scores(q_hat.mean(dim=1, keepdim=True), kbar, scale).squeeze(2), dim=-1)  # (B, Hq, N)
    query_aware = _sqrt_js_divergence(v_blocks, est) < tau  # (B, Hq)

    # 3. Vertical-slash budgets from the token-level coverage gamma, clamped to [min, max] blocks.
    def budget(mass):  # fewest tokens / offsets whose sorted mass reaches gamma -> blocks
        csum = mass.sort(dim=-1, descending=True).values.cumsum(dim=-1)
        tokens = ((csum < gamma * csum[..., -1:]).sum(dim=-1) + 1).clamp(max=L)
        return (tokens // Bs + 1).clamp(min=min_blocks, max=max_blocks)

    n_v = torch.where(query_aware, min_blocks, budget(a_v))
    n_s = torch.where(query_aware, min_blocks, budget(a_s))
    n_v, n_s = n_v.clamp_min(1), n_s.clamp_min(1)  # the forced sink / diagonal always count
    inf = torch.tensor(float("inf"), dtype=dtype, device=device)
    v_blocks = torch.cat([inf.expand(B, Hq, 1), v_blocks[..., 1:]], dim=-1)  # forced sink column
    s_blocks = torch.cat([inf.expand(B, Hq, 1), s_blocks[..., 1:]], dim=-1)  # forced diagonal
    v_keep = _keep_top(v_blocks, n_v)  # (B, Hq, N) kept columns J
    s_keep = _keep_top(s_blocks, n_s)  # (B, Hq, N) kept block offsets s
    causal = causal_blocks(M, device)
    I = torch.arange(M, device=device).view(M, 1)
    J = torch.arange(M, device=device).view(1, M)
    diag_offset = (I - J).clamp_min(0).expand(B, Hq, M, M)
    mask = causal & (v_keep.unsqueeze(-2) | torch.gather(s_keep.unsqueeze(-2).expand(B, Hq, M, M), -1, diag_offset))

    # 4. Query-aware heads: blocks of the pooled attention map covering gamma of its mass.
    if bool(query_aware.any()):
        qbar = mean_pool_keys(q, Bs).to(dtype)  # block means of the queries (same pooling as the keys)
        a_bar = torch.softmax(gqa_scores(qbar, kbar, scale).masked_fill(~causal, float("-inf")), dim=-1)
        flat = a_bar.flatten(-2)  # (B, Hq, M*N), total mass M
        values, order = flat.sort(dim=-1, descending=True, stable=True)
        before = values.cumsum(dim=-1) - values  # mass of the blocks ranked above
        kept_sorted = (before < gamma * M) & (values > 0)
        qa_mask = torch.zeros_like(kept_sorted).scatter_(-1, order, kept_sorted).view(B, Hq, M, M)
        mask = mask | (qa_mask & query_aware[..., None, None])

    counts, indices = compact_blocks(mask)
    return (counts, indices, query_aware) if return_pattern else (counts, indices)
