"""The Gluon score kernel for Hopper (triton_impl/scoring_sm90.py) against the Triton score kernel it replaces there.

Both compute the same arithmetic in the same order, so they must agree bit for bit: the same scores (NaN where one
is NaN), the same counts, the same lists. The Triton kernel is itself tested against the reference and float64
(test_triton_selection.py, whose 32K GPU case now reaches the Gluon kernel). The kernel runs on an sm_90 GPU only; on
a CPU, tests/test_triton_compile.py compiles it for sm_90, and the rules that pick it are tested here.
"""

from __future__ import annotations

import pytest
import torch
from helpers import HAS_CUDA, random_qkv

import triton_impl
from reference.synthetic import planted_qkv
from triton_impl import scoring
from triton_impl.scoring import launch_block_scores, launch_scores_and_select, split_kbar

SM90 = scoring._sm90_scores()  # None where this Triton's Gluon lacks the kernel's names (a warning says so)
ON_SM90 = HAS_CUDA and SM90 is not None and SM90.sm90_available(torch.device("cuda"))
sm90_gpu = pytest.mark.skipif(not ON_SM90, reason="the Gluon score kernel runs on sm_90 GPUs")

GLUON, TRITON = dict(sm90=True), dict(sm90=False)
CASES = [  # (B, L, Hq, Hkv, D, dtype, planted)
    (1, 8192, 32, 4, 128, torch.bfloat16, True),
    (2, 5000, 8, 1, 64, torch.float16, False),  # a partial last block; batch 1's TMA boxes run into batch 2's rows
    (1, 300, 4, 4, 128, torch.bfloat16, False),  # three blocks: a single tile per row
    (1, 20000, 16, 2, 128, torch.float16, True),  # up to three tiles a row through the ring, a partial last one
]


def inputs(case, seed=0):
    B, L, Hq, Hkv, D, dtype, planted = case
    make = planted_qkv if planted else random_qkv
    q, k, _ = make(B, L, Hq, Hkv, D, seed=seed, dtype=dtype, device="cuda")
    return q, split_kbar(triton_impl.mean_pool_keys(k, 128), D ** -0.5, q.dtype)


def assert_same_selection(a, b):
    (counts_a, lists_a), (counts_b, lists_b) = a, b
    assert torch.equal(counts_a, counts_b)
    assert torch.equal(lists_a, lists_b)


def case_name(case):
    B, L, Hq, Hkv, D, dtype, planted = case
    return f"B{B}-L{L}-g{Hq // Hkv}-D{D}-{str(dtype)[6:]}-{'planted' if planted else 'random'}"


@pytest.mark.gpu
@sm90_gpu
@pytest.mark.parametrize("case", CASES, ids=case_name)
def test_scores_equal_bit_for_bit(case):
    q, parts = inputs(case)
    gluon, triton = (launch_block_scores(q, parts, 128, cfg) for cfg in (GLUON, TRITON))
    torch.testing.assert_close(gluon, triton, rtol=0, atol=0, equal_nan=True)


@pytest.mark.gpu
@sm90_gpu
@pytest.mark.parametrize("pad_lists", [True, False])
@pytest.mark.parametrize("case", CASES, ids=case_name)
def test_selection_equal(case, pad_lists):
    q, parts = inputs(case, seed=1)
    calls = [launch_scores_and_select(q, parts, 128, 0.12, 2, 4, 2, pad_lists=pad_lists, _config=cfg)
             for cfg in (GLUON, TRITON)]
    if not pad_lists:  # only the first count entries of a list are defined
        M = calls[0][1].shape[-1]
        calls = [(c, i.where(torch.arange(M, device="cuda") < c[..., None], -1)) for c, i in calls]
    assert_same_selection(*calls)


@pytest.mark.gpu
@sm90_gpu
def test_strided_queries():
    """q as a (B, Hq, L, D) tensor seen as (B, L, Hq, D), as attention layers hold it: read by pointers, not TMA."""
    q, parts = inputs(CASES[1], seed=2)
    q = q.transpose(1, 2).contiguous().transpose(1, 2)
    assert not q.is_contiguous()
    gluon, triton = (launch_block_scores(q, parts, 128, cfg) for cfg in (GLUON, TRITON))
    torch.testing.assert_close(gluon, triton, rtol=0, atol=0, equal_nan=True)


@pytest.mark.gpu
@sm90_gpu
def test_row_chunks_and_shared_counts():
    """flash_prefill's chunked calls: rows (I0, I1) into one counts buffer, lists of the chunk only."""
    q, parts = inputs(CASES[3])
    M = parts[0].shape[1]
    out = {}
    for name, cfg in (("gluon", GLUON), ("triton", TRITON)):
        counts = torch.zeros(q.shape[0], q.shape[2], M, dtype=torch.int32, device="cuda")
        lists = [launch_scores_and_select(q, parts, 128, 0.2, 1, 2, 0, rows=rows, counts=counts, _config=cfg)[1]
                 for rows in ((0, 60), (60, M))]
        out[name] = (counts, torch.cat(lists, dim=2))
    assert_same_selection(out["gluon"], out["triton"])


@pytest.mark.gpu
@sm90_gpu
def test_nan_rows():
    """A NaN query makes its row's causal scores NaN (every causal block kept); the rows around it are unchanged."""
    q, parts = inputs(CASES[1])
    q[1, 2000, 3, 7] = float("nan")
    gluon, triton = (launch_block_scores(q, parts, 128, cfg) for cfg in (GLUON, TRITON))
    torch.testing.assert_close(gluon, triton, rtol=0, atol=0, equal_nan=True)
    assert gluon[1, 3, 2000 // 128, : 2000 // 128 + 1].isnan().all()
    assert_same_selection(*(launch_scores_and_select(q, parts, 128, 0.12, 2, 4, 2, _config=cfg)
                            for cfg in (GLUON, TRITON)))


@pytest.mark.skipif(SM90 is None, reason="this Triton's Gluon lacks the kernel's names")
def test_which_launches_take_the_gluon_kernel(monkeypatch):
    """scoring._takes_sm90_path on a stand-in sm_90 device (no GPU needed): flash_prefill's standard path from
    SM90_MIN_LENGTH tokens on, config sm90=False / True to choose, everything else on the Triton kernel."""
    monkeypatch.setattr(SM90, "sm90_available", lambda device: True)
    N0 = SM90.SM90_MIN_LENGTH

    def takes(L=N0, dtype=torch.bfloat16, D=128, block_size=128, varlen=None, wide=False, config=None, q=None):
        q = torch.empty(1, L, 2, D, dtype=dtype) if q is None else q
        hi = torch.empty(1, max(1, L // 128), 1, D, dtype=dtype)
        return scoring._takes_sm90_path(q, hi, block_size, varlen, wide, config or {})

    assert takes() and takes(dtype=torch.float16) and takes(D=64)
    assert not takes(L=N0 - 128) and takes(L=1024, config=GLUON) and takes(L=1024, config=dict(sm90=dict(STAGES=2)))
    assert not takes(config=TRITON)
    assert not takes(block_size=64) and not takes(dtype=torch.float32) and not takes(D=32)
    assert not takes(varlen=object()) and not takes(wide=True)
    assert not takes(q=torch.empty(1, N0, 2, 256, dtype=torch.bfloat16)[..., ::2])  # D not contiguous
    monkeypatch.setattr(SM90, "sm90_available", lambda device: False)
    assert not takes() and not takes(config=GLUON)
