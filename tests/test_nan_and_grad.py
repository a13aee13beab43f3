"""Silent wrong results (issue 11, section 3): NaN/inf, autograd, bfloat16 under the interpreter.

* NaN and inf behave as in dense attention in both packages (docs/DESIGN.md section 2): a NaN key j makes NaN the
  rows i >= j that attend to it and nothing else; a NaN value j also makes NaN the earlier rows of j's tile of the
  p @ v product (its query block in the block-sparse paths, its 128-row tile in the dense paths); +inf logits give
  NaN; only a row that sees no key at all gives 0.
* `reference` is differentiable; the Triton entry points are inference-only and refuse inputs that autograd tracks.
* The Triton entry points refuse bfloat16 under the interpreter, which computes tl.dot on bfloat16 wrongly.
"""

from __future__ import annotations

import pytest
import torch
from helpers import DEVICE, KERNEL_TEST_DTYPES, causal_block_mask, dtype_id, random_qkv

import reference
import triton_impl
import triton_impl.common
from reference.synthetic import planted_qkv
from tools.oracle import ATOL, num_blocks

NAN = float("nan")
PACKAGES = [reference, triton_impl]


def nan_rows(out: torch.Tensor) -> torch.Tensor:
    """(B, L, Hq, D) -> (B, Hq, L) bool: the rows holding a NaN. Every other row must be finite."""
    out = out.cpu()
    bad = torch.isnan(out).any(dim=-1)
    assert torch.isfinite(out[~bad]).all(), "a row without NaN holds an inf"
    return bad.transpose(1, 2)


def full_lists(B, Hq, M, device=DEVICE):
    mask = causal_block_mask(B, Hq, M, device=device)
    return mask, *reference.compact_blocks(mask.cpu())


def sparse_outputs(package, q, k, v, mask, counts, indices, bs):
    """Physical and logical block-sparse attention of one package on the given block set."""
    dev = q.device
    return {
        "physical": package.block_sparse_attention(q, k, v, counts.to(dev), indices.to(dev), bs),
        "logical": package.block_sparse_attention_logical(q, k, v, mask.to(dev), bs),
    }


def rows_from(L: int, first: int) -> torch.Tensor:
    return torch.arange(L) >= first


# --- NaN in a key, NaN in a value, +inf logits ------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", KERNEL_TEST_DTYPES, ids=dtype_id)
def test_nan_key_reaches_exactly_the_rows_that_attend_to_it(dtype):
    """One NaN in key j = 37: rows i >= j are NaN, every earlier row is finite (the reference used to return 0
    for them), in both packages, dense and block-sparse with every causal block kept."""
    B, L, Hq, Hkv, D, bs = 1, 80, 2, 1, 64, 16
    q, k, v = random_qkv(B, L, Hq, Hkv, D, dtype, seed=1, device=DEVICE)
    k[0, 37, 0, 5] = NAN
    mask, counts, indices = full_lists(B, Hq, num_blocks(L, bs))
    expected = rows_from(L, 37).expand(B, Hq, L)
    for package in PACKAGES:
        outs = {"dense": package.dense_attention(q, k, v),
                **sparse_outputs(package, q, k, v, mask, counts, indices, bs)}
        for name, out in outs.items():
            assert torch.equal(nan_rows(out), expected), f"{package.__name__} {name}"


@pytest.mark.parametrize("j", [5, 137])  # in key block 0 (the block an exhausted list used to re-read) / block 8
@pytest.mark.parametrize("dtype", KERNEL_TEST_DTYPES, ids=dtype_id)
def test_nan_value_reaches_the_rows_of_its_tile(dtype, j):
    """One NaN in value j: rows i >= j are NaN, and so are the earlier rows of j's tile (p_ij = 0 there, but
    0 * NaN = NaN): its query block in the block-sparse paths, its 128-row tile in the dense paths, the same rows in
    both packages. Rows of earlier query blocks (earlier tiles) stay finite, as do rows that drop block J, also
    where another head keeps it."""
    B, L, Hq, Hkv, D, bs = 1, 160, 2, 1, 64, 16
    q, k, v = random_qkv(B, L, Hq, Hkv, D, dtype, seed=2, device=DEVICE)
    v[0, j, 0, 3] = NAN
    M = num_blocks(L, bs)
    mask, counts, indices = full_lists(B, Hq, M)
    mask = mask.clone()
    mask[0, 1, 9, j // bs] = False  # head 1: query block 9 drops key block J (head 0 keeps it)
    counts, indices = reference.compact_blocks(mask.cpu())
    sparse_expected = rows_from(L, (j // bs) * bs).repeat(B, Hq, 1)
    sparse_expected[0, 1, 9 * bs: 10 * bs] = False
    dense_expected = rows_from(L, j // 128 * 128).expand(B, Hq, L)
    for package in PACKAGES:
        assert torch.equal(nan_rows(package.dense_attention(q, k, v)), dense_expected), package.__name__
        for name, out in sparse_outputs(package, q, k, v, mask, counts, indices, bs).items():
            assert torch.equal(nan_rows(out), sparse_expected), f"{package.__name__} {name}"


def test_inf_logit_gives_nan_and_a_row_without_keys_gives_zero():
    """A +inf logit makes its row NaN (as torch.softmax does); a row with an empty block list gives exactly 0."""
    B, L, Hq, Hkv, D, bs = 1, 48, 2, 1, 64, 16
    q, k, v = random_qkv(B, L, Hq, Hkv, D, KERNEL_TEST_DTYPES[-1], seed=3, device=DEVICE)
    q[0, 20, 0] = 0.0
    q[0, 20, 0, 0] = float("inf")
    k[..., 0] = k[..., 0].abs() + 0.1  # q_20 . k_j = +inf for every key j
    mask, _, _ = full_lists(B, Hq, num_blocks(L, bs))
    mask = mask.clone()
    mask[0, 1, 2] = False  # head 1, query block 2 sees no key
    counts, indices = reference.compact_blocks(mask.cpu())
    expected = torch.zeros(B, Hq, L, dtype=torch.bool)
    expected[0, 0, 20] = True
    dense = torch.softmax(torch.tensor([1.0, float("inf")]), dim=0)
    assert torch.isnan(dense).all()  # what "dense attention" means for a +inf logit
    for package in PACKAGES:
        assert torch.equal(nan_rows(package.dense_attention(q, k, v)), expected), package.__name__
        for name, out in sparse_outputs(package, q, k, v, mask, counts, indices, bs).items():
            assert torch.equal(nan_rows(out), expected), f"{package.__name__} {name}"
            assert (out[0, 32:48, 1] == 0).all(), f"{package.__name__} {name}: a row without keys must give 0"


@pytest.mark.parametrize("dtype", KERNEL_TEST_DTYPES, ids=dtype_id)
def test_minus_inf_logits_are_ignored_as_dense_attention_ignores_them(dtype):
    """A key at -inf logits for some rows gets weight 0 in dense attention, even when it is the first key a row's
    walk meets; rows stay finite and equal to dense attention without that key (in the kernels, a whole key tile of
    -inf logits at the start of a row's list once gave exp2(-inf + inf) = NaN)."""
    B, L, Hq, Hkv, D, bs = 1, 64, 2, 1, 64, 16
    q, k, v = random_qkv(B, L, Hq, Hkv, D, dtype, seed=4, device=DEVICE)
    q[..., 0] = q[..., 0].abs() + 0.1
    k[0, :bs, 0, 0] = -float("inf")  # block 0: every logit of every row is -inf
    mask, counts, indices = full_lists(B, Hq, num_blocks(L, bs))
    finite_k = k.clone()
    finite_k[0, :bs, 0, 0] = torch.finfo(dtype).min  # the same weights (exp underflows to 0), no infinity
    for package in PACKAGES:
        expected = package.dense_attention(q, finite_k, v)
        assert not expected[:, bs:].isnan().any()
        for name, out in sparse_outputs(package, q, k, v, mask, counts, indices, bs).items():
            torch.testing.assert_close(out[:, bs:], expected[:, bs:], rtol=0, atol=ATOL[dtype] * 2,
                                       msg=f"{package.__name__} {name}")


@pytest.mark.parametrize("where", ["key", "query"])
def test_flash_prefill_keeps_nan_rows_dense(where):
    """Through flash_prefill with a sparse selection: the NaN reaches the block scores, a row with a NaN score keeps
    every causal block, so the output has dense attention's NaN rows exactly, in both packages."""
    B, L, Hq, Hkv, D, bs = 1, 128, 2, 1, 64, 16
    q, k, v = planted_qkv(B, L, Hq, Hkv, D, seed=0, dtype=KERNEL_TEST_DTYPES[-1], device=DEVICE)  # a sparse selection
    if where == "key":
        k[0, 100, 0, 1] = NAN
    else:
        q[0, 70, 1, 2] = NAN
    expected = nan_rows(reference.dense_attention(q, k, v))
    assert expected.any() and not expected.all()
    for package in PACKAGES:
        out, stats = package.flash_prefill(q, k, v, alpha=0.5, block_size=bs, sink_blocks=0, window_blocks=1,
                                           last_dense_blocks=0, return_stats=True)
        assert float(stats.density) < 0.9, "the selection should be sparse"
        assert torch.equal(nan_rows(out), expected), package.__name__


# --- autograd: the reference is differentiable ----------------------------------------------------------------------

def small_inputs(seed: int):
    q, k, v = random_qkv(1, 40, 2, 1, 4, torch.float64, seed=seed)
    return tuple(t.requires_grad_() for t in (q, k, v))


def test_reference_attention_is_differentiable():
    """gradcheck (float64, finite differences) of every reference attention function, on a block set with an
    empty row (whose output is 0) and a partial last block."""
    bs = 16
    q, k, v = small_inputs(seed=5)
    mask = causal_block_mask(1, 2, 3).clone()
    mask[0, 0, 2, 1] = False
    mask[0, 1, 1] = False  # an empty row
    counts, indices = reference.compact_blocks(mask)
    cu = torch.tensor([0, 40], dtype=torch.int32)  # flash_prefill_varlen, one sequence (chunks: tests/test_varlen.py)
    functions = {
        "dense": lambda q, k, v: reference.dense_attention(q, k, v),
        "physical": lambda q, k, v: reference.block_sparse_attention(q, k, v, counts, indices, bs),
        "logical": lambda q, k, v: reference.block_sparse_attention_logical(q, k, v, mask, bs),
        "flash_prefill": lambda q, k, v: reference.flash_prefill(q, k, v, alpha=0.3, block_size=bs),
        "flash_prefill_varlen": lambda q, k, v: reference.flash_prefill_varlen(q[0], k[0], v[0], cu, cu, 40, 40,
                                                                               alpha=0.3, block_size=bs),
    }
    for name, fn in functions.items():
        assert torch.autograd.gradcheck(fn, (q, k, v), fast_mode=True), name


def test_reference_flash_prefill_gradient_equals_dense():
    """alpha = 0 keeps every causal block: flash_prefill's gradients are dense attention's."""
    q, k, v = small_inputs(seed=6)
    grad_out = torch.randn(q.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(6))
    dense = torch.autograd.grad(reference.dense_attention(q, k, v), (q, k, v), grad_out)
    sparse = torch.autograd.grad(reference.flash_prefill(q, k, v, alpha=0.0, block_size=16), (q, k, v), grad_out)
    for g_sparse, g_dense in zip(sparse, dense):
        assert g_dense.abs().max() > 0
        torch.testing.assert_close(g_sparse, g_dense, atol=1e-12, rtol=0)


# --- the Triton entry points are inference-only ---------------------------------------------------------------------

def triton_calls(dtype=KERNEL_TEST_DTYPES[-1]):
    """Every public Triton entry point with valid float inputs, keyed by name: name -> (fn, tensors)."""
    B, L, Hq, Hkv, D, bs = 1, 32, 2, 1, 64, 16
    q, k, v = random_qkv(B, L, Hq, Hkv, D, dtype, seed=7, device=DEVICE)
    kbar = reference.mean_pool_keys(k.float(), bs).to(DEVICE)
    scores = reference.block_scores(q.float(), kbar, bs)
    mask, counts, indices = full_lists(B, Hq, 2)
    counts, indices = counts.to(DEVICE), indices.to(DEVICE)
    cu = torch.tensor([0, L], dtype=torch.int32, device=DEVICE)
    # The FP8 kernel takes block sizes 64 and 128 only: its own inputs, two blocks of 64.
    q8, k8, v8 = random_qkv(B, 128, Hq, Hkv, D, dtype, seed=8, device=DEVICE)
    _, counts8, indices8 = full_lists(B, Hq, 2)
    counts8, indices8 = counts8.to(DEVICE), indices8.to(DEVICE)
    return {
        "mean_pool_keys": (lambda k: triton_impl.mean_pool_keys(k, bs), (k,)),
        "block_scores": (lambda q, kbar: triton_impl.block_scores(q, kbar, bs), (q, kbar)),
        "select_blocks": (lambda s: triton_impl.select_blocks(s), (scores,)),
        "select_and_compact": (lambda s: triton_impl.select_and_compact(s), (scores,)),
        "flash_prefill": (lambda q, k, v: triton_impl.flash_prefill(q, k, v, block_size=bs), (q, k, v)),
        "block_sparse_attention": (lambda q, k, v: triton_impl.block_sparse_attention(q, k, v, counts, indices, bs),
                                   (q, k, v)),
        "block_sparse_attention_logical": (lambda q, k, v: triton_impl.block_sparse_attention_logical(q, k, v, mask,
                                                                                                      bs), (q, k, v)),
        "dense_attention": (lambda q, k, v: triton_impl.dense_attention(q, k, v), (q, k, v)),
        "block_sparse_attention_fp8": (lambda q, k, v: triton_impl.block_sparse_attention_fp8(q, k, v, counts8,
                                                                                              indices8, 64),
                                       (q8, k8, v8)),
        "flash_prefill_varlen": (lambda q, k, v: triton_impl.flash_prefill_varlen(q[0], k[0], v[0], cu, cu, L, L,
                                                                                  block_size=bs), (q, k, v)),
    }


TRITON_ENTRY_POINTS = list(triton_calls())


@pytest.mark.parametrize("entry", TRITON_ENTRY_POINTS)
def test_triton_refuses_inputs_that_require_grad(entry):
    fn, tensors = triton_calls()[entry]
    for i in range(len(tensors)):
        tracked = [t.clone().requires_grad_(j == i) for j, t in enumerate(tensors)]
        with torch.enable_grad(), pytest.raises(RuntimeError,
                                                match=r"inference-only .*torch\.no_grad\(\).*`reference` package"):
            fn(*tracked)
        # The same inputs run without autograd: under no_grad, under inference_mode, or detached.
        with torch.no_grad():
            fn(*tracked)
        with torch.inference_mode():
            fn(*tracked)
        fn(*(t.detach() for t in tracked))


def test_every_triton_entry_point_is_covered():
    # compact_blocks reads a bool mask (no float input to track); lists_to_mask and merge_attention_states are the
    # reference's own (the merge's NaN rules: tests/test_lse.py)
    others = {"compact_blocks", "FlashPrefillStats", "VarlenStats", "causal_block_density", "PAPER_ALPHA",
              "lists_to_mask", "merge_attention_states"}
    assert set(TRITON_ENTRY_POINTS) | others == set(triton_impl.__all__)


# --- bfloat16 under the Triton interpreter ----------------------------------------------------------------------------

# The entry points whose inputs may be bfloat16.
BF16_ENTRY_POINTS = ["mean_pool_keys", "block_scores", "flash_prefill", "block_sparse_attention",
                     "block_sparse_attention_logical", "dense_attention", "flash_prefill_varlen"]


@pytest.mark.skipif(DEVICE != "cpu", reason="the interpreter runs on the CPU")
@pytest.mark.parametrize("entry", BF16_ENTRY_POINTS)
def test_triton_refuses_bfloat16_under_the_interpreter(entry):
    fn, tensors = triton_calls(torch.bfloat16)[entry]
    with pytest.raises(TypeError, match=r"is bfloat16, which is not supported under the Triton interpreter "
                                        r"\(TRITON_INTERPRET=1\).*triton-lang/triton#11584.*bfloat16 on a GPU"):
        fn(*tensors)


def test_interpreter_dtype_check_reads_the_environment(monkeypatch):
    """tools.hopper_compile patches `interpreting()` to True while it compiles bfloat16 kernels for a GPU without the
    interpreter: the dtype check must look at TRITON_INTERPRET itself."""
    check = triton_impl.common.check_kernel_dtype
    bf16 = torch.zeros(2, dtype=torch.bfloat16)
    monkeypatch.setattr(triton_impl.common, "interpreting", lambda: True)
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    check(q=bf16)  # compiling for a GPU: fine
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    with pytest.raises(TypeError, match="^q is bfloat16"):
        check(q=bf16)
    with pytest.raises(TypeError, match="^dtype is bfloat16"):
        check(dtype=torch.bfloat16)
    check(q=bf16.half(), dtype=torch.float32)
