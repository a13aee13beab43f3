"""Triton kernels for FlashPrefill, with the same public names and signatures as `reference`.

Kernels run on CUDA tensors, or on CPU tensors under the Triton interpreter (TRITON_INTERPRET=1, set before
triton is imported; float16 and float32 only there: the interpreter computes tl.dot on bfloat16 wrongly). Each stage
lives in the file that mirrors its reference twin (pooling, scoring, selection, attention, flash_prefill), and
common.py holds what the kernels share (what they admit: dtypes, head dims, block sizes; the checks of it).

Two entry points per stage: the public function (`mean_pool_keys`, `block_scores`, `select_and_compact`,
`block_sparse_attention`, ...) checks its inputs and raises a clear error, as the reference does; its `launch_*` twin
in the same file (`launch_mean_pool`, `launch_block_scores`, `launch_select_and_compact`, `launch_attention`)
launches the kernel without any check, for callers that have checked once already (`flash_prefill`, the
benchmarks). Bad input to a `launch_*` function is undefined behaviour; use the public functions.

`mean_correction=True` (FlashPrefill V2, Eq. 6: the pruned blocks below the diagonal as their means) runs in the
attention kernel as in the reference: `block_sparse_attention`, `block_sparse_attention_logical`, `flash_prefill`.
`block_sparse_attention_fp8` / `flash_prefill(..., fp8=True)` (fp8.py): the physical skip with Q, K, V and P
quantised per block to e4m3, for Hopper's FP8 tensor cores (block_size 64 or 128, compute capability 9.0+).
`return_lse=True` (every attention entry point) stores each row's log-sum-exp from the kernel's running softmax
state; `merge_attention_states`, which combines two partial attentions through it, is the reference's function
(plain torch arithmetic on the outputs: no kernel of its own).

Inference-only: the kernels have no backward, so every entry point raises a RuntimeError when autograd would track an
input (use torch.no_grad() / torch.inference_mode(), or the differentiable `reference`). NaN and inf propagate as in
dense attention, as in the reference (docs/DESIGN.md section 2).
"""

from reference.attention import merge_attention_states
from reference.flash_prefill import PAPER_ALPHA, FlashPrefillStats
from reference.varlen import VarlenStats
from reference.selection import causal_block_density, lists_to_mask

from .attention import block_sparse_attention, block_sparse_attention_logical, dense_attention
from .flash_prefill import flash_prefill
from .fp8 import block_sparse_attention_fp8
from .pooling import mean_pool_keys
from .scoring import block_scores
from .selection import compact_blocks, select_and_compact, select_blocks
from .varlen import flash_prefill_varlen

__all__ = [
    "mean_pool_keys",
    "block_scores",
    "select_blocks",
    "compact_blocks",
    "select_and_compact",
    "block_sparse_attention",
    "block_sparse_attention_logical",
    "dense_attention",
    "block_sparse_attention_fp8",
    "merge_attention_states",
    "flash_prefill",
    "flash_prefill_varlen",
    "FlashPrefillStats",
    "VarlenStats",
    "causal_block_density",
    "lists_to_mask",
    "PAPER_ALPHA",
]
