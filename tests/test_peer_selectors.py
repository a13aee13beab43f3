"""Basic rules of the peer selectors (peers/) on small hand-made inputs.

FlexPrefill (`flexprefill_select`): short inputs dense; the sink column and the diagonal always kept; a larger
coverage gamma keeps a superset; tau = 0 makes every head vertical-slash and tau = 1 every head query-aware; a
planted vertical stripe and a planted slash are found. XAttention (`xattention_select`): the antidiagonal block
scores equal a loop-by-loop restatement; the sink and diagonal are kept; the threshold rule keeps the fewest blocks
whose mass reaches tau; a larger tau keeps a superset; planted stripe and slash found. Both: causal, ascending
lists, counts == list lengths, GQA head mapping h // g, batch rows independent, the lists run in
block_sparse_attention, the memory-bounding chunk loops change nothing, bad inputs raise errors that name the
argument.
"""

from __future__ import annotations

import math

import pytest
import torch

from peers import flexprefill as flexprefill_module
from peers import flexprefill_select, xattention_block_scores, xattention_select
from peers import xattention as xattention_module
from reference import block_sparse_attention, causal_block_density, lists_to_mask
from reference.validation import check_block_lists
from tools.oracle import flash_rule

BS = 32  # small blocks keep the tests fast
# min_budget 2 blocks: the budget n = floor(K / Bs) + 1 counts the forced sink column / diagonal (as in the official
# code), so with no minimum a single-token stripe would get only the forced block.
FLEX = dict(block_size=BS, min_budget=2 * BS)
XATTN = dict(block_size=BS, stride=8)


def rand_qkv(B=1, L=512, Hq=4, Hkv=2, D=32, seed=0, sigma=1.0):
    gen = torch.Generator().manual_seed(seed)
    q = sigma * torch.randn(B, L, Hq, D, generator=gen)
    k = sigma * torch.randn(B, L, Hkv, D, generator=gen)
    v = torch.randn(B, L, Hkv, D, generator=gen)
    return q, k, v


def stripe_qkv(L=512, stripe=300, Hq=4, Hkv=2, D=32, strength=10.0, kv_heads=None):
    """Every query looks for direction 0; only key `stripe` carries it (logit `strength` there)."""
    q, k, v = rand_qkv(L=L, Hq=Hq, Hkv=Hkv, D=D, sigma=0.3)
    q[..., 0] = 1.0
    k[..., 0] = 0.0
    for h in (range(Hkv) if kv_heads is None else kv_heads):
        k[:, stripe, h, 0] = strength * math.sqrt(D)
    return q, k, v


def slash_qkv(L=512, offset=200, Hq=2, Hkv=1, D=32, strength=8.0, freqs=8):
    """q_i . k_j * scale = strength * mean_f cos(w_f (i - offset - j)): a slash at i - j = offset."""
    q, k, v = rand_qkv(L=L, Hq=Hq, Hkv=Hkv, D=D, sigma=0.1)
    w = torch.logspace(math.log10(2 * math.pi / 8), math.log10(2 * math.pi / (4 * L)), freqs)
    pos = torch.arange(L, dtype=torch.float32)
    a = math.sqrt(strength * math.sqrt(D) / freqs)

    def feats(p):
        ang = p[:, None] * w
        return torch.cat([ang.cos(), ang.sin()], dim=-1) * a

    q[0, :, :, : 2 * freqs] = feats(pos - offset)[:, None]
    k[0, :, :, : 2 * freqs] = feats(pos)[:, None]
    return q, k, v


def mask_of(counts, indices):
    check_block_lists(counts, indices)  # causal, ascending, counts within range
    mask = lists_to_mask(counts, indices)
    assert torch.equal(mask.sum(-1, dtype=torch.int32), counts)
    return mask


SELECTORS = {
    "flexprefill": lambda q, k, **kw: flexprefill_select(q, k, **{**FLEX, **kw}),
    "xattention": lambda q, k, **kw: xattention_select(q, k, **{**XATTN, **kw}),
}


# ------------------------------------------------------------------------------------------------ shared rules

@pytest.mark.parametrize("name", SELECTORS)
@pytest.mark.parametrize("L", [300, 512], ids=lambda L: f"L{L}")
def test_lists_are_causal_ascending_and_counted(name, L):
    q, k, _ = rand_qkv(L=L)
    counts, indices = SELECTORS[name](q, k)
    M = -(-L // BS)
    assert counts.shape == (1, 4, M) and indices.shape == (1, 4, M, M)
    assert counts.dtype == indices.dtype == torch.int32
    mask = mask_of(counts, indices)
    I = torch.arange(M)
    assert mask[..., I, I].all(), "diagonal block always kept"
    assert mask[..., :, 0].all(), "sink block always kept"
    assert 0 < float(causal_block_density(counts)) <= 1


@pytest.mark.parametrize("name", SELECTORS)
def test_gqa_head_mapping_and_batch_independence(name):
    q, k, _ = rand_qkv(B=2, L=384, Hq=4, Hkv=2)
    counts, indices = SELECTORS[name](q, k)
    mask = mask_of(counts, indices)
    # Query head h reads kv head h // 2: the same as giving every query head its own copy of that kv head.
    c2, i2 = SELECTORS[name](q, k.repeat_interleave(2, dim=2))
    assert torch.equal(mask, mask_of(c2, i2))
    # Batch rows do not interact.
    c1, i1 = SELECTORS[name](q[1:], k[1:])
    assert torch.equal(mask[1:], mask_of(c1, i1))


@pytest.mark.parametrize("name", SELECTORS)
def test_planted_vertical_stripe_is_found(name):
    stripe = 300
    q, k, _ = stripe_qkv(stripe=stripe)
    mask = mask_of(*SELECTORS[name](q, k))
    J = stripe // BS
    assert mask[..., J:, J].all(), "every row at or below the stripe keeps its key block"


@pytest.mark.parametrize("name", SELECTORS)
def test_planted_slash_is_found(name):
    offset = 200
    q, k, _ = slash_qkv(offset=offset)
    mask = mask_of(*SELECTORS[name](q, k))
    M = mask.shape[-1]
    s = offset // BS  # the slash i - j = offset crosses block diagonals s and s + 1
    for I in range(s + 1, M):
        assert (mask[..., I, I - s] | mask[..., I, I - s - 1]).all(), f"row {I} misses the slash"


@pytest.mark.parametrize("name", SELECTORS)
def test_lists_run_in_block_sparse_attention(name):
    q, k, v = rand_qkv(L=320, Hq=2, Hkv=1, D=16)
    counts, indices = SELECTORS[name](q, k)
    out = block_sparse_attention(q, k, v, counts, indices, BS)
    ok, err, pt_err = flash_rule(out, q, k, v, lists_to_mask(counts, indices), BS)
    assert ok, (err, pt_err)


@pytest.mark.parametrize("name", SELECTORS)
def test_chunked_estimate_equals_one_piece(name, monkeypatch):
    """The smallest chunks (one kv-head group / one query block at a time, as at 256K on a GPU) give the same
    lists as one piece. B = 2, Hq = 8 over Hkv = 4, a partial last block."""
    q, k, _ = rand_qkv(B=2, L=600, Hq=8, Hkv=4)
    q_hat = q[:, -BS:]
    whole = SELECTORS[name](q, k)
    masses = flexprefill_module._last_block_masses(q_hat, k, 0.25)
    scores = xattention_block_scores(q, k, stride=8, block_size=BS)
    monkeypatch.setattr(flexprefill_module, "_FLEX_CHUNK_ELEMENTS", 1)
    monkeypatch.setattr(xattention_module, "_XATTN_CHUNK_ELEMENTS", 1)
    chunked = SELECTORS[name](q, k)
    assert torch.equal(mask_of(*whole), mask_of(*chunked))
    if name == "flexprefill":
        for a, b in zip(masses, flexprefill_module._last_block_masses(q_hat, k, 0.25)):
            torch.testing.assert_close(a, b, rtol=1e-6, atol=0)
    else:
        torch.testing.assert_close(scores, xattention_block_scores(q, k, stride=8, block_size=BS), rtol=1e-6,
                                   atol=1e-7)


# ------------------------------------------------------------------------------------------------ FlexPrefill

def test_flexprefill_short_input_is_dense():
    q, k, _ = rand_qkv(L=512)
    # L <= max(2 Bs, ceil(min_budget / Bs) Bs): dense.
    counts, _ = flexprefill_select(q, k, block_size=BS, min_budget=512)
    M = 512 // BS
    assert torch.equal(counts, torch.arange(1, M + 1, dtype=torch.int32).expand(1, 4, M))
    counts, _ = flexprefill_select(q[:, :64], k[:, :64], block_size=BS, min_budget=0)  # L = 2 Bs
    assert float(causal_block_density(counts)) == 1.0


def test_flexprefill_gamma_superset():
    q, k, _ = stripe_qkv(L=640)
    masks = [mask_of(*flexprefill_select(q, k, gamma=g, **FLEX)) for g in (0.3, 0.6, 0.9, 0.99)]
    for lo, hi in zip(masks, masks[1:]):
        assert not (lo & ~hi).any(), "a larger gamma must keep a superset"
    assert masks[-1].sum() >= masks[0].sum()


def test_flexprefill_tau_chooses_the_pattern():
    q, k, _ = rand_qkv(L=512)
    _, _, vs = flexprefill_select(q, k, tau=0.0, return_pattern=True, **FLEX)
    assert not vs.any(), "tau = 0: sqrt(JSD) < 0 never holds, every head is vertical-slash"
    _, _, qa = flexprefill_select(q, k, tau=1.0, return_pattern=True, **FLEX)
    assert qa.all(), "tau = 1 > sqrt(ln 2): every head is query-aware"


def test_flexprefill_min_budget_keeps_whole_stripes():
    q, k, _ = rand_qkv(L=512)
    M = 512 // BS
    # A vertical-slash head with a budget of 3 blocks keeps at least 3 whole columns and 3 block diagonals.
    mask = mask_of(*flexprefill_select(q, k, tau=0.0, gamma=0.01, min_budget=3 * BS, block_size=BS))
    full_columns = [J for J in range(M) if mask[0, 0, J:, J].all()]
    full_diagonals = [s for s in range(M) if all(mask[0, 0, I, I - s] for I in range(s, M))]
    assert len(full_columns) >= 3 and len(full_diagonals) >= 3
    assert 0 in full_columns and 0 in full_diagonals


def test_flexprefill_full_coverage_query_aware_is_dense():
    q, k, _ = rand_qkv(L=512)
    counts, _ = flexprefill_select(q, k, tau=1.0, gamma=1.0, **FLEX)
    assert float(causal_block_density(counts)) == 1.0


# ------------------------------------------------------------------------------------------------ XAttention

def naive_antidiagonal_scores(q, k, stride, block_size):
    """Loop-by-loop restatement in float64 (B = 1, Hq = Hkv, L a multiple of block_size)."""
    _, L, H, D = q.shape
    S, n, M = stride, L // stride, L // block_size
    q, k = q.double()[0], k.double()[0]
    out = torch.zeros(1, H, M, M, dtype=torch.float64)
    for h in range(H):
        logits = torch.full((n, n), float("-inf"), dtype=torch.float64)
        for r in range(n):
            for c in range(r + 1):
                logits[r, c] = sum(q[r * S + S - 1 - s, h] @ k[c * S + s, h] for s in range(S)) / math.sqrt(D) / S
        p = torch.softmax(logits, dim=-1)
        per = block_size // S
        out[0, h] = p.view(M, per, M, per).sum(dim=(1, 3))
    return out


def test_xattention_block_scores_match_the_antidiagonal_definition():
    q, k, _ = rand_qkv(L=128, Hq=2, Hkv=2, D=8)
    ours = xattention_block_scores(q, k, stride=4, block_size=16)
    ref = naive_antidiagonal_scores(q, k, 4, 16)
    torch.testing.assert_close(ours.double(), ref, rtol=1e-5, atol=1e-6)
    # Every strided row sums to one, so a block row sums to Bs / S.
    torch.testing.assert_close(ours.sum(-1), torch.full_like(ours.sum(-1), 4.0))


def test_xattention_threshold_rule_is_minimal_cover():
    q, k, _ = stripe_qkv(L=512, strength=4.0)
    tau = 0.8
    A = xattention_block_scores(q, k, stride=8, block_size=BS).double()
    mask = mask_of(*xattention_select(q, k, threshold=tau, **XATTN))
    M = A.shape[-1]
    for h in range(A.shape[1]):
        for I in range(M):
            row, kept = A[0, h, I, : I + 1], mask[0, h, I, : I + 1]
            total = row.sum()
            assert row[kept].sum() >= tau * total * (1 - 1e-6), "kept mass must reach tau"
            free = kept.clone()
            free[0] = free[I] = False  # forced blocks
            if free.any():  # dropping the smallest freely chosen block must fall below tau
                smallest = row[free].min()
                assert row[kept].sum() - smallest < tau * total * (1 + 1e-6)
                # and nothing dropped outscores a kept free block
                dropped = ~kept
                if dropped.any():
                    assert row[dropped].max() <= smallest + 1e-12


def test_xattention_threshold_superset():
    q, k, _ = stripe_qkv(L=640, strength=4.0)
    masks = [mask_of(*xattention_select(q, k, threshold=t, **XATTN)) for t in (0.3, 0.6, 0.9, 0.99)]
    for lo, hi in zip(masks, masks[1:]):
        assert not (lo & ~hi).any(), "a larger threshold must keep a superset"
    assert masks[-1].sum() > masks[0].sum()


def test_xattention_forced_blocks_can_be_turned_off():
    q, k, _ = stripe_qkv(L=512, strength=10.0)
    M = 512 // BS
    mask = mask_of(*xattention_select(q, k, threshold=0.05, keep_sink=False, keep_diagonal=False, **XATTN))
    # With a tiny threshold and no forced blocks, the stripe block (holding almost all the mass) is all a row keeps.
    J = 300 // BS
    assert torch.equal(mask[..., J + 1:, :].sum(-1), torch.ones(1, 4, M - J - 1, dtype=torch.int64))


# ------------------------------------------------------------------------------------------------ bad inputs

@pytest.mark.parametrize("kwargs, error, match", [
    (dict(gamma=0.0), ValueError, "gamma"),
    (dict(gamma=1.5), ValueError, "gamma"),
    (dict(gamma="0.9"), TypeError, "gamma"),
    (dict(tau=-0.1), ValueError, "tau"),
    (dict(tau=float("nan")), ValueError, "tau"),
    (dict(min_budget=-1), ValueError, "min_budget"),
    (dict(min_budget=1.5), TypeError, "min_budget"),
    (dict(max_budget=0), ValueError, "max_budget"),
    (dict(block_size=100), ValueError, "block_size"),
    (dict(softmax_scale=-1.0), ValueError, "softmax_scale"),
], ids=lambda x: str(x) if not isinstance(x, type) else x.__name__)
def test_flexprefill_bad_arguments(kwargs, error, match):
    q, k, _ = rand_qkv(L=64)
    with pytest.raises(error, match=match):
        flexprefill_select(q, k, **{**FLEX, **kwargs})


@pytest.mark.parametrize("kwargs, error, match", [
    (dict(threshold=0.0), ValueError, "threshold"),
    (dict(threshold=1.01), ValueError, "threshold"),
    (dict(threshold=None), TypeError, "threshold"),
    (dict(stride=3), ValueError, "stride"),
    (dict(stride=64), ValueError, "stride"),
    (dict(stride=0), ValueError, "stride"),
    (dict(block_size=48), ValueError, "block_size"),
    (dict(keep_sink=1), TypeError, "keep_sink"),
], ids=lambda x: str(x) if not isinstance(x, type) else x.__name__)
def test_xattention_bad_arguments(kwargs, error, match):
    q, k, _ = rand_qkv(L=64)
    with pytest.raises(error, match=match):
        xattention_select(q, k, **{**XATTN, **kwargs})


@pytest.mark.parametrize("name", SELECTORS)
def test_bad_tensors(name):
    q, k, _ = rand_qkv(L=64, Hq=4, Hkv=2)
    select = SELECTORS[name]
    with pytest.raises(ValueError, match="divisible"):
        select(q[:, :, :3], k)
    with pytest.raises(ValueError, match="sequence length"):
        select(q, k[:, :32])
    with pytest.raises(ValueError, match="4-D"):
        select(q[0], k)
    with pytest.raises(TypeError, match="torch.Tensor"):
        select(q.numpy(), k)
    with pytest.raises(TypeError, match="dtype"):
        select(q.int(), k.int())
