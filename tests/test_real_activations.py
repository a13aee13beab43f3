"""Differential tests on real activations: triton_impl against the reference on SmolLM2's own q / k / v.

The inputs are the post-RoPE query / key / value tensors that `python -m repro.dump_activations` writes to the
git-ignored repro/activations/ (one 8K-token NIAH prompt, a few layers of SmolLM2-135M: Hq=9, Hkv=3, D=64).
Without a dump every test here is skipped, with the command that makes one.

The same three rules as the synthetic tests (tools/oracle.py), on attention patterns the planted inputs
only imitate (real sinks, local bands and retrieval heads, and real dynamic range):

* block scores: triton_impl.block_scores == reference.block_scores in float64, to float32 rounding;
* block set: triton_impl.flash_prefill keeps the same blocks as the reference's selection on float64 scores,
  except at threshold ties;
* output: FlashAttention's 2x rule against a float64 oracle on the block set the kernel itself chose.

On CPU the kernels run under the Triton interpreter, so each layer is cut to its first 1024 tokens (a causal
prefix of real activations is the activations of the prompt's prefix), with 64-token blocks and a safety net
scaled down with them (1 sink block, a 2-block window, 1 dense last row: at 1024 tokens the paper's net would
cover nearly every block and leave the threshold nothing to decide). Each layer runs in one dtype, float16 (the
dump's own) for one and float32 for the other: the file takes about 12 s on an idle 2-core CPU (about 50 s when
the cores are shared). On a GPU every dumped layer runs at its full length with the paper's parameters, in
bfloat16 and float16.
"""

from __future__ import annotations

import functools

import pytest
import torch

import reference
import triton_impl
from reference import lists_to_mask
from repro.capture import ACTIVATIONS_DIR, DEFAULT_LAYERS, load_activations
from tools.oracle import block_set_differences, block_sets_agree, flash_rule

HAS_CUDA = torch.cuda.is_available()
DEVICE = "cuda" if HAS_CUDA else "cpu"
ALPHA = 0.12  # the default alpha; a test input, nothing is tuned on it

# (layer, dtype, length, selection parameters) per case.
CPU_SELECTION = dict(block_size=64, sink_blocks=1, window_blocks=2, last_dense_blocks=1)
PAPER_SELECTION = dict(block_size=128, sink_blocks=2, window_blocks=4, last_dense_blocks=2)
CPU_CASES = [(15, torch.float16, 1024, CPU_SELECTION), (29, torch.float32, 1024, CPU_SELECTION)]
GPU_CASES = [(layer, dtype, None, PAPER_SELECTION)  # a layer the dump lacks is skipped
             for layer in DEFAULT_LAYERS for dtype in (torch.bfloat16, torch.float16)]


def case_id(case) -> str:
    layer, dtype, length, sel = case
    return f"layer{layer:02d}-L{length or 'all'}-{str(dtype).replace('torch.', '')}-bs{sel['block_size']}"


ALL_CASES = [pytest.param(c, id=case_id(c)) for c in CPU_CASES] + [
    pytest.param(c, id=case_id(c), marks=pytest.mark.gpu) for c in GPU_CASES
]


@functools.lru_cache(maxsize=1)
def dumped_layers() -> dict[int, tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """Every dumped layer, in the dump's own float16, on the CPU (about 16 MB per layer at 8K tokens)."""
    return load_activations(dtype=torch.float16)


def real_qkv(case):
    """(q, k, v) of the case's layer, cut to its length, in its dtype, on DEVICE; skips when there is no dump."""
    layer, dtype, length, _ = case
    acts = dumped_layers()
    if not acts:
        pytest.skip(f"no real activation dumps in {ACTIVATIONS_DIR} (make them with: python -m repro.dump_activations)")
    if layer not in acts:
        pytest.skip(f"layer {layer} is not in the dump in {ACTIVATIONS_DIR} (layers there: {sorted(acts)})")
    return tuple(t[:, :length].to(DEVICE, dtype).contiguous() for t in acts[layer])


_RUNS: dict[str, tuple] = {}


def triton_run(case):
    """triton_impl.flash_prefill on the case, run once and shared by the block-set and the output tests."""
    key = case_id(case)
    if key not in _RUNS:
        if len(_RUNS) >= 2:  # the GPU cases are many and large: keep the last two
            _RUNS.pop(next(iter(_RUNS)))
        q, k, v = real_qkv(case)
        out, stats = triton_impl.flash_prefill(q, k, v, alpha=ALPHA, return_stats=True, **case[3])
        _RUNS[key] = (q, k, v, out, stats)
    return _RUNS[key]


@pytest.mark.parametrize("case", ALL_CASES)
def test_block_scores_match_float64_reference(case):
    q, k, v = real_qkv(case)
    bs = case[3]["block_size"]
    kbar = reference.mean_pool_keys(k, bs)
    scores = triton_impl.block_scores(q, kbar, bs)
    expected = reference.block_scores(q.double(), kbar.double(), bs)
    assert scores.dtype == torch.float32 and scores.shape == expected.shape
    torch.testing.assert_close(scores.double(), expected, rtol=1e-4, atol=1e-6)
    assert (scores.triu(1) == 0).all(), "J > I must score exactly 0"


@pytest.mark.parametrize("case", ALL_CASES)
def test_flash_prefill_selects_the_reference_block_set(case):
    q, k, v, out, stats = triton_run(case)
    sel = case[3]
    bs = sel["block_size"]
    ref_scores = reference.block_scores(q.double(), reference.mean_pool_keys(k.double(), bs), bs)
    net = {key: value for key, value in sel.items() if key != "block_size"}
    ref_mask = reference.select_blocks(ref_scores, ALPHA, **net)
    mask = lists_to_mask(stats.counts, stats.indices)
    n_differ, n_off_tie = block_set_differences(mask, ref_mask, ref_scores, ALPHA)
    assert n_off_tie == 0, f"{n_off_tie} blocks differ off a threshold tie"
    assert block_sets_agree(mask, ref_mask, ref_scores, ALPHA), f"{n_differ} threshold ties: too many"
    assert torch.equal(mask.sum(-1, dtype=torch.int32), stats.counts)
    # Not a vacuous check: on real attention the threshold drops blocks the safety net does not force.
    assert stats.density.item() < 1, "every causal block kept: the selection was not exercised"


@pytest.mark.parametrize("case", ALL_CASES)
def test_flash_prefill_output_on_its_own_block_set(case):
    q, k, v, out, stats = triton_run(case)
    assert out.dtype == q.dtype and out.shape == q.shape
    assert not out.isnan().any(), "kernel left NaN (unwritten or invalid) elements"
    mask = lists_to_mask(stats.counts, stats.indices)
    ok, err, pt_err = flash_rule(out, q, k, v, mask, case[3]["block_size"])
    assert ok, f"max error {err:.3g} > 2 x PyTorch's {pt_err:.3g} + 1e-5"
