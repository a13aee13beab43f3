"""Readable pure-PyTorch reference of FlashPrefill (arXiv 2603.06199). Runs on CPU and CUDA.

Stage by stage, in the order `flash_prefill` calls them:

1. `mean_pool_keys`     kbar: the mean proxy of each key block
2. `block_scores`       Score: block max + block sum of exponentials, reweighted by the row max (Eq. 1-2)
3. `select_blocks`      keep Score >= alpha * max, plus sinks, local window, dense last rows (Eq. 3)
4. `compact_blocks`     ascending lists of kept key blocks + counts (`select_and_compact`: stages 3-4 in one call;
                        `lists_to_mask`: the inverse of compact_blocks)
5. `block_sparse_attention` (physical skip) / `block_sparse_attention_logical` (logical skip);
   `block_sparse_attention_fp8` (fp8.py, `flash_prefill(..., fp8=True)`): the physical skip with Q, K, V and P in
   e4m3, as Hopper's FP8 tensor cores run it

`flash_prefill_varlen` (varlen.py) runs the same stages on serving-style calls: packed variable-length batches
(FlashAttention's cu_seqlens layout) and chunked prefill over a cached prefix (docs/DESIGN.md section 9); it has
no Triton twin yet.

`dense_attention` is the exact causal ground truth. `triton_impl` exports the same names (lists_to_mask, a test
and plotting aid, and merge_attention_states, which combines two attentions' outputs through their log-sum-exp
(`return_lse=True`), are re-exported there unchanged). The peers' selectors live in `peers/`, pictures in `viz/`.

Everything here is differentiable (the selection, stages 3-4, is discrete and passes no gradient). NaN and inf behave
as in dense attention; a row that sees no key at all gives 0 (reference/attention.py says which rows a non-finite
key or value reaches).
"""

from .attention import block_sparse_attention, block_sparse_attention_logical, dense_attention, merge_attention_states
from .flash_prefill import PAPER_ALPHA, FlashPrefillStats, flash_prefill
from .fp8 import block_sparse_attention_fp8
from .pooling import mean_pool_keys
from .scoring import block_scores
from .selection import causal_block_density, compact_blocks, lists_to_mask, select_and_compact, select_blocks
from .varlen import VarlenStats, flash_prefill_varlen

__all__ = [
    "mean_pool_keys",
    "block_scores",
    "select_blocks",
    "compact_blocks",
    "select_and_compact",
    "lists_to_mask",
    "block_sparse_attention",
    "block_sparse_attention_logical",
    "dense_attention",
    "block_sparse_attention_fp8",
    "merge_attention_states",
    "flash_prefill",
    "FlashPrefillStats",
    "causal_block_density",
    "PAPER_ALPHA",
    "flash_prefill_varlen",
    "VarlenStats",
]
