"""The transformers backend's serving path: padded batches and cached prefixes through `flash_prefill_varlen`.

On tiny random models (tests/test_hf_backend.py), what is pinned:

* the layout read off the mask (flashprefill_hf/layout.py): left / right padding, a chunk after its cached prefix,
  boolean and additive masks; padding inside a prompt, a custom mask or a static cache are refused; the mask is
  read once per mask tensor (not per layer) and again after an in-place change;
* a padded batch at alpha > 0 gives each row the logits of that prompt prefilled alone, and `generate` on a
  left-padded batch the tokens of each prompt generated alone, with the recorder saying "varlen" and no warning;
* chunked prefill: block-aligned chunks (last_dense_blocks 0, since every backend call ends its prompt) give the
  one-shot logits; any chunking at alpha 0 gives eager attention's; a multi-turn `generate` continuing its cache
  runs FlashPrefill for the second turn's prefill;
* the peers (no varlen selection) fall back with a warning; the Triton branch (interpreter on the CPU, bf16 on a
  GPU) gives the reference's logits on the same calls.
"""

from __future__ import annotations

import warnings
from contextlib import nullcontext

import pytest
import torch

transformers = pytest.importorskip("transformers")

import flashprefill_hf  # noqa: E402
from flashprefill_hf import FlashPrefillFallbackWarning, layout  # noqa: E402
from test_hf_backend import (BLOCK, HAS_CUDA, KERNEL_SHAPE, PEER_PRUNE, _bf16_rule, allow_triton_on_cpu,  # noqa: E402, F401
                             fp_config, logits, no_triton_on_cpu, peer_config, tiny_model, tokens)

PAD = 0


@pytest.fixture
def caught():
    with warnings.catch_warnings(record=True) as log:
        warnings.simplefilter("always")
        yield log


def fallbacks(caught) -> list[str]:
    return [str(w.message) for w in caught if issubclass(w.category, FlashPrefillFallbackWarning)]


def padded(prompts: list[torch.Tensor], side: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(ids, attention_mask) of 1-D prompts padded to the longest, on the left or the right."""
    L = max(len(p) for p in prompts)
    ids, mask = torch.full((len(prompts), L), PAD), torch.zeros(len(prompts), L, dtype=torch.long)
    for b, p in enumerate(prompts):
        span = slice(L - len(p), L) if side == "left" else slice(0, len(p))
        ids[b, span], mask[b, span] = p, 1
    return ids, mask


def chunked_logits(model, ids: torch.Tensor, bounds: list[int], declare: bool = False) -> torch.Tensor:
    """Logits of ids (1, L) prefilled in the chunks [0, b1), [b1, b2), ..., each continuing the previous cache;
    declare: the chunks before the last run inside `more_chunks_follow` (no dense last blocks)."""
    cache, parts = transformers.DynamicCache(), []
    with torch.no_grad(), warnings.catch_warnings():
        warnings.filterwarnings("ignore", ".*past_key_values.*", FutureWarning)  # 5.24 renames it; 5.0 needs it
        for lo, hi in zip([0] + bounds, bounds + [ids.shape[1]]):
            continued = flashprefill_hf.more_chunks_follow(model) if declare and hi < ids.shape[1] else nullcontext()
            with continued:
                parts.append(model(ids[:, lo:hi], past_key_values=cache, use_cache=True).logits)
    return torch.cat(parts, 1)


def layouts(cfg) -> list[tuple]:
    return [(r["length"], r["path"], r.get("layout"), r.get("prefix")) for r in cfg.recorder.records]


# --------------------------------------------------------------------------------------------------------------
# The layout read off the mask
# --------------------------------------------------------------------------------------------------------------
def causal_mask(valid: torch.Tensor, Lq: int) -> torch.Tensor:
    """transformers' mask: (B, 1, Lq, Lk) = valid key & key position <= the query's (the last Lq positions)."""
    Lk = valid.shape[1]
    pos = torch.arange(Lk - Lq, Lk)
    return (valid[:, None, None, :].bool() & (torch.arange(Lk)[None, None, None, :] <= pos[None, None, :, None]))


def test_layout_of_left_and_right_padding_and_a_prefix():
    valid = torch.ones(3, 10, dtype=torch.bool)
    valid[0, :3] = False  # left padding
    valid[1, 7:] = False  # right padding
    got = layout.read_layout(causal_mask(valid, 10), 3, 10, 10)
    assert (got.q_start, got.q_end, got.k_start, got.k_end) == ((3, 0, 0), (10, 7, 10), (3, 0, 0), (10, 7, 10))
    assert got.cu_seqlens_q.tolist() == [0, 7, 14, 24] and got.max_seqlen_q == 10 and not got.is_full
    # A chunk of 4 after a prefix of 6 (row 0: the first 2 keys padding): bottom-right, prefix 4 and 6.
    valid = torch.ones(2, 10, dtype=torch.bool)
    valid[0, :2] = False
    got = layout.read_layout(causal_mask(valid, 4), 2, 4, 10)
    assert (got.q_start, got.q_end, got.k_start, got.k_end, got.prefix) == ((0, 0), (4, 4), (2, 0), (10, 10), 6)
    assert got.q_rows.tolist() == [0, 1, 2, 3, 4, 5, 6, 7] and got.k_rows.tolist()[:3] == [2, 3, 4]
    # Additive masks (0 = attend) and a mask broadcast over the batch.
    additive = torch.zeros(1, 1, 5, 5).masked_fill(~causal_mask(torch.ones(1, 5), 5), torch.finfo(torch.float32).min)
    assert layout.read_layout(additive, 2, 5, 5).is_full


@pytest.mark.parametrize("case", ["hole_in_prompt", "sliding_window", "static_cache", "all_padding", "two_heads"])
def test_masks_that_are_not_a_layout(case):
    valid = torch.ones(1, 12, dtype=torch.bool)
    Lq = 12
    mask = causal_mask(valid, Lq)
    if case == "hole_in_prompt":
        mask = causal_mask(valid.index_fill(1, torch.tensor([5]), False), Lq)
    elif case == "sliding_window":
        mask &= torch.arange(12)[None, :] > torch.arange(12)[:, None] - 4
    elif case == "static_cache":  # 8 tokens in a 12-slot cache: queries at positions 0..7, not the last 8 keys
        Lq = 8
        mask = (torch.arange(12)[None, None, None, :] <= torch.arange(8)[None, None, :, None])
    elif case == "all_padding":
        mask = causal_mask(torch.zeros(1, 12, dtype=torch.bool), Lq)
    else:
        mask = mask.expand(1, 2, 12, 12)
    assert layout.read_layout(mask, 1, Lq, 12) is None


def test_mask_read_once_per_tensor(monkeypatch):
    reads = []
    real = layout.read_layout
    monkeypatch.setattr(layout, "read_layout", lambda *a: reads.append(1) or real(*a))
    valid = torch.ones(2, 8, dtype=torch.bool)
    valid[0, :2] = False
    mask = causal_mask(valid, 8)
    first = layout.batch_layout(mask, 2, 8, 8)
    assert layout.batch_layout(mask, 2, 8, 8) is first and len(reads) == 1
    mask[1, 0, :, 3] = False  # changed in place: read again, and it is no layout any more
    assert layout.batch_layout(mask, 2, 8, 8) is None and len(reads) == 2


def test_inference_mode_masks_are_read_every_time(monkeypatch):
    """Tensors made under torch.inference_mode() have no version counter: no cache, a read per call."""
    reads = []
    real = layout.read_layout
    monkeypatch.setattr(layout, "read_layout", lambda *a: reads.append(1) or real(*a))
    with torch.inference_mode():
        mask = causal_mask(torch.ones(1, 8, dtype=torch.bool), 8)
        assert layout.batch_layout(mask, 1, 8, 8).is_full and layout.batch_layout(mask, 1, 8, 8).is_full
    assert len(reads) == 2


def test_a_forward_reads_an_inference_mode_mask_once_per_layer(monkeypatch):
    """Without the per-tensor cache (inference mode), each layer reads the mask once: the dispatch and the packing
    share one read."""
    reads = []
    real = layout.read_layout
    monkeypatch.setattr(layout, "read_layout", lambda *a: reads.append(1) or real(*a))
    model = tiny_model("llama")
    ids, mask = padded([tokens(40, seed=1)[0], tokens(24, seed=2)[0]], "left")
    cfg = flashprefill_hf.configure(model, fp_config(0.5))
    with torch.inference_mode():
        model(ids, attention_mask=mask)
    assert [r["layout"] for r in cfg.recorder.records] == ["varlen"] * 2 and len(reads) == 2


# --------------------------------------------------------------------------------------------------------------
# Padded batches
# --------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("side", ["left", "right"])
@pytest.mark.parametrize("arch", ["llama", "qwen2", "qwen3"])
def test_padded_batch_equals_each_prompt_alone(arch, side, caught):
    model = tiny_model(arch)
    prompts = [tokens(430, seed=3)[0], tokens(512, seed=4)[0], tokens(77, seed=5)[0]]
    ids, mask = padded(prompts, side)
    cfg = flashprefill_hf.configure(model, fp_config(0.5))
    alone = [logits(model, p[None])[0] for p in prompts]
    densities = [cfg.recorder.mean_density()]
    cfg.recorder.clear()
    with torch.inference_mode():  # as a serving loop would call it
        got = model(ids, attention_mask=mask).logits
    for b, p in enumerate(prompts):
        rows = mask[b].bool()
        torch.testing.assert_close(got[b, rows], alone[b], atol=2e-4, rtol=2e-4)
    assert layouts(cfg) == [(512, "flashprefill", "varlen", 0)] * 2
    assert all(d < 1 for d in densities + [cfg.recorder.mean_density()])
    assert fallbacks(caught) == []


def test_generate_left_padded_batch_equals_each_prompt_alone(caught):
    model = tiny_model("llama")
    prompts = [tokens(300, seed=6)[0] % 90 + 5, tokens(170, seed=7)[0] % 90 + 5]
    ids, mask = padded(prompts, "left")
    flashprefill_hf.configure(model, fp_config(0.5))
    kwargs = dict(max_new_tokens=4, min_new_tokens=4, do_sample=False, pad_token_id=PAD)
    with torch.no_grad():
        alone = [model.generate(p[None], attention_mask=torch.ones(1, len(p), dtype=torch.long), **kwargs)[0, -4:]
                 for p in prompts]
        batch = model.generate(ids, attention_mask=mask, **kwargs)[:, -4:]
    assert torch.equal(batch, torch.stack(alone))
    assert fallbacks(caught) == []


# --------------------------------------------------------------------------------------------------------------
# Chunked prefill and multi-turn generation
# --------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("declare", [False, True])
@pytest.mark.parametrize("arch", ["llama", "qwen3"])
def test_block_aligned_chunks_equal_one_shot(arch, declare, caught):
    """Without dense last blocks, or with them when the chunks before the last say so (more_chunks_follow)."""
    model = tiny_model(arch)
    ids = tokens(512)
    cfg = flashprefill_hf.configure(model, fp_config(0.5, last_dense_blocks=2 if declare else 0))
    one_shot = logits(model, ids)
    assert cfg.recorder.mean_density() < 1
    cfg.recorder.clear()
    got = chunked_logits(model, ids, [12 * BLOCK, 22 * BLOCK], declare=declare)
    torch.testing.assert_close(got, one_shot, atol=2e-5, rtol=2e-5)
    assert layouts(cfg) == ([(192, "flashprefill", "batch", 0)] * 2 + [(160, "flashprefill", "varlen", 192)] * 2
                            + [(160, "flashprefill", "varlen", 352)] * 2)
    assert fallbacks(caught) == []


def test_any_chunking_at_alpha0_equals_eager(caught):
    model = tiny_model("qwen2")
    ids = tokens(300)
    eager = logits(model, ids)
    cfg = flashprefill_hf.configure(model, fp_config(0.0))
    got = chunked_logits(model, ids, [37, 38, 201])  # unaligned, and a one-token chunk (a "decoding step")
    torch.testing.assert_close(got, eager, atol=2e-4, rtol=2e-4)
    assert [r[2] for r in layouts(cfg)] == ["batch"] * 2 + ["varlen"] * 4  # the 1-token chunk: dense, unrecorded
    assert fallbacks(caught) == []


@pytest.mark.filterwarnings("ignore:.*past_key_values.*:FutureWarning")
def test_multi_turn_generate_prefills_the_second_turn_with_flashprefill(caught):
    """Turn 2 continues turn 1's cache (its prefill: the last generated token + the new message, after a prefix):
    at alpha 0 the tokens are eager attention's, and the recorder shows a varlen prefill over the prefix."""
    model = tiny_model("llama")
    turn1, turn2 = tokens(200, seed=8) % 90 + 5, tokens(60, seed=9) % 90 + 5
    kwargs = dict(max_new_tokens=5, min_new_tokens=5, do_sample=False, pad_token_id=PAD)

    def chat():
        with torch.no_grad():
            first = model.generate(turn1, attention_mask=torch.ones_like(turn1), return_dict_in_generate=True,
                                   **kwargs)
            conversation = torch.cat([first.sequences, turn2], 1)
            second = model.generate(conversation, attention_mask=torch.ones_like(conversation),
                                    past_key_values=first.past_key_values, **kwargs)
        return first.sequences, second

    expected = chat()
    cfg = flashprefill_hf.configure(model, fp_config(0.0))
    got = chat()
    assert all(torch.equal(g, e) for g, e in zip(got, expected))
    # The cache holds all but the last generated token: the second prefill is 1 + 60 tokens after 204 cached ones.
    assert layouts(cfg) == [(200, "flashprefill", "batch", 0)] * 2 + [(61, "flashprefill", "varlen", 204)] * 2
    assert fallbacks(caught) == []


def test_undeclared_chunks_keep_their_last_blocks_dense():
    """Each call counts as the end of its prompt unless declared: the first chunk's last 2 blocks are dense, so
    its density exceeds the one-shot prefill's over the same rows; declared, it equals it."""
    model = tiny_model("llama")
    ids = tokens(640)
    cfg = flashprefill_hf.configure(model, fp_config(0.5, last_dense_blocks=2))
    first = {}
    for declare in (False, True):
        cfg.recorder.clear()
        chunked_logits(model, ids, [32 * BLOCK], declare=declare)
        first[declare] = [r["density"] for r in cfg.recorder.records[:2]]  # the first chunk's two layers
    cfg.recorder.clear()
    logits(model, ids[:, :32 * BLOCK])
    last_dense = [r["density"] for r in cfg.recorder.records]  # a prompt ending there: dense last blocks
    assert first[False] == pytest.approx(last_dense)
    assert all(a >= b for a, b in zip(first[False], first[True])) and sum(first[False]) > sum(first[True])


# --------------------------------------------------------------------------------------------------------------
# What still falls back
# --------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("selector", ["flexprefill", "xattention"])
def test_peer_selectors_on_a_padded_batch_fall_back_with_a_warning(selector, caught):
    model = tiny_model("llama")
    ids, mask = padded([tokens(96, seed=1)[0], tokens(64, seed=2)[0]], "left")
    eager = logits(model, ids, attention_mask=mask)
    cfg = flashprefill_hf.configure(model, peer_config(selector, PEER_PRUNE[selector]))
    got = logits(model, ids, attention_mask=mask)
    torch.testing.assert_close(got[mask.bool()], eager[mask.bool()], atol=2e-4, rtol=2e-4)
    assert {r["reason"] for r in cfg.recorder.records} == {"selector_without_varlen"}
    [message] = fallbacks(caught)
    assert "'selector_without_varlen'" in message


def test_padding_inside_a_prompt_falls_back_with_a_warning(caught):
    model = tiny_model("llama")
    ids = tokens(64)
    mask = torch.ones_like(ids).index_fill(1, torch.tensor([20, 21]), 0)
    eager = logits(model, ids, attention_mask=mask)
    cfg = flashprefill_hf.configure(model, fp_config(0.5))
    torch.testing.assert_close(logits(model, ids, attention_mask=mask), eager, atol=2e-4, rtol=2e-4)
    assert {r["reason"] for r in cfg.recorder.records} == {"padding_or_custom_mask"}
    assert len(fallbacks(caught)) == 1


# --------------------------------------------------------------------------------------------------------------
# The Triton branch on the same calls
# --------------------------------------------------------------------------------------------------------------
def _triton_and_reference(model, run) -> tuple:
    """(triton logits, reference logits) of run(model), and check each ran its implementation through varlen."""
    out = {}
    for impl in ("reference", "triton"):
        cfg = flashprefill_hf.configure(model, fp_config(0.9, impl=impl, last_dense_blocks=0))
        out[impl] = run(model)
        assert {(r["impl"], r["layout"]) for r in cfg.recorder.records if r.get("prefix")} <= {(impl, "varlen")}
        assert any(r.get("layout") == "varlen" for r in cfg.recorder.records)
        assert all(r["path"] == "flashprefill" for r in cfg.recorder.records)
    return out["triton"], out["reference"]


@pytest.mark.skipif(HAS_CUDA, reason="float32 Triton runs only under the CPU interpreter")
def test_triton_branch_varlen_matches_reference(allow_triton_on_cpu):
    """Interpreter, float32: a left-padded batch and a chunk after an unaligned prefix (L <= 128, blocks of 16)."""
    model = tiny_model("llama", **KERNEL_SHAPE)
    ids, mask = padded([tokens(112, seed=1)[0], tokens(80, seed=2)[0]], "left")
    tri, ref = _triton_and_reference(model, lambda m: logits(m, ids, attention_mask=mask))
    torch.testing.assert_close(tri[mask.bool()], ref[mask.bool()], atol=2e-4, rtol=2e-4)
    one = tokens(120)
    tri, ref = _triton_and_reference(model, lambda m: chunked_logits(m, one, [45]))
    torch.testing.assert_close(tri, ref, atol=2e-4, rtol=2e-4)


@pytest.mark.gpu
@pytest.mark.parametrize("arch", ["llama", "qwen3"])
def test_gpu_bf16_varlen_at_alpha0_matches_eager(arch):
    """bf16 on CUDA, Bs 128, alpha 0 (dense through the varlen kernels): a left- and a right-padded batch of
    unaligned lengths and block-aligned chunks are as close to float32 eager attention as bf16 eager is."""
    model = tiny_model(arch, **KERNEL_SHAPE).cuda()
    prompts = [tokens(3000, seed=3)[0], tokens(4096, seed=4)[0], tokens(700, seed=5)[0]]
    truth = [logits(model, p[None].cuda())[0] for p in prompts]  # float32 eager, each prompt alone
    model.to(torch.bfloat16)
    eager = [logits(model, p[None].cuda())[0] for p in prompts]
    cfg = flashprefill_hf.configure(model, flashprefill_hf.FlashPrefillConfig(alpha=0.0))
    for side in ("left", "right"):
        ids, mask = padded(prompts, side)
        cfg.recorder.clear()
        got = logits(model, ids.cuda(), attention_mask=mask.cuda())
        assert {(r["impl"], r["layout"]) for r in cfg.recorder.records} == {("triton", "varlen")}
        for b in range(len(prompts)):
            _bf16_rule(got[b, mask[b].bool().cuda()], eager[b], truth[b], f"{arch} {side} row {b}")
    cfg.recorder.clear()
    got = chunked_logits(model, prompts[1][None].cuda(), [1024, 3072])
    assert [r["layout"] for r in cfg.recorder.records] == ["batch"] * 2 + ["varlen"] * 4
    _bf16_rule(got[0], eager[1], truth[1], f"{arch} chunks")


@pytest.mark.gpu
@pytest.mark.parametrize("arch", ["llama", "qwen3"])
def test_gpu_bf16_sparse_padded_row_equals_its_unpadded_twin(arch):
    """bf16 on CUDA, alpha 0.9 (sparse): row 1 of a right-padded batch is the first 3000 tokens of row 0's prompt.
    In one forward both rows see the same matmul inputs, so every query block that is complete in both (rows before
    2944 = 23 x 128) must get the same selection and output: the varlen kernels may not mix up the sequences.
    (Comparing with a separate one-prompt forward instead would also compare the matmuls' bf16 rounding at another
    batch shape, which flips blocks near the threshold.)"""
    model = tiny_model(arch, **KERNEL_SHAPE).cuda().to(torch.bfloat16)
    prompt = tokens(4096, seed=4)[0]
    ids, mask = padded([prompt, prompt[:3000]], "right")
    cfg = flashprefill_hf.configure(model, flashprefill_hf.FlashPrefillConfig(alpha=0.9, last_dense_blocks=0))
    got = logits(model, ids.cuda(), attention_mask=mask.cuda()).float()
    assert {(r["impl"], r["layout"]) for r in cfg.recorder.records} == {("triton", "varlen")}
    assert cfg.recorder.mean_density() < 0.9
    scale = got[0, :2944].abs().max().item()
    torch.testing.assert_close(got[1, :2944], got[0, :2944], atol=1e-3 * scale, rtol=0)
