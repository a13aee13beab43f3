"""The block selectors of FlashPrefill's two peers, written by us from their papers, in FlashPrefill's list format.

* `flexprefill_select`  FlexPrefill (Lai et al., ICLR 2025, arXiv 2502.20766): per head, a vertical-slash pattern
                        estimated from the last query block, or a query-aware pattern from block-pooled Q and K,
                        chosen by a Jensen-Shannon test against tau; both cover a fraction gamma of the estimated
                        attention mass, with a minimum budget.                               (peers/flexprefill.py)
* `xattention_select`   XAttention (Xu et al., ICML 2025, arXiv 2503.16428): every block is scored by the sum of
                        its strided antidiagonals of softmax(Q K^T), and each query block keeps the fewest key blocks
                        whose cumulative score reaches a fraction tau (`threshold`) of its row. (peers/xattention.py)

Both return exactly what `reference.compact_blocks` returns, (counts (B, Hq, M) int32, indices (B, Hq, M, N) int32,
ascending, valid up to counts), so `reference.block_sparse_attention` / `triton_impl.block_sparse_attention` run
them unchanged and `reference.causal_block_density(counts)` measures them like FlashPrefill.

Conventions shared with the rest of the repo: q (B, L, Hq, D), k (B, L, Hkv, D); query head h reads kv head
h // (Hq / Hkv) (selection is per query head); blocks of Bs tokens, M = N = ceil(L / Bs); causal (a key block above
the diagonal is never kept). Everything is vectorised over batch and heads, except two loops that bound memory at
long L (the chunk sizes change no result). Estimates are computed in float32 (float64 for float64 inputs). Both are
written from the papers' descriptions for understanding; no code was copied from the official repositories.

This package imports `reference` only. `block_selectors` names both of them beside FlashPrefill, with their knobs
and paper defaults, for the transformers backend and the experiments.
"""

from .flexprefill import FLEXPREFILL_DEFAULTS, check_flexprefill_params, flexprefill_select
from .xattention import XATTENTION_DEFAULTS, check_xattention_params, xattention_block_scores, xattention_select

__all__ = ["flexprefill_select", "xattention_select", "xattention_block_scores", "FLEXPREFILL_DEFAULTS",
           "XATTENTION_DEFAULTS", "check_flexprefill_params", "check_xattention_params"]
