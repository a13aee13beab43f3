"""Every block selector of the repository in one table, for the transformers backend and the experiments.

    SELECTORS["flashprefill" | "flexprefill" | "xattention"] -> Selector
    Setting(selector, value, impl)                           -> one point of an experiment (or "full": dense)

A `Selector` names a selector, its knob (the one parameter the experiments sweep), the knob's paper default, the
parameters a caller may set with their paper defaults, a check of those parameters that needs no tensors, and one
select function per implementation: select(q, k, *, block_size, softmax_scale, **params) -> (counts, indices) in
`reference.compact_blocks`' format (ascending lists, -1 past counts). FlashPrefill has a "reference" and a "triton"
implementation (its stages 1-4); the peers (`peers/`, our PyTorch from their papers) have "reference" only.

This package sits above reference/, triton_impl/ and peers/ and below flashprefill_hf/ and repro/
(docs/ARCHITECTURE.md); triton_impl is imported only when its implementation runs.
"""

from .registry import FULL, PEERS, SELECTORS, Selector, Setting, flashprefill_select, flashprefill_select_triton

__all__ = ["SELECTORS", "PEERS", "FULL", "Selector", "Setting", "flashprefill_select", "flashprefill_select_triton"]
