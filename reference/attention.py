"""Stage 5 of FlashPrefill: causal attention restricted to the kept key blocks, and the dense ground truth.

Both sparse functions run the same FlashAttention-style online softmax over key blocks; they differ only in
which blocks they visit:

* `block_sparse_attention` (physical skip) walks the compacted list indices[b, h, I, :counts[b, h, I]]: it
  visits exactly the kept blocks.
* `block_sparse_attention_logical` (logical skip) walks every causal block J = 0..I and skips the update where
  the mask bit is 0: it visits all I + 1 causal blocks of the row.

Both can return the number of key blocks each (batch, head, query block) visited, which is the paper's
"logical skip -> physical jump" argument in numbers.

Mean correction (FlashPrefill V2, arXiv 2608.19758, Eq. 6; opt-in, `mean_correction=True`): a pruned key block is
not simply dropped but stands in as one extra key, its mean k_bar_J with its mean value v_bar_J, weighted by its
size. For query row i and every pruned causal block J < I (strictly below the diagonal, so all Bs of its keys are
visible to every row of I):

    numerator   += Bs exp(s_bar_iJ) v_bar_J,    denominator += Bs exp(s_bar_iJ),    s_bar_iJ = scale q_i . k_bar_J

which is one more logit, s_bar_iJ + log Bs, in the same online softmax. It is exact when every key of a pruned
block is its mean; otherwise it replaces the block's softmax mass by the mass of its mean (by Jensen, never more).
A pruned diagonal block (only possible with hand-made lists) gets no correction: its mean would include keys the
row cannot see. The corrections are not block visits: `return_visits` counts the same as without them. k_bar is
stage 1's `mean_pool_keys(k)`: `flash_prefill` passes the one it pooled for the scores as `key_means`.

NaN and inf behave as in dense attention (docs/DESIGN.md section 2): a row whose visible logits hold a NaN or a +inf
is NaN, as is a row that attends to a key whose value holds a NaN or an inf; nothing is turned into 0 except the
output of a row that sees no key at all. p @ v multiplies a whole tile of query rows with a whole block of values,
and p = 0 for the keys a row cannot see, but 0 * NaN = NaN: a non-finite value v_j also makes NaN the rows of j's
query block that precede j (the tile of the block-sparse paths of both packages; the Triton kernels use tiles of
min(Bs, 128) rows) and, in `dense_attention`, the rows of j's 128-row tile (as triton_impl.dense_attention).
A NaN or inf in a key is masked out of the rows that cannot see it and reaches only rows i >= j.

Log-sum-exp (`return_lse=True`, every attention entry point): lse_i = log sum_{j in V_i} exp(scale q_i . k_j), the
natural log of row i's softmax denominator with the scale applied (with mean correction, each pruned block's
Bs exp(s_bar_iJ) is part of it), (B, Hq, L), -inf for a row that sees no key. Two attentions over disjoint key sets
of the same rows combine exactly with `merge_attention_states`, which is what split-KV and chunked prefill need.

Every function here is differentiable (autograd); the selection stages feeding them are discrete.
"""

from __future__ import annotations

import math

import torch

from .pooling import compute_dtype, mean_pool_keys, split_blocks
from .selection import listed_blocks
from .validation import (ATTENTION_DTYPES, check_block_layout, check_block_lists, check_block_size, check_flag,
                         check_qkv, check_same_device, check_tensor, num_blocks, resolve_scale)

_CHUNK_ELEMENTS = 1 << 24  # attention scores held at once by `dense_attention`: about 64 MB of float32
_TILE_ROWS = 128  # query rows of one tile of `dense_attention`, as in triton_impl.dense_attention


def dense_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                    softmax_scale: float | None = None, *, return_lse: bool = False):
    """Exact causal GQA attention, softmax(scale * q k^T + causal mask) v, the ground truth.

    Args:
        q: (B, L, Hq, D); k, v: (B, L, Hkv, D), Hq divisible by Hkv; query head h reads kv head h // (Hq / Hkv).
        softmax_scale: None means 1 / sqrt(D).
        return_lse: also return lse (B, Hq, L), log sum_{j <= i} exp(scale q_i . k_j) (module docstring).
    Returns:
        out (B, L, Hq, D) in q.dtype [, lse float32 (float64 for float64 inputs)]. Computed a tile of 128 query
        rows at a time (fewer if they would not fit in about 64 MB), against the keys up to the end of the tile: no
        L x L matrix. A non-finite value therefore reaches the same rows as in triton_impl.dense_attention (see the
        module docstring).
    """
    B, L, Hq, Hkv, D = check_qkv(q, k, v)
    scale = resolve_scale(softmax_scale, D)
    check_flag("return_lse", return_lse)
    dtype = compute_dtype(q)
    group = Hq // Hkv
    k_per_q_head = k.to(dtype).repeat_interleave(group, dim=2)  # (B, L, Hq, D)
    v_per_q_head = v.to(dtype).repeat_interleave(group, dim=2)
    out = torch.empty_like(q)
    lse = torch.empty(B, Hq, L, dtype=dtype, device=q.device)
    rows = min(_TILE_ROWS, max(1, _CHUNK_ELEMENTS // (B * Hq * L)))
    rows = 1 << (rows.bit_length() - 1)  # a power of two: a chunk never straddles two tiles
    for i0 in range(0, L, rows):
        i1 = min(L, i0 + rows)
        keys = min(L, (i0 // _TILE_ROWS + 1) * _TILE_ROWS)  # up to the end of the tile
        s = scale * torch.einsum("bihd,bjhd->bhij", q[:, i0:i1].to(dtype), k_per_q_head[:, :keys])
        query_pos = torch.arange(i0, i1, device=q.device).view(-1, 1)
        key_pos = torch.arange(keys, device=q.device).view(1, -1)
        s = s.masked_fill(key_pos > query_pos, float("-inf"))
        p = torch.softmax(s, dim=-1)
        out[:, i0:i1] = torch.einsum("bhij,bjhd->bihd", p, v_per_q_head[:, :keys]).to(q.dtype)
        lse[:, :, i0:i1] = torch.logsumexp(s, dim=-1)  # the masked keys' -inf add nothing
    return attention_outputs(out, lse if return_lse else None)


class _OnlineSoftmax:
    """Running row max m, row sum l and unnormalised output acc of one query block, for every (b, h).

    m, l: (B, Hq, Bs); acc: (B, Hq, Bs, D). One `update` folds in one key block (FlashAttention-2's inner step).
    NaN and +inf logits propagate through m and l exactly as through a softmax.
    """

    def __init__(self, q_block: torch.Tensor):
        self.q = q_block
        self.m = torch.full(q_block.shape[:-1], float("-inf"), dtype=q_block.dtype, device=q_block.device)
        self.l = torch.zeros_like(self.m)
        self.acc = torch.zeros_like(q_block)
        self.saw_key = torch.zeros_like(self.m, dtype=torch.bool)

    def update(self, k_block: torch.Tensor, v_block: torch.Tensor, visible: torch.Tensor, scale: float,
               bias: float = 0.0) -> None:
        """Fold in one key block; visible (B, Hq, Bs, C) masks causality, padding and skipped blocks (C keys).

        Rows that see none of its keys (the (b, h) that skip this block) keep their state untouched: a block a row
        skips must not reach it, not even as 0 * v. bias is added to every logit (log Bs for the block means of the
        mean correction)."""
        s = scale * (self.q @ k_block.transpose(-1, -2)) + bias
        s = s.masked_fill(~visible, float("-inf"))
        m_new = torch.maximum(self.m, s.amax(dim=-1))  # both propagate NaN
        # Rows with no finite logit yet are shifted by 0 (exp(-inf - 0) = 0, where -inf - (-inf) would be NaN).
        shift = torch.where(m_new == float("-inf"), 0.0, m_new)
        p = torch.exp(s - shift.unsqueeze(-1))
        correction = torch.exp(self.m - shift)
        sees = visible.any(dim=-1)  # (B, Hq, Bs)
        self.l = torch.where(sees, self.l * correction + p.sum(dim=-1), self.l)
        self.acc = torch.where(sees.unsqueeze(-1), self.acc * correction.unsqueeze(-1) + p @ v_block, self.acc)
        self.m = torch.where(sees, m_new, self.m)
        self.saw_key |= sees

    def result(self) -> torch.Tensor:
        """acc / l; rows that saw no key at all give 0 (acc = 0 there), every other row divides, NaN included."""
        l = torch.where(self.saw_key, self.l, 1.0)
        return self.acc / l.unsqueeze(-1)

    def lse(self) -> torch.Tensor:
        """(B, Hq, Bs): m + log l, the log of the softmax denominator (l is the sum of exp(s - m)); -inf for rows
        that saw no key. (log of 1 rather than of their l = 0 there: no inf in the branch autograd discards.)"""
        return torch.where(self.saw_key, self.m + torch.log(torch.where(self.saw_key, self.l, 1.0)), float("-inf"))


class _BlockedQKV:
    """q, k, v split into blocks, plus the helpers both sparse walks share."""

    def __init__(self, q, k, v, block_size: int):
        B, L, Hq, D = q.shape
        self.L, self.block_size = L, block_size
        self.q = split_blocks(q, block_size)  # (B, Hq, M, Bs, D)
        self.k = split_blocks(k, block_size)  # (B, Hkv, N, Bs, D)
        self.v = split_blocks(v, block_size)
        group = Hq // k.shape[2]
        self.batch_idx = torch.arange(B, device=q.device).view(B, 1)
        self.kv_head_idx = (torch.arange(Hq, device=q.device) // group).view(1, Hq)
        self.offsets = torch.arange(block_size, device=q.device)

    def key_block(self, J: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """K and V of key block J[b, h] for every (b, h): two (B, Hq, Bs, D) tensors."""
        return self.k[self.batch_idx, self.kv_head_idx, J], self.v[self.batch_idx, self.kv_head_idx, J]

    def visible(self, I: int, J: torch.Tensor, active: torch.Tensor) -> torch.Tensor:
        """(B, Hq, Bs, Bs): key j of block J[b, h] is visible to query i of block I (causal, not padding)."""
        query_pos = (I * self.block_size + self.offsets).view(1, 1, -1, 1)
        key_pos = (J.unsqueeze(-1) * self.block_size + self.offsets).unsqueeze(-2)  # (B, Hq, 1, Bs)
        return active[..., None, None] & (key_pos <= query_pos) & (key_pos < self.L)

    def fold_pruned_means(self, state: _OnlineSoftmax, I: int, kept: torch.Tensor, scale: float) -> None:
        """Mean correction for query block I: every causal J < I that `kept` (B, Hq, N) does not keep joins the
        softmax as one key k_bar_J with value v_bar_J and logit scale q . k_bar_J + log Bs."""
        if I == 0:
            return
        pruned = ~kept[:, :, :I]  # (B, Hq, I): only blocks strictly below the diagonal
        visible = pruned.unsqueeze(-2).expand(*pruned.shape[:2], self.block_size, I)  # every row of block I
        state.update(self.k_means[:, :, :I], self.v_means[:, :, :I], visible, scale, bias=math.log(self.block_size))

    def prepare_means(self, k: torch.Tensor, v: torch.Tensor, key_means: torch.Tensor | None = None) -> None:
        """k_bar, v_bar (B, Hq, N, D) in the accumulation dtype: block means per query head (stage 1's pooling;
        k_bar is key_means when given, stage 1's output, rather than pooled again)."""
        k_bar = mean_pool_keys(k, self.block_size) if key_means is None else key_means
        means = [x.to(self.q.dtype) for x in (k_bar, mean_pool_keys(v, self.block_size))]  # (B, N, Hkv, D)
        self.k_means, self.v_means = (m.permute(0, 2, 1, 3)[self.batch_idx, self.kv_head_idx] for m in means)

    def output(self, blocks: list[torch.Tensor], dtype: torch.dtype) -> torch.Tensor:
        """M results (B, Hq, Bs, D) -> out (B, L, Hq, D)."""
        out = torch.stack(blocks, dim=2).flatten(2, 3)[:, :, : self.L]  # (B, Hq, L, D)
        return out.transpose(1, 2).to(dtype).contiguous()

    def lse(self, blocks: list[torch.Tensor]) -> torch.Tensor:
        """M row lse (B, Hq, Bs) -> lse (B, Hq, L), in the accumulation dtype (the padding rows dropped)."""
        return torch.cat(blocks, dim=-1)[..., : self.L].contiguous()


def check_mean_correction(k, block_size: int, mean_correction, key_means=None) -> None:
    """mean_correction must be a bool; key_means None or, with mean_correction=True only, k's block means
    (B, N, Hkv, D) as `mean_pool_keys(k, block_size)` returns them."""
    check_flag("mean_correction", mean_correction)
    if key_means is None:
        return
    if not mean_correction:
        raise ValueError("key_means is read only with mean_correction=True")
    check_tensor("key_means", key_means, ndim=4, dtypes=ATTENTION_DTYPES)
    check_same_device(k=k, key_means=key_means)
    B, L, Hkv, D = k.shape
    expected = (B, num_blocks(L, block_size), Hkv, D)
    if tuple(key_means.shape) != expected:
        raise ValueError(f"key_means must have shape (B, N, Hkv, D) = {expected} (mean_pool_keys(k, {block_size})), "
                         f"got {tuple(key_means.shape)}")


def _check_sparse_args(q, k, v, block_size, softmax_scale):
    check_block_size(block_size)
    D = check_qkv(q, k, v)[-1]
    return resolve_scale(softmax_scale, D)


def block_sparse_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    counts: torch.Tensor,
    indices: torch.Tensor,
    block_size: int = 128,
    softmax_scale: float | None = None,
    *,
    return_visits: bool = False,
    validate: bool = True,
    mean_correction: bool = False,
    key_means: torch.Tensor | None = None,
    return_lse: bool = False,
):
    """Causal attention over the kept key blocks only, walking the compacted lists (physical skip).

    Args:
        q: (B, L, Hq, D); k, v: (B, L, Hkv, D).
        counts: (B, Hq, M) int32; indices: (B, Hq, M, N) int32, from `compact_blocks`.
        block_size: Bs; softmax_scale: None means 1 / sqrt(D).
        return_visits: also return visits (B, Hq, M) int32, the key blocks each row visited (== counts).
        validate: check the lists (counts in range, ids ascending and causal) and raise ValueError on a malformed
            one. On by default here (the oracle; the check is small next to this loop); triton_impl checks only
            when asked, because its check costs a host synchronisation.
        mean_correction: add every pruned causal block J < I as its mean key and value (module docstring).
        key_means: with mean_correction, k_bar = mean_pool_keys(k, block_size) (B, N, Hkv, D) when the caller has
            it already (flash_prefill's stage 1); None pools k here.
        return_lse: also return lse (B, Hq, L), the log of each row's softmax denominator (module docstring).
    Returns:
        out (B, L, Hq, D) in q.dtype [, lse float32 (float64 for float64 inputs)] [, visits]. A row whose list is
        empty gives 0 and lse -inf (without mean correction).
    """
    scale = _check_sparse_args(q, k, v, block_size, softmax_scale)
    check_block_layout(q, block_size=block_size, counts=counts, indices=indices)
    check_mean_correction(k, block_size, mean_correction, key_means)
    check_flag("return_lse", return_lse)
    if validate:
        check_block_lists(counts, indices)
    blocks = _BlockedQKV(q, k, v, block_size)
    if mean_correction:
        blocks.prepare_means(k, v, key_means)
        kept = listed_blocks(counts, indices)  # (B, Hq, M, M)
    M = num_blocks(q.shape[1], block_size)
    visits = torch.zeros_like(counts)
    results, lses = [], []
    for I in range(M):
        state = _OnlineSoftmax(blocks.q[:, :, I])
        row_counts = counts[:, :, I]
        for t in range(int(row_counts.max())):
            # List position t holds the t-th kept key block of row I, for the (b, h) whose list is that long.
            active = t < row_counts
            J = torch.where(active, indices[:, :, I, t], 0).long()
            k_J, v_J = blocks.key_block(J)
            state.update(k_J, v_J, blocks.visible(I, J, active), scale)
            visits[:, :, I] += active.int()
        if mean_correction:
            blocks.fold_pruned_means(state, I, kept[:, :, I], scale)
        results.append(state.result())
        lses.append(state.lse())
    return attention_outputs(blocks.output(results, q.dtype), blocks.lse(lses) if return_lse else None,
                    visits if return_visits else None)


def block_sparse_attention_logical(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    mask: torch.Tensor,
    block_size: int = 128,
    softmax_scale: float | None = None,
    *,
    return_visits: bool = False,
    mean_correction: bool = False,
    key_means: torch.Tensor | None = None,
    return_lse: bool = False,
):
    """Same output as `block_sparse_attention`, but visiting every causal block and skipping by the mask bit.

    Args:
        q: (B, L, Hq, D); k, v: (B, L, Hkv, D); mask: (B, Hq, M, N) bool from `select_blocks`.
        block_size: Bs; softmax_scale: None means 1 / sqrt(D).
        return_visits: also return visits (B, Hq, M) int32: I + 1 for every row I (all causal blocks).
        mean_correction: add every pruned causal block J < I as its mean key and value (module docstring).
        key_means, return_lse: as in `block_sparse_attention`.
    Returns:
        out (B, L, Hq, D) in q.dtype [, lse (B, Hq, L)] [, visits].
    """
    scale = _check_sparse_args(q, k, v, block_size, softmax_scale)
    check_block_layout(q, block_size=block_size, mask=mask)
    check_mean_correction(k, block_size, mean_correction, key_means)
    check_flag("return_lse", return_lse)
    blocks = _BlockedQKV(q, k, v, block_size)
    if mean_correction:
        blocks.prepare_means(k, v, key_means)
    B, _, Hq, _ = q.shape
    M = num_blocks(q.shape[1], block_size)
    visits = torch.zeros(B, Hq, M, dtype=torch.int32, device=q.device)
    results, lses = [], []
    for I in range(M):
        state = _OnlineSoftmax(blocks.q[:, :, I])
        for J in range(I + 1):
            visits[:, :, I] += 1
            keep = mask[:, :, I, J]  # the mask bit decides, per (b, h), whether this block is skipped
            if not keep.any():
                continue
            J_all = torch.full_like(keep, J, dtype=torch.long)
            k_J, v_J = blocks.key_block(J_all)
            state.update(k_J, v_J, blocks.visible(I, J_all, keep), scale)
        if mean_correction:
            blocks.fold_pruned_means(state, I, mask[:, :, I], scale)
        results.append(state.result())
        lses.append(state.lse())
    return attention_outputs(blocks.output(results, q.dtype), blocks.lse(lses) if return_lse else None,
                    visits if return_visits else None)


def attention_outputs(out: torch.Tensor, *extras):
    """The return convention of every attention entry point (both packages): out, then each extra in order (lse,
    then visits or stats), each only when asked (None: not asked); out alone is returned bare."""
    extras = tuple(x for x in extras if x is not None)
    return (out, *extras) if extras else out


def merge_attention_states(out_a: torch.Tensor, lse_a: torch.Tensor, out_b: torch.Tensor,
                           lse_b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Merge two attentions of the same query rows over disjoint key sets into the attention over their union.

    With lse the log of each part's softmax denominator, the union's denominator is exp(lse_a) + exp(lse_b), and
    each part's output is re-weighted by its share of it:

        lse = logaddexp(lse_a, lse_b)        out = exp(lse_a - lse) out_a + exp(lse_b - lse) out_b

    Exact (up to rounding): the parts may come from any entry point's return_lse (a split of the kept block list,
    a chunk of keys); merging is associative, so any number of parts merges pairwise.

    Args:
        out_a, out_b: (..., L, Hq, D), e.g. (B, L, Hq, D), or (total, Hq, D) in a varlen layout.
        lse_a, lse_b: (..., Hq, L): out's shape without D and with its last two dims swapped, as the entry points
            return it ((B, Hq, L); (Hq, total) for varlen).
    Returns:
        (out, lse): out in out_a's dtype, lse in float32 (float64 when an input is float64); both computed in that
        accumulation dtype. A row with lse -inf in one part (it saw no key there) takes the other part as it is;
        with -inf in both it gives out 0 and lse -inf, no NaN. NaN and +inf propagate (a +inf lse gives NaN).
    """
    ndim = out_a.dim() if isinstance(out_a, torch.Tensor) and out_a.dim() >= 3 else 3  # (..., L, Hq, D)
    for name, x, n in (("out_a", out_a, ndim), ("out_b", out_b, ndim), ("lse_a", lse_a, ndim - 1),
                       ("lse_b", lse_b, ndim - 1)):
        check_tensor(name, x, ndim=n, dtypes=ATTENTION_DTYPES)
    check_same_device(out_a=out_a, lse_a=lse_a, out_b=out_b, lse_b=lse_b)
    rows = (*out_a.shape[:-3], out_a.shape[-2], out_a.shape[-3])  # (..., Hq, L)
    if out_b.shape != out_a.shape or tuple(lse_a.shape) != rows or tuple(lse_b.shape) != rows:
        raise ValueError(f"out_a, out_b must share one shape (..., L, Hq, D) and lse_a, lse_b be (..., Hq, L) = "
                         f"{rows}; got out {tuple(out_a.shape)}, {tuple(out_b.shape)} and lse {tuple(lse_a.shape)}, "
                         f"{tuple(lse_b.shape)}")
    dtype = torch.float64 if torch.float64 in (out_a.dtype, out_b.dtype, lse_a.dtype, lse_b.dtype) else torch.float32
    lse_a, lse_b = lse_a.to(dtype), lse_b.to(dtype)
    lse = torch.logaddexp(lse_a, lse_b)
    # Where both parts are empty, lse is -inf and lse_a - lse would be -inf - (-inf) = NaN: shift by 0 there, so that
    # both weights are exp(-inf) = 0 and out is 0.
    shift = torch.where(lse == float("-inf"), 0.0, lse)
    weight_a = torch.exp(lse_a - shift).transpose(-1, -2).unsqueeze(-1)  # (..., L, Hq, 1)
    weight_b = torch.exp(lse_b - shift).transpose(-1, -2).unsqueeze(-1)
    out = weight_a * out_a.to(dtype) + weight_b * out_b.to(dtype)
    return out.to(out_a.dtype), lse
