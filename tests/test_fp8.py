"""Stage 5 in FP8 (e4m3): reference/fp8.py on its own, triton_impl/fp8.py against it, both against float64 attention.

What is compared, and how closely:

* Quantisation (Eq. 1-2 of reference/fp8.py): the scales are powers of two, so x / scale is exact and the one
  rounding to e4m3 is deterministic. The Triton kernel equals the reference to the bit (bytes of x8, the sign of
  zero included, and the scales exactly).
* Attention (Eq. 3-5), Triton against the reference on the same lists and the same e4m3 operands: both do the same
  operations in float32; what differs is the order of the float32 sums (the dots, the row sums) and exp2, which can
  move P by an ulp and, rarely, flip one e4m3 rounding of 2^8 P. Under the interpreter (float32 / float16 inputs)
  the measured difference is at most 9.5e-7 (float32 outputs, mean <= 2e-8: no flip in these cases) or one float16
  ulp of the output (float16 outputs), so the tolerances there are tight (FLOAT32_MAX_DIFF, FLOAT32_MEAN_DIFF, one ulp
  for float16). On a GPU the logits go through wgmma's accumulation order and an FMA (s x scale - m), so P rounding
  flips are expected now and then: GPU_MAX_DIFF / GPU_MEAN_DIFF allow them (chosen from the size of one flip, see
  there; not yet measured on a GPU).
* Against exact attention (reference.block_sparse_attention in float64 over the same blocks): e4m3 keeps 3 mantissa
  bits, so each rounding is off by at most 2^-4 of its operand; the bound and why it is neither vacuous nor tight is
  at `test_fp8_error_against_exact_attention`. There too, the FP8 error must be several times the error of the
  bf16 / fp16 kernel: a test that fails if quantisation silently did nothing.

On a CPU the Triton kernels run under the interpreter (TRITON_INTERPRET=1, set by conftest.py) in float32 / float16
(the interpreter computes tl.dot on bfloat16 wrongly), small shapes: the CPU part of the file takes well under a
minute. On a GPU the same tests run in bfloat16 / float16, plus the cases marked `gpu`. Every kernel output starts as
NaN (conftest.py's poison_outputs), so an element a kernel forgot to write fails.
"""

from __future__ import annotations

import re

import pytest
import torch
from helpers import DEVICE, HAS_CUDA, KERNEL_TEST_DTYPES, case_id, case_params, causal_block_mask, dtype_id, \
    random_block_mask, random_qkv

import reference
import triton_impl
from reference import fp8 as ref_fp8
from reference.synthetic import planted_qkv
from reference.validation import BAD_COUNTS, BAD_INDEX, NOT_ASCENDING
from tools.oracle import num_blocks
from triton_impl import fp8 as tri_fp8
from triton_impl.fp8 import FP8_BLOCK_SIZES

DTYPES = KERNEL_TEST_DTYPES
INTERPRETER = not HAS_CUDA  # conftest.py sets TRITON_INTERPRET=1 exactly when there is no CUDA GPU

# Triton vs reference, interpreter, float32 outputs: measured max 9.5e-7 (planted inputs; 2.4e-7 - 4.8e-7 on random
# ones), mean <= 1.8e-8 over every case below: a few float32 ulps of outputs up to ~4, from the order of the sums
# and exp2. Set 2x above the measured maximum and 5x above the mean: one flip of an e4m3 rounding of 2^8 P would
# move an output by ~1e-3 and fail here.
FLOAT32_MAX_DIFF = 2e-6
FLOAT32_MEAN_DIFF = 1e-7
# float16 outputs: the float32 results differ as above, and their rounding to float16 may differ by one ulp, at most
# 2^-10 of the value (measured: max 9.8e-4 at an output in [1, 2), mean <= 2e-8, at most 0.011% of elements differ).
FLOAT16_RTOL = 2.0**-10
FLOAT16_ATOL = 1e-6
# GPU (bf16 / fp16): besides one ulp of the output dtype (2^-8 relative in bf16: ~4e-3 at |out| ~ 1), the logits go
# through wgmma's e4m3 accumulator (not promoted to float32, triton_impl/fp8.py) and an FMA in exp2(s x scale - m),
# which move P by more than float32 rounding and flip the e4m3 rounding of 2^8 P now and then. One flip moves its
# row's output by up to 2^-4 of a weight x |v|, ~0.1 at the planted inputs' peaked rows: the max bound only catches
# gross errors. The mean difference must stay a small share of the reference's own error against float64 attention
# over the same lists (a wrong scale, block or row makes it as large as that error). The first H200 run measured
# means of 1.1-1.8e-3 on planted inputs (about 6% of their error), maxima up to 0.125.
GPU_MAX_DIFF = 0.25
GPU_MEAN_SHARE = 0.2

E4M3_MIN_NORMAL_EXPONENT = -6  # e4m3: normal binades from 2^-6, 3 mantissa bits, subnormal step 2^-9


def ulp_e4m3(y: torch.Tensor) -> torch.Tensor:
    """The spacing of e4m3 values around y (float64): 2^(floor(log2 |y|) - 3), 2^-9 in the subnormal range."""
    exponent = torch.frexp(y.abs()).exponent - 1  # floor(log2 |y|) (frexp: y = f 2^e, f in [0.5, 1))
    return torch.exp2((exponent.clamp(min=E4M3_MIN_NORMAL_EXPONENT) - 3).double())


def expand_scale(scale: torch.Tensor, L: int, block_size: int) -> torch.Tensor:
    """(B, H, N) per-block scales -> (B, L, H, 1), each row's block scale."""
    return scale.repeat_interleave(block_size, dim=-1)[..., :L].transpose(1, 2).unsqueeze(-1)


def e4m3_bytes(x8: torch.Tensor) -> torch.Tensor:
    """The bytes of x8 (so that -0 and +0, or two NaN encodings, are told apart)."""
    bits = x8.contiguous().view(torch.uint8)
    return bits


def assert_same_quantisation(got, expected):
    (x8, scale), (ref8, ref_scale) = got, expected
    assert x8.dtype == torch.float8_e4m3fn and x8.shape == ref8.shape
    assert scale.dtype == torch.float32 and scale.shape == ref_scale.shape
    assert torch.equal(e4m3_bytes(x8), e4m3_bytes(ref8)), "e4m3 bytes differ from the reference"
    assert torch.equal(scale, ref_scale), "scales differ from the reference"


def assert_matches_reference(out, expected, inputs):
    """Triton FP8 attention against the reference FP8 attention on the same lists (tolerances: module docstring).
    inputs: (q, k, v, counts, indices, block_size, softmax_scale) of both calls; on a GPU the mean difference is
    judged against the reference's own error, float64 attention over the same lists."""
    assert out.dtype == expected.dtype and out.shape == expected.shape
    assert not out.isnan().any(), "kernel left NaN (unwritten or invalid) elements"
    diff = (out.double() - expected.double()).abs()
    max_diff, mean_diff = float(diff.max()), float(diff.mean())
    if HAS_CUDA:
        q, k, v, counts, indices, bs, scale = inputs
        exact = reference.block_sparse_attention(q.double(), k.double(), v.double(), counts, indices, bs, scale)
        own_error = float((expected.double() - exact).abs().mean())
        assert max_diff <= GPU_MAX_DIFF and mean_diff <= GPU_MEAN_SHARE * own_error, (max_diff, mean_diff, own_error)
    elif out.dtype == torch.float32:
        assert max_diff <= FLOAT32_MAX_DIFF and mean_diff <= FLOAT32_MEAN_DIFF, (max_diff, mean_diff)
    else:
        bound = FLOAT16_RTOL * expected.double().abs() + FLOAT16_ATOL
        assert (diff <= bound).all(), f"more than one float16 ulp apart: max {max_diff:.3g}"


def lists(mask):
    return reference.compact_blocks(mask)


# ----------------------------------------------------------------------------------------------------------------
# 1. The reference's quantisation (Eq. 1-2), on the CPU in float32 / float64: the definition the kernels follow.
# ----------------------------------------------------------------------------------------------------------------
def test_round_e4m3_rounds_to_nearest_even_and_saturates():
    x = torch.tensor([17.0, 19.0, 2.0**-10, 1.5 * 2.0**-9, 248.0, 440.0, 448.0, 449.0, 464.0, 480.0, 500.0, 1e6,
                      float("inf"), -500.0, float("-inf"), -0.0, 0.0])
    got = ref_fp8.round_e4m3(x)
    assert got.dtype == torch.float8_e4m3fn
    # ties to even: 17 -> 16 (not 18), 19 -> 20, 2^-10 -> 0, 1.5 x 2^-9 -> 2^-8, 248 -> 256, 440 -> 448 (416 odd)
    expected = [16.0, 20.0, 0.0, 2.0**-8, 256.0, 448.0, 448.0, 448.0, 448.0, 448.0, 448.0, 448.0, 448.0, -448.0,
                -448.0, -0.0, 0.0]
    assert got.float().tolist() == expected
    assert not got.float().isnan().any(), "torch's cast gives NaN past 448; round_e4m3 must clamp first"
    assert got.float()[-2].sign() == 0 and torch.signbit(got.float()[-2])  # -0 keeps its sign
    assert ref_fp8.round_e4m3(torch.tensor([float("nan")])).float().isnan().all()  # NaN stays NaN


def test_block_scale_exponents_follow_eq_1():
    amax = torch.tensor([0.0, 1.0, 0.75, 255.0, 256.0, 1e-30, 1e-40, 1e30, 3e38])
    E = ref_fp8.block_scale_exponents(amax)
    # e(a) with a = f 2^e, f in [0.5, 1): e(1) = 1, e(0.75) = 0, e(255) = 8, e(256) = 9; E = e - 8, clamped to
    # [-126, 126]; 0 for an all-zero block. 1e-30 ~ 2^-99.7: e = -99; 1e-40 (subnormal): e = -132 -> clamped.
    assert E.tolist() == [0, -7, -8, 0, 1, -107, -126, 92, 120]


QUANT_SHAPES = [(1, 200, 2, 64, 64), (2, 777, 3, 128, 128), (1, 300, 1, 64, 128), (1, 64, 2, 128, 64),
                (1, 100, 1, 64, 32)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=dtype_id)
@pytest.mark.parametrize("shape", QUANT_SHAPES, ids=lambda s: f"B{s[0]}-L{s[1]}-H{s[2]}-D{s[3]}-bs{s[4]}")
def test_reference_quantisation_meets_eq_1_and_2(shape, dtype):
    B, L, H, D, bs = shape
    gen = torch.Generator().manual_seed(L + D)
    x = (torch.randn(B, L, H, D, generator=gen) * torch.exp2(torch.randint(-8, 8, (B, 1, H, 1), generator=gen))
         ).to(dtype)
    x8, scale = ref_fp8.quantize_blocks(x, bs)
    N = num_blocks(L, bs)
    assert x8.dtype == torch.float8_e4m3fn and x8.shape == x.shape
    assert scale.dtype == torch.float32 and scale.shape == (B, H, N)
    # Eq. 1: powers of two, 2^(e(amax) - 8) from each block's own rows (the last one partial when L % bs != 0).
    assert (torch.frexp(scale).mantissa == 0.5).all()
    xd = x.double()
    padded = torch.nn.functional.pad(xd.abs(), (0, 0, 0, 0, 0, N * bs - L))
    amax = padded.view(B, N, bs, H, D).amax(dim=(2, 4)).transpose(1, 2)  # (B, H, N)
    assert torch.equal(scale.double(), torch.exp2((torch.frexp(amax).exponent - 8).double()))
    assert ((amax / scale >= 2**7) & (amax / scale < 2**8)).all()  # the block's largest |x / s| in [2^7, 2^8)
    # Eq. 2: one rounding of the exact quotient (a power-of-two scale: x / s is exact in float32)
    s = expand_scale(scale, L, bs).double()
    y = xd / s
    assert torch.equal(x8.view(torch.uint8), ref_fp8.round_e4m3((xd / s).float()).view(torch.uint8))
    # |x / s| < 2^8, but [248, 256) rounds up to 256: |x8| <= 2^8, far from e4m3's saturation at 448
    assert (y.abs() < 256).all() and (x8.float().abs() <= 256).all()
    # The rounding error: at most half an e4m3 ulp of y, so |x8 s - x| <= max(2^-4 |x|, 2^-10 s), and at most
    # 2^-4 of the block's amax (the largest binade [2^7, 2^8) has ulp 2^4: 2^3 s <= 2^-4 amax).
    err = (x8.double() * s - xd).abs()
    assert (err <= ulp_e4m3(y) / 2 * s).all()
    assert (err <= torch.maximum(2.0**-4 * xd.abs(), 2.0**-10 * s)).all()
    block_amax = amax.repeat_interleave(bs, dim=-1)[..., :L].transpose(1, 2).unsqueeze(-1)
    assert (err <= 2.0**-4 * block_amax).all()
    # Not a vacuous bound: the rounding happened (float16 and wider inputs carry more than 4 significant bits).
    assert float(err.max()) > 2.0**-7 * float(block_amax.min())


def special_blocks(dtype, block_size: int, L: int, D: int = 64) -> tuple[torch.Tensor, dict]:
    """x (1, L, 1, D) whose blocks are: all zero, tiny, large, mixed tiny and large, and a partial last block of
    ordinary values; returns x and {block: what it holds}."""
    tiny = {torch.float16: 1e-6, torch.bfloat16: 1e-30, torch.float32: 1e-30}[dtype]  # float16: a subnormal
    large = {torch.float16: 6e4, torch.bfloat16: 1e30, torch.float32: 1e30}[dtype]
    gen = torch.Generator().manual_seed(block_size)
    x = torch.randn(1, L, 1, D, generator=gen)
    x[:, :block_size] = 0
    x[:, block_size:2 * block_size] *= tiny
    x[:, 2 * block_size:3 * block_size] *= 1e4
    x[:, 3 * block_size:4 * block_size] *= large / 8
    x[:, 4 * block_size:5 * block_size] = torch.where(torch.rand(block_size, 1, D, generator=gen) < 0.5,
                                                      x[:, 4 * block_size:5 * block_size] * tiny, 50.0)
    if dtype == torch.float32:  # float32 subnormals: the exponent clamps at -126
        x[:, 5 * block_size:6 * block_size] *= 1e-40
    return x.to(dtype), dict(zero=0, tiny=1, ten_thousand=2, large=3, mixed=4)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=dtype_id)
def test_reference_quantisation_of_zero_tiny_and_large_blocks(dtype):
    bs = 64
    L = 6 * bs + 37
    x, blocks = special_blocks(dtype, bs, L)
    x8, scale = ref_fp8.quantize_blocks(x, bs)
    assert not x8.float().isnan().any() and torch.isfinite(scale).all()
    assert scale[0, 0, blocks["zero"]] == 1.0 and (x8[:, :bs].float() == 0).all()
    xd, s = x.double(), expand_scale(scale, L, bs).double()
    err = (x8.double() * s - xd).abs()
    assert (err <= torch.maximum(2.0**-4 * xd.abs(), 2.0**-10 * s)).all()
    # tiny, 1e4 and large blocks: the block's amax lands in [2^7, 2^8) after scaling, as for ordinary ones
    for name in ("tiny", "ten_thousand", "large"):
        J = blocks[name]
        top = x8[:, J * bs:(J + 1) * bs].float().abs().max()
        assert 2**7 <= top < 2**8, (name, top)
    # mixed: the tiny values underflow to zero next to 50 (their scale is the block's), and nothing else does
    mixed, mixed8 = x[:, 4 * bs:5 * bs].double(), x8[:, 4 * bs:5 * bs].float()
    assert torch.equal(mixed8 == 0, mixed.abs() < 1)
    if dtype == torch.float32:  # subnormal inputs: the exponent clamps (scale 2^-126), far below the usual range
        assert scale[0, 0, 5] == 2.0**-126
        top = x8[:, 5 * bs:6 * bs].float().abs().max()
        assert 0 < top < 1


@pytest.mark.parametrize("block_size", [64, 128])
def test_reference_partial_last_block_is_scaled_by_its_valid_rows(block_size):
    """The last block's scale comes from rows N Bs - Bs .. L - 1 only: here they are small, the rows before large."""
    L = 2 * block_size + 10
    x = torch.randn(1, L, 2, 64, generator=torch.Generator().manual_seed(3)) * 100
    x[:, 2 * block_size:] /= 1000
    _, scale = ref_fp8.quantize_blocks(x, block_size)
    last_amax = x[:, 2 * block_size:].abs().amax(dim=(1, 3))  # (B, H)
    assert torch.equal(scale[..., -1], torch.exp2((torch.frexp(last_amax).exponent - 8).float()))
    assert (scale[..., -1] < scale[..., -2] / 2**6).all()


# ----------------------------------------------------------------------------------------------------------------
# 2. Triton's quantisation against the reference, to the bit.
# ----------------------------------------------------------------------------------------------------------------
# (B, L, Hq, Hkv, D, block_size): odd lengths, both block sizes, D 64 and 128, GQA groups 1 / 2 / 4.
QUANT_CASES = [
    (1, 200, 2, 1, 64, 64),
    (2, 777, 2, 1, 128, 128),
    (1, 300, 4, 1, 64, 128),
    (1, 129, 2, 2, 128, 64),
]
GPU_QUANT_CASES = [
    (1, 8191, 16, 4, 128, 128),
    (2, 4097, 8, 1, 64, 64),
]


@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
@pytest.mark.parametrize("case", case_params(QUANT_CASES, GPU_QUANT_CASES))
def test_triton_quantisation_equals_the_reference(case, dtype):
    B, L, Hq, Hkv, D, bs = case
    q, k, v = random_qkv(B, L, Hq, Hkv, D, dtype=dtype, seed=L, device=DEVICE)
    for x in (q * 3, k, v / 1000):
        assert_same_quantisation(tri_fp8.quantize_blocks(x, bs), ref_fp8.quantize_blocks(x, bs))
    # quantize_qkv: the three operands of the attention kernel, V8 transposed (keys in P's register order), padded to
    # N Bs rows with zeros
    q8, k8, vt8, s_q, s_k, s_v = tri_fp8.quantize_qkv(q, k, v, bs)
    Lp = num_blocks(L, bs) * bs
    assert q8.shape == (B, Lp, Hq, D) and k8.shape == (B, Lp, Hkv, D) and vt8.shape == (B, Hkv, D, Lp)
    vt8 = vt8[..., tri_fp8.pv_key_slots(Lp, device=vt8.device)]  # keys in their natural order
    assert_same_quantisation((q8[:, :L], s_q), ref_fp8.quantize_blocks(q, bs))
    assert_same_quantisation((k8[:, :L], s_k), ref_fp8.quantize_blocks(k, bs))
    assert_same_quantisation((vt8.permute(0, 3, 1, 2)[:, :L], s_v), ref_fp8.quantize_blocks(v, bs))
    for padded in (q8[:, L:], k8[:, L:], vt8[..., L:]):
        assert (padded.contiguous().view(torch.uint8) == 0).all(), "rows past L must be +0"


@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
@pytest.mark.parametrize("block_size", FP8_BLOCK_SIZES)
def test_launch_quantize_transposed_layout_holds_the_same_values(block_size, dtype):
    B, L, H, D = 2, 3 * block_size - 11, 2, 128
    x = random_qkv(B, L, H, H, D, dtype=dtype, seed=21, device=DEVICE)[2]
    x8, scale = tri_fp8.launch_quantize(x, block_size)
    xt8, scale_t = tri_fp8.launch_quantize(x, block_size, transpose=True)
    Lp = num_blocks(L, block_size) * block_size
    assert x8.shape == (B, Lp, H, D) and xt8.shape == (B, H, D, Lp) and xt8.is_contiguous()
    assert torch.equal(scale_t, scale)
    slots = tri_fp8.pv_key_slots(Lp, device=xt8.device)
    assert not torch.equal(slots, torch.arange(Lp, device=xt8.device))  # the keys are reordered ...
    xt8 = xt8[..., slots]  # ... and pv_key_slots puts them back
    assert torch.equal(xt8.view(torch.uint8), x8.permute(0, 2, 3, 1).contiguous().view(torch.uint8))
    assert (xt8[..., L:].contiguous().view(torch.uint8) == 0).all() and (x8[:, L:].view(torch.uint8) == 0).all()


@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
def test_triton_quantisation_of_zero_tiny_and_large_blocks(dtype):
    bs = 64
    x, _ = special_blocks(dtype, bs, 6 * bs + 37, D=128)
    x = x.to(DEVICE)  # float32 subnormals only under the interpreter (special_blocks plants them in float32 only)
    assert_same_quantisation(tri_fp8.quantize_blocks(x, bs), ref_fp8.quantize_blocks(x, bs))


@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
def test_triton_rounding_at_every_e4m3_midpoint(dtype):
    """One block (scale 1: amax 248 in [2^7, 2^8)) holding every positive e4m3 value below 256, every midpoint
    between two of them (ties: to even, 248 -> 256 carries into the next binade) and the neighbours of each midpoint
    in the input dtype, with both signs: the kernel's cast rounds as torch's does (the interpreter's emulated one
    and the GPU's cvt alike)."""
    grid = torch.arange(0, 256, dtype=torch.uint8).view(torch.float8_e4m3fn).float()
    grid = grid[torch.isfinite(grid) & (grid >= 0) & (grid < 256)].unique()  # 0 .. 240
    grid = torch.cat([grid, torch.tensor([256.0])])
    mids = (grid[1:] + grid[:-1]) / 2
    mids_in = mids.to(dtype)  # exact: a midpoint has 5 significant bits
    up = torch.nextafter(mids_in, torch.tensor(1e4, dtype=dtype))  # the neighbours in the input dtype
    down = torch.nextafter(mids_in, torch.tensor(-1e4, dtype=dtype))
    values = torch.cat([grid[:-1].to(dtype), mids_in, up, down]).float().clamp(max=248.0)
    values = torch.cat([values, -values])
    D, bs = 64, 64
    x = torch.zeros(bs * D)
    x[: values.numel()] = values
    x = x.view(1, bs, 1, D).to(dtype).to(DEVICE)
    got, expected = tri_fp8.quantize_blocks(x, bs), ref_fp8.quantize_blocks(x, bs)
    assert float(expected[1]) == 1.0
    assert_same_quantisation(got, expected)


def test_negative_values_that_round_to_zero_keep_their_sign():
    """-1e-4 next to 100 in one block (scale 2^-1): x / s ~ -2e-4 < 2^-10 rounds to zero, and the reference
    (torch's cast) gives -0 (byte 0x80). A numerical no-op (-0 and +0 multiply and add alike) but not the same bytes."""
    dtype = DTYPES[-1]
    x = torch.zeros(1, 64, 1, 64, dtype=dtype)
    x[0, 0, 0, 0], x[0, 1, 0, 1] = 100.0, -1e-4
    x = x.to(DEVICE)
    ref8, _ = ref_fp8.quantize_blocks(x, 64)
    tri8, _ = tri_fp8.quantize_blocks(x, 64)
    assert ref8.view(torch.uint8)[0, 1, 0, 1] == 0x80
    assert torch.equal(tri8.view(torch.uint8), ref8.view(torch.uint8))


def test_triton_quantisation_reads_only_rows_below_L_and_any_strides():
    """A slice x_long[:, :L] (the rows after L still in memory, and huge) and a transposed view: the kernel masks
    the rows past L (the last block's scale is its valid rows') and follows the strides."""
    dtype, bs = DTYPES[-1], 64
    L = 2 * bs + 20
    long_x = random_qkv(1, 3 * bs, 2, 2, 64, dtype=dtype, seed=22, device=DEVICE)[0]
    long_x[:, L:] = 1000.0
    x = long_x[:, :L]
    assert_same_quantisation(tri_fp8.quantize_blocks(x, bs), ref_fp8.quantize_blocks(x.contiguous(), bs))
    heads_first = random_qkv(2, 4, L, 1, 64, dtype=dtype, seed=23, device=DEVICE)[0]  # (B, H=4, L, D) storage
    y = heads_first.transpose(1, 2)  # (B, L, H, D), not contiguous
    assert_same_quantisation(tri_fp8.quantize_blocks(y, bs), ref_fp8.quantize_blocks(y.contiguous(), bs))


# ----------------------------------------------------------------------------------------------------------------
# 3. Triton FP8 attention against the reference FP8 attention, on the same lists.
# ----------------------------------------------------------------------------------------------------------------
# (B, L, Hq, Hkv, D, block_size): odd lengths, batch 1-2, GQA groups 1 / 2 / 4, D 64 / 128, both block sizes.
ATTENTION_CASES = [
    (1, 200, 2, 1, 64, 64),
    (2, 333, 4, 1, 64, 64),
    (1, 777, 2, 2, 128, 128),
    (2, 300, 2, 1, 128, 128),
]
GPU_ATTENTION_CASES = [
    (1, 4097, 8, 2, 128, 128),
    (2, 3001, 8, 1, 64, 64),
    (1, 8192, 16, 4, 128, 64),
    (1, 6000, 8, 8, 64, 128),
]


@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
@pytest.mark.parametrize("case", case_params(ATTENTION_CASES, GPU_ATTENTION_CASES))
def test_triton_fp8_attention_equals_the_reference_on_random_lists(case, dtype):
    B, L, Hq, Hkv, D, bs = case
    q, k, v = random_qkv(B, L, Hq, Hkv, D, dtype=dtype, seed=31, device=DEVICE)
    mask = random_block_mask(B, Hq, num_blocks(L, bs), keep=0.4, seed=32, device=DEVICE)  # diagonal forced
    counts, indices = lists(mask)
    out = triton_impl.block_sparse_attention_fp8(q, k, v, counts, indices, bs)
    expected = reference.block_sparse_attention_fp8(q, k, v, counts, indices, bs)
    assert_matches_reference(out, expected, (q, k, v, counts, indices, bs, None))
    # Row 0 sees key 0 alone: P = 1 and 2^8 P = 256 are exact in e4m3, so its output is key 0's dequantised value.
    v8, s_v = ref_fp8.quantize_blocks(v, bs)
    first = (v8[:, 0].float() * s_v[..., :1]).repeat_interleave(Hq // Hkv, dim=1).to(dtype)  # (B, Hq, D)
    assert torch.equal(out[:, 0], first) and torch.equal(expected[:, 0], first)


CAUSAL_CASES = [(1, 200, 2, 1, 64, 64), (1, 257, 4, 2, 128, 128)]


@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
@pytest.mark.parametrize("case", case_params(CAUSAL_CASES, GPU_ATTENTION_CASES[:1]))
def test_triton_fp8_attention_equals_the_reference_on_full_causal_lists(case, dtype):
    B, L, Hq, Hkv, D, bs = case
    q, k, v = random_qkv(B, L, Hq, Hkv, D, dtype=dtype, seed=33, device=DEVICE)
    counts, indices = lists(causal_block_mask(B, Hq, num_blocks(L, bs), device=DEVICE))
    assert_matches_reference(triton_impl.block_sparse_attention_fp8(q, k, v, counts, indices, bs),
                             reference.block_sparse_attention_fp8(q, k, v, counts, indices, bs),
                             (q, k, v, counts, indices, bs, None))


@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
@pytest.mark.parametrize("block_size", FP8_BLOCK_SIZES)
def test_empty_rows_give_zero_and_rows_without_their_diagonal(block_size, dtype):
    """Hand-made lists: some rows empty (count 0: output exactly 0), some without their diagonal block (the kernel's
    unmasked walk only), the rest random; a softmax_scale of the caller's; compared with the reference."""
    B, L, Hq, Hkv, D = 2, 5 * block_size - 3, 2, 1, 64
    M = num_blocks(L, block_size)
    q, k, v = random_qkv(B, L, Hq, Hkv, D, dtype=dtype, seed=34, device=DEVICE)
    mask = random_block_mask(B, Hq, M, keep=0.5, seed=35, device=DEVICE)
    mask[0, 0, 2] = False  # empty rows
    mask[1, 1, 0] = False
    mask[1, 0, M - 1] = False
    mask[0, 1, 3, :3] = True  # rows without their diagonal
    mask[0, 1, 3, 3] = False
    mask[1, 1, M - 1, 1] = True
    mask[1, 1, M - 1, M - 1] = False
    counts, indices = lists(mask)
    out = triton_impl.block_sparse_attention_fp8(q, k, v, counts, indices, block_size, softmax_scale=0.2)
    expected = reference.block_sparse_attention_fp8(q, k, v, counts, indices, block_size, softmax_scale=0.2)
    assert_matches_reference(out, expected, (q, k, v, counts, indices, block_size, 0.2))
    rows = lambda I: slice(I * block_size, min(L, (I + 1) * block_size))  # noqa: E731
    for b, h, I in ((0, 0, 2), (1, 1, 0), (1, 0, M - 1)):
        assert (out[b, rows(I), h] == 0).all() and (expected[b, rows(I), h] == 0).all()
    assert (out[0, rows(3), 1].abs().sum(-1) > 0).all()


@pytest.mark.parametrize("block_size", FP8_BLOCK_SIZES)
def test_chunks_of_rows_give_the_same_output(block_size):
    """launch_fp8_attention over rows (I0, I1) with that chunk's lists, as flash_prefill calls it: the chunks
    together write the whole output, equal to one launch over every row to the bit."""
    dtype = DTYPES[-1]
    B, L, Hq, Hkv, D = 1, 3 * block_size + 1, 4, 2, 64
    M = num_blocks(L, block_size)
    q, k, v = random_qkv(B, L, Hq, Hkv, D, dtype=dtype, seed=36, device=DEVICE)
    counts, indices = lists(random_block_mask(B, Hq, M, keep=0.5, seed=37, device=DEVICE))
    quantized = tri_fp8.quantize_qkv(q, k, v, block_size)
    whole = triton_impl.block_sparse_attention_fp8(q, k, v, counts, indices, block_size)
    out = torch.full_like(q, float("nan"))
    for I0, I1 in ((0, 2), (2, 3), (3, M)):  # M = 4
        tri_fp8.launch_fp8_attention(quantized, L, block_size, D**-0.5, counts, indices[:, :, I0:I1].contiguous(),
                                     out=out, rows=(I0, I1))
    torch.testing.assert_close(out, whole, rtol=0, atol=0)


# ----------------------------------------------------------------------------------------------------------------
# 4. FP8 against exact attention over the same blocks.
# ----------------------------------------------------------------------------------------------------------------
# Error bound. Each e4m3 rounding is off by at most half an ulp, 2^-4 of its operand, and round to nearest spreads
# the error evenly over that interval: RMS ~ 2^-4 / sqrt(3) ~ 0.036 of the operand (less, on average over a binade).
# The output takes V's and P's roundings directly (each ~0.036 of the output's RMS for incoherent values) and Q's and
# K's through the logits (again of that order): in quadrature ~0.07. Bound: 2^-3 of the output's Frobenius norm per
# (batch, head), 3x above the measured 0.041-0.047 (random inputs; 0.046-0.048 for bf16 inputs, reference on a
# CPU) but 8x below an output that is all wrong (zeros: 1). A worst-case elementwise bound is vacuous here (the
# logits' errors add up coherently only in theory), so the sharp elementwise statement is the row-0 one in the
# attention test (key 0 alone: exactly its dequantised value).
FP8_RELATIVE_ERROR_BOUND = 2.0**-3
FP8_RELATIVE_ERROR_FLOOR = 2.0**-7  # quantisation happened: the float16 kernel measures <= 2.4e-4, float32 ~2e-7
# e4m3 keeps 3 mantissa bits, bf16 7, fp16 10: 2^4 and 2^7 times coarser. Measured ratios of the relative errors:
# ~150 (fp16 kernel, interpreter), ~29 (bf16, reference on a CPU: 0.0016 vs 0.047); 4 leaves room for the bf16
# kernel's own rounding of P.
FP8_VS_NATIVE_RATIO = 4.0


def relative_errors(out, exact):
    """||out - exact|| / ||exact|| per (batch, head), float64."""
    diff = (out.double() - exact).transpose(1, 2).flatten(2)
    return diff.norm(dim=-1) / exact.transpose(1, 2).flatten(2).norm(dim=-1)


EXACT_CASES = [(1, 300, 4, 2, 64, 64), (1, 257, 2, 1, 128, 128)]
GPU_EXACT_CASES = [(1, 2049, 8, 2, 128, 128), (1, 3000, 4, 1, 64, 64)]


@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
@pytest.mark.parametrize("case", case_params(EXACT_CASES, GPU_EXACT_CASES))
def test_fp8_error_against_exact_attention(case, dtype):
    B, L, Hq, Hkv, D, bs = case
    q, k, v = random_qkv(B, L, Hq, Hkv, D, dtype=dtype, seed=41, device=DEVICE)
    counts, indices = lists(random_block_mask(B, Hq, num_blocks(L, bs), keep=0.5, seed=42, device=DEVICE))
    exact = reference.block_sparse_attention(q.double(), k.double(), v.double(), counts, indices, bs)
    native = triton_impl.block_sparse_attention(q, k, v, counts, indices, bs)  # the bf16 / fp16 (float32) kernel
    fp8_out = triton_impl.block_sparse_attention_fp8(q, k, v, counts, indices, bs)
    ref_out = reference.block_sparse_attention_fp8(q, k, v, counts, indices, bs)
    native_err = relative_errors(native, exact)
    for out in (fp8_out, ref_out):
        err = relative_errors(out, exact)
        assert (err <= FP8_RELATIVE_ERROR_BOUND).all(), err
        assert (err >= FP8_RELATIVE_ERROR_FLOOR).all(), err
        assert (err >= FP8_VS_NATIVE_RATIO * native_err).all(), (err, native_err)
        max_err = float((out.double() - exact).abs().max())
        assert max_err >= FP8_VS_NATIVE_RATIO * float((native.double() - exact).abs().max())


def test_reference_takes_any_power_of_two_block_size():
    """Block size 32 (refused by the kernel, FP8_BLOCK_SIZES): the reference runs it, within the same bound of exact
    attention, and scales per 32-row block."""
    B, L, Hq, Hkv, D, bs = 1, 150, 2, 1, 64, 32
    q, k, v = random_qkv(B, L, Hq, Hkv, D, seed=43)
    counts, indices = lists(random_block_mask(B, Hq, num_blocks(L, bs), keep=0.5, seed=44))
    out = reference.block_sparse_attention_fp8(q, k, v, counts, indices, bs)
    exact = reference.block_sparse_attention(q.double(), k.double(), v.double(), counts, indices, bs)
    err = relative_errors(out, exact)
    assert ((err <= FP8_RELATIVE_ERROR_BOUND) & (err >= FP8_RELATIVE_ERROR_FLOOR)).all(), err
    assert ref_fp8.quantize_blocks(q, bs)[1].shape == (B, Hq, num_blocks(L, bs))
    v8, s_v = ref_fp8.quantize_blocks(v, bs)
    assert torch.equal(out[:, 0], (v8[:, 0].float() * s_v[..., :1]).repeat_interleave(Hq // Hkv, dim=1))


# ----------------------------------------------------------------------------------------------------------------
# 5. flash_prefill(fp8=True)
# ----------------------------------------------------------------------------------------------------------------
FLASH_PREFILL_KW = dict(alpha=0.3, sink_blocks=1, window_blocks=1, last_dense_blocks=0)  # sparse at short lengths
FLASH_PREFILL_CASES = [(1, 450, 4, 2, 64, 64), (2, 520, 2, 1, 128, 128)]
GPU_FLASH_PREFILL_CASES = [(1, 16384, 16, 4, 128, 128), (2, 6000, 8, 1, 64, 64)]


@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
@pytest.mark.parametrize("case", case_params(FLASH_PREFILL_CASES, GPU_FLASH_PREFILL_CASES))
def test_flash_prefill_fp8_keeps_the_selection_and_matches_the_reference(case, dtype):
    B, L, Hq, Hkv, D, bs = case
    q, k, v = planted_qkv(B, L, Hq, Hkv, D, seed=51, dtype=dtype, device=DEVICE)
    kw = dict(FLASH_PREFILL_KW, block_size=bs, return_stats=True)
    out, stats = triton_impl.flash_prefill(q, k, v, fp8=True, **kw)
    assert float(stats.density) < 0.9
    if not HAS_CUDA:
        # The reference's selection, block for block (float32 / float16 scores: no threshold tie in these inputs),
        # and its FP8 attention over it.
        expected, ref_stats = reference.flash_prefill(q, k, v, fp8=True, **kw)
        assert torch.equal(stats.counts, ref_stats.counts) and torch.equal(stats.indices, ref_stats.indices)
        assert_matches_reference(out, expected, None)
    else:
        # bf16 scores may sit at a threshold tie that the reference breaks the other way: the selection is compared
        # with the kernel's own fp8=False call (stage 5 only changes), the output with the reference on its lists.
        _, plain = triton_impl.flash_prefill(q, k, v, **kw)
        assert torch.equal(stats.counts, plain.counts) and torch.equal(stats.indices, plain.indices)
        assert_matches_reference(out, reference.block_sparse_attention_fp8(q, k, v, stats.counts, stats.indices, bs),
                                 (q, k, v, stats.counts, stats.indices, bs, None))


def test_flash_prefill_fp8_in_chunks_of_query_blocks():
    """A small max_selection_bytes: selection and FP8 attention chunk by chunk (Q, K, V quantised once): the same
    output to the bit as one chunk, and as the reference's flash_prefill(fp8=True)."""
    dtype = DTYPES[-1]
    B, L, Hq, Hkv, D, bs = 1, 450, 2, 1, 64, 64
    M = num_blocks(L, bs)
    q, k, v = planted_qkv(B, L, Hq, Hkv, D, seed=52, dtype=dtype, device=DEVICE)
    kw = dict(FLASH_PREFILL_KW, block_size=bs)
    whole = triton_impl.flash_prefill(q, k, v, fp8=True, **kw)
    budget = B * Hq * M * 8 * 3  # 8 bytes per (query block, key block) pair: chunks of 3 query blocks
    chunked = triton_impl.flash_prefill(q, k, v, fp8=True, max_selection_bytes=budget, **kw)
    torch.testing.assert_close(chunked, whole, rtol=0, atol=0)
    single_rows = triton_impl.flash_prefill(q, k, v, fp8=True, max_selection_bytes=1, **kw)
    torch.testing.assert_close(single_rows, whole, rtol=0, atol=0)
    expected, stats = reference.flash_prefill(q, k, v, fp8=True, return_stats=True, **kw)
    assert_matches_reference(chunked, expected, (q, k, v, stats.counts, stats.indices, bs, None))


@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
def test_query_tiles_of_half_a_block_give_the_same_output(dtype):
    """Query tiles of half a block at Bs = 128 (two programs per query block, each with the block's scale; the
    default up to FP8_SHORT_MAX_LENGTH tokens, so the other tests run it) compute every row as whole-block tiles (the
    default beyond) do: the same output to the bit, except in float32 under the interpreter, where tl.dot is numpy's
    matmul, whose float32 sums are ordered by the matrix's height (a 64-row product differs from the top half of a
    128-row one in the last bits): there to float32 rounding."""
    B, L, Hq, Hkv, D, bs = 1, 3 * 128 - 5, 4, 2, 64, 128
    q, k, v = random_qkv(B, L, Hq, Hkv, D, dtype=dtype, seed=36, device=DEVICE)
    counts, indices = lists(random_block_mask(B, Hq, num_blocks(L, bs), keep=0.6, seed=37, device=DEVICE))
    quantized = tri_fp8.quantize_qkv(q, k, v, bs)
    whole, halves = (tri_fp8.launch_fp8_attention(quantized, L, bs, D ** -0.5, counts, indices,
                                                  out=torch.full_like(q, float("nan")), config=config)
                     for config in (tri_fp8.FP8_CONFIG, tri_fp8.FP8_SHORT_CONFIG))
    exact = dtype != torch.float32
    torch.testing.assert_close(halves, whole, rtol=0 if exact else 1e-6, atol=0 if exact else 1e-6)


def test_the_launch_configuration_follows_the_length():
    short = tri_fp8.FP8_SHORT_MAX_LENGTH
    assert tri_fp8.FP8_SHORT_CONFIG["block_m"] == 64 and tri_fp8.FP8_CONFIG["block_m"] is None  # None: Bs
    assert tri_fp8.fp8_config(short, 128) is tri_fp8.FP8_SHORT_CONFIG
    assert tri_fp8.fp8_config(short + 1, 128) is tri_fp8.FP8_CONFIG
    assert tri_fp8.fp8_config(1024, 64) is tri_fp8.FP8_CONFIG  # a block of 64 rows is one tile already


@pytest.mark.parametrize("impl", [reference, triton_impl], ids=["reference", "triton"])
@pytest.mark.parametrize("other", [dict(mean_correction=True), dict(return_lse=True),
                                   dict(mean_correction=True, return_lse=True)],
                         ids=["mean_correction", "return_lse", "both"])
def test_flash_prefill_fp8_refuses_mean_correction_and_lse(impl, other):
    q, k, v = random_qkv(1, 128, 2, 1, 64, dtype=DTYPES[-1], device=DEVICE)
    with pytest.raises(ValueError, match=r"fp8=True runs without mean_correction and return_lse"):
        impl.flash_prefill(q, k, v, block_size=64, fp8=True, **other)


@pytest.mark.parametrize("impl", [reference, triton_impl], ids=["reference", "triton"])
@pytest.mark.parametrize("value", [1, "yes", None])
def test_flash_prefill_fp8_must_be_a_bool(impl, value):
    q, k, v = random_qkv(1, 128, 2, 1, 64, dtype=DTYPES[-1], device=DEVICE)
    with pytest.raises(TypeError, match=r"^fp8 must be a bool"):
        impl.flash_prefill(q, k, v, block_size=64, fp8=value)


# ----------------------------------------------------------------------------------------------------------------
# 6. Argument checks
# ----------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("block_size", [16, 32, 256])
def test_triton_refuses_block_sizes_other_than_64_and_128(block_size):
    """Sizes the other kernels take (triton_impl.common.BLOCK_SIZES) but the FP8 kernel does not: a ValueError
    naming block_size from every FP8 entry point, before any launch."""
    L = 2 * block_size + 3
    q, k, v = random_qkv(1, L, 2, 1, 64, dtype=DTYPES[-1], device=DEVICE)
    counts, indices = lists(causal_block_mask(1, 2, num_blocks(L, block_size), device=DEVICE))
    match = rf"^block_size {block_size} is not supported by the FP8 attention kernel; expected one of 64, 128"
    with pytest.raises(ValueError, match=match):
        triton_impl.block_sparse_attention_fp8(q, k, v, counts, indices, block_size)
    with pytest.raises(ValueError, match=match):
        tri_fp8.quantize_blocks(q, block_size)
    with pytest.raises(ValueError, match=match):
        triton_impl.flash_prefill(q, k, v, block_size=block_size, fp8=True)
    assert reference.block_sparse_attention_fp8(q, k, v, counts, indices, block_size).shape == q.shape


def malformed_lists(M: int):
    """(id, counts, indices, message) for (B, Hq) = (1, 2): each breaks one rule of check_block_lists."""
    counts, indices = lists(causal_block_mask(1, 2, M))
    cases = []
    c = counts.clone()
    c[0, 1, 1] = 3  # row 1 lists 3 blocks: more than I + 1
    cases.append(("count-above-diagonal", c, indices, BAD_COUNTS))
    c = counts.clone()
    c[0, 0, 2] = -1
    cases.append(("negative-count", c, indices, BAD_COUNTS))
    i = indices.clone()
    i[0, 0, 1, 1] = 2  # row 1 lists block 2: above its diagonal
    cases.append(("non-causal-index", counts, i, BAD_INDEX))
    i = indices.clone()
    i[0, 1, 2, :3] = torch.tensor([0, 2, 1], dtype=torch.int32)
    cases.append(("not-ascending", counts, i, NOT_ASCENDING))
    return cases


@pytest.mark.parametrize("case", malformed_lists(4), ids=lambda c: c[0] if isinstance(c, tuple) else None)
def test_malformed_lists_are_refused_when_validating(case):
    _, counts, indices, message = case
    bs = 64
    q, k, v = random_qkv(1, 4 * bs - 7, 2, 1, 64, dtype=DTYPES[-1], device=DEVICE)
    counts, indices = counts.to(DEVICE), indices.to(DEVICE)
    with pytest.raises(ValueError, match=re.escape(message)):
        reference.block_sparse_attention_fp8(q, k, v, counts, indices, bs)  # validate=True by default
    with pytest.raises(ValueError, match=re.escape(message)):
        triton_impl.block_sparse_attention_fp8(q, k, v, counts, indices, bs, validate=True)


def test_triton_validate_is_a_bool_and_unvalidated_garbage_is_never_read_outside():
    """validate must be a bool; with validate=False (the default), counts and ids far outside the tensors give wrong
    rows, never a read out of bounds or a NaN (the walk clamps the count to I + 1 and each id into [0, I - 1])."""
    bs = 64
    B, L, Hq, Hkv, D = 1, 3 * bs + 5, 2, 1, 64
    q, k, v = random_qkv(B, L, Hq, Hkv, D, dtype=DTYPES[-1], seed=61, device=DEVICE)
    M = num_blocks(L, bs)
    counts, indices = lists(causal_block_mask(B, Hq, M, device=DEVICE))
    with pytest.raises(TypeError, match=r"^validate must be a bool"):
        triton_impl.block_sparse_attention_fp8(q, k, v, counts, indices, bs, validate=1)
    counts = torch.full((B, Hq, M), 10**6, dtype=torch.int32, device=DEVICE)
    indices = torch.full((B, Hq, M, M), 10**8, dtype=torch.int32, device=DEVICE)
    indices[..., 1::2] = -(10**8)
    out = triton_impl.block_sparse_attention_fp8(q, k, v, counts, indices, bs)
    assert out.shape == q.shape and not out.isnan().any()


def test_shapes_and_dtypes_are_checked_like_the_other_attention_entry_points():
    q, k, v = random_qkv(1, 128, 2, 1, 64, dtype=DTYPES[-1], device=DEVICE)
    counts, indices = lists(causal_block_mask(1, 2, 2, device=DEVICE))
    for impl in (reference, triton_impl):
        with pytest.raises(ValueError, match=r"^counts must have shape"):
            impl.block_sparse_attention_fp8(q, k, v, counts[:, :, :1], indices, 64)
        with pytest.raises(TypeError, match=r"^counts has dtype torch\.int64"):
            impl.block_sparse_attention_fp8(q, k, v, counts.long(), indices, 64)
        with pytest.raises(ValueError, match=r"^block_size must be a power of two"):
            impl.block_sparse_attention_fp8(q, k, v, counts, indices, 96)
    with pytest.raises(TypeError, match=r"q has dtype torch\.float64"):
        triton_impl.block_sparse_attention_fp8(q.double(), k.double(), v.double(), counts, indices, 64)


@pytest.mark.parametrize("impl", [ref_fp8, tri_fp8], ids=["reference", "triton"])
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")], ids=["nan", "inf", "-inf"])
def test_a_non_finite_value_makes_its_block_scale_nan_and_its_readers_nan(impl, bad):
    """A NaN or inf in a block gives that block the scale NaN (a finite wrong value would be the worst outcome), so
    every row reading the block is NaN and the others are untouched; both packages agree row for row."""
    dtype = DTYPES[-1]
    bs, L = 64, 4 * 64
    q, k, v = random_qkv(1, L, 2, 1, 64, dtype=dtype, seed=3, device=DEVICE)
    k[0, bs + 5, 0, 7] = bad  # key block 1
    k8, scale = impl.quantize_blocks(k, bs)
    assert scale[0, 0, 1].isnan() and torch.isfinite(scale[0, 0, [0, 2, 3]]).all()
    counts, indices = reference.compact_blocks(causal_block_mask(1, 2, L // bs, device=DEVICE))
    out = impl.block_sparse_attention_fp8(q, k, v, counts, indices, bs)
    rows_nan = out.isnan().any(dim=-1).any(dim=-1)[0]  # (L,)
    assert not rows_nan[:bs].any() and rows_nan[bs:].all()  # block 0 never reads block 1; every later row does


def test_triton_quantisation_refuses_inputs_that_require_grad():
    """Like every Triton entry point: no backward, so an input autograd would track is refused, not quantised."""
    x = torch.randn(1, 64, 1, 64, dtype=DTYPES[-1], device=DEVICE, requires_grad=True)
    with torch.enable_grad(), pytest.raises(RuntimeError, match="inference-only"):
        tri_fp8.quantize_blocks(x, 64)
    with torch.no_grad():
        tri_fp8.quantize_blocks(x, 64)
