"""What a user of the transformers backend sees when FlashPrefill does not run (issue 11).

Pinned here, on tiny random Llama models (tests/test_hf_backend.py has the models and the numerics):

* `generate` in the situations a user meets, with the recorder saying which path ran and whether a
  FlashPrefillFallbackWarning was emitted: no attention_mask, an all-ones mask, a left-padded batch of two lengths
  and a second call continuing a cached prefix (FlashPrefill, silent; the last two through the varlen path),
  decoding (dense, never warned); and the issue's scenario: the pad id inside a prompt with no mask (FlashPrefill,
  or a warning; never a silent fallback);
* the warning: once per model and reason, again for a new reason or a second model, never for decoding steps or
  configured dense layers, attributed to the caller's line, subject to the usual warning filters;
* autograd: with grad enabled, calls go to sdpa whatever `impl`, and gradients reach the q/k/v projections;
* impl="auto" on CUDA (the device rule patched, so it runs here) with a head dim or dtype the Triton kernels do not
  support: sdpa and a warning, not the slow reference; an explicit impl keeps its behaviour;
* the recorder: decoding steps only on request, an optional bound on the number of records.
"""

from __future__ import annotations

import sys
import warnings

import pytest
import torch

transformers = pytest.importorskip("transformers")

import flashprefill_hf  # noqa: E402
from flashprefill_hf import DensityRecorder, FlashPrefillFallbackWarning  # noqa: E402
from flashprefill_hf import backend  # noqa: E402
from test_hf_backend import fp_config, logits, no_triton_on_cpu, tiny_model, tokens  # noqa: E402, F401 (autouse)

EOS = 2  # the tiny models' end-of-sequence id (generation_config.eos_token_id)
END_OF_TURN = 1  # a chat template's special token that a user passes as pad_token_id (the issue's SmolLM2 case)
PAD = 0  # the pad id of the left-padded batch
NEW = 3  # generated tokens per generate call


def fallback_warnings(caught) -> list[str]:
    return [str(w.message) for w in caught if issubclass(w.category, FlashPrefillFallbackWarning)]


@pytest.fixture
def caught():
    """Every warning of the test, under Python's default filter (once per location), as a user would see them."""
    with warnings.catch_warnings(record=True) as log:
        warnings.simplefilter("default")
        yield log


def generate(model, ids, **kwargs):
    kwargs = dict(dict(max_new_tokens=NEW, min_new_tokens=NEW, do_sample=False, pad_token_id=EOS), **kwargs)
    with torch.no_grad():
        return model.generate(ids, **kwargs)


def paths(recorder) -> list[tuple]:
    return [(r["length"], r["path"], r["reason"]) for r in recorder.records]


def prompt(L: int = 40, seed: int = 1) -> torch.Tensor:
    """A prompt without the special ids (so that no transformers version infers a mask from it)."""
    ids = tokens(L, seed=seed)
    return torch.where(ids <= EOS, ids + 10, ids)


# --------------------------------------------------------------------------------------------------------------
# generate, as a user calls it
# --------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("mask", ["none", "all_ones"])
def test_generate_unpadded_prompt_runs_flashprefill_silently(mask, caught):
    model = tiny_model("llama")
    ids = prompt()
    kwargs = {} if mask == "none" else dict(attention_mask=torch.ones_like(ids))
    expected = generate(model, ids, **kwargs)
    cfg = flashprefill_hf.configure(model, fp_config(0.0))
    assert torch.equal(generate(model, ids, **kwargs), expected)
    # One record per layer for the prefill; the decoding steps are dense and not recorded by default.
    assert paths(cfg.recorder) == [(40, "flashprefill", None)] * 2
    assert fallback_warnings(caught) == []


def test_generate_left_padded_batch_runs_flashprefill_silently(caught):
    model = tiny_model("llama")
    ids = torch.full((2, 30), PAD)
    ids[0], ids[1, 12:] = prompt(30, seed=4), prompt(18, seed=5)
    mask = (torch.arange(30) >= torch.tensor([[0], [12]])).long()
    expected = generate(model, ids, attention_mask=mask, pad_token_id=PAD)
    cfg = flashprefill_hf.configure(model, fp_config(0.0))
    assert torch.equal(generate(model, ids, attention_mask=mask, pad_token_id=PAD), expected)
    assert paths(cfg.recorder) == [(30, "flashprefill", None)] * 2
    assert [r["layout"] for r in cfg.recorder.records] == ["varlen"] * 2
    assert fallback_warnings(caught) == []


@pytest.mark.filterwarnings("ignore:.*past_key_values.*:FutureWarning")  # 5.24 renames it; 5.0 needs it
def test_generate_continuing_a_cached_prefix_runs_flashprefill_silently(caught):
    """A second generate call that continues the first one's cache with more than one new token: a prefill chunk
    over a cached prefix, through the varlen path."""
    model = tiny_model("llama")
    ids = prompt()

    def two_calls():
        first = generate(model, ids, return_dict_in_generate=True)
        more = torch.cat([first.sequences, prompt(5, seed=6)], 1)
        return first.sequences, generate(model, more, past_key_values=first.past_key_values,
                                         attention_mask=torch.ones_like(more))

    expected = two_calls()
    cfg = flashprefill_hf.configure(model, fp_config(0.0))
    got = two_calls()
    assert all(torch.equal(g, e) for g, e in zip(got, expected))
    # The cache holds all but the last generated token, so the second prefill has 1 + 5 new tokens.
    assert paths(cfg.recorder) == [(40, "flashprefill", None)] * 2 + [(6, "flashprefill", None)] * 2
    assert [(r["layout"], r["prefix"]) for r in cfg.recorder.records] == [("batch", 0)] * 2 + [("varlen", 42)] * 2
    assert fallback_warnings(caught) == []


def test_decoding_never_warns_and_is_recorded_on_request(caught):
    model = tiny_model("llama")
    ids = prompt()
    cfg = flashprefill_hf.configure(model, fp_config(0.0, recorder=DensityRecorder(record_decode=True)))
    generate(model, ids, attention_mask=torch.ones_like(ids))
    decode = [r for r in cfg.recorder.records if r["decode"]]
    assert [(r["length"], r["path"], r["reason"]) for r in decode] == \
        [(1, "dense_fallback", "decode")] * 2 * (NEW - 1)
    assert [r["path"] for r in cfg.recorder.records if not r["decode"]] == ["flashprefill"] * 2
    assert fallback_warnings(caught) == []


def test_issue_scenario_pad_id_inside_a_prompt_without_mask(caught):
    """generate(input_ids, pad_token_id=<an id the prompt contains>) without an attention_mask: transformers may
    infer a mask that hides those tokens (the issue: SmolLM2's end-of-turn tokens on transformers 5.17). Whatever
    the version does, FlashPrefill runs or the user is told why not; and the remedy (an explicit all-ones mask)
    runs FlashPrefill."""
    model = tiny_model("llama")
    ids = prompt()
    ids[0, [9, 19, 29]] = END_OF_TURN
    cfg = flashprefill_hf.configure(model, fp_config(0.0))
    generate(model, ids, pad_token_id=END_OF_TURN)
    prefill = [(r["path"], r["reason"]) for r in cfg.recorder.records]
    messages = fallback_warnings(caught)
    if prefill != [("flashprefill", None)] * 2:
        assert prefill == [("dense_fallback", "padding_or_custom_mask")] * 2
        assert len(messages) == 1 and "pad_token_id" in messages[0] and "explicit attention_mask" in messages[0]
    else:
        assert messages == []
    cfg.recorder.clear()
    generate(model, ids, pad_token_id=END_OF_TURN, attention_mask=torch.ones_like(ids))
    assert cfg.recorder.paths() == {"flashprefill": 2}


# --------------------------------------------------------------------------------------------------------------
# The warning itself
# --------------------------------------------------------------------------------------------------------------
def padded_forward(model):
    """Padding inside the prompt: no layout FlashPrefill runs (reason "padding_or_custom_mask")."""
    ids = prompt(24)
    mask = torch.ones_like(ids)
    mask[0, 4:6] = 0
    return logits(model, ids, attention_mask=mask)


def tracked_forward(model):
    """A forward that autograd tracks (reason "requires_grad")."""
    model(prompt(24))


def test_fallback_warns_once_per_model_and_reason(caught):
    model = tiny_model("llama")
    flashprefill_hf.configure(model, fp_config(0.0))
    padded_forward(model)
    padded_forward(model)
    assert len(fallback_warnings(caught)) == 1
    tracked_forward(model)  # a new reason: warns
    padded_forward(model)
    messages = fallback_warnings(caught)
    assert len(messages) == 2 and "'requires_grad'" in messages[1]
    # A second model warns again, from the same line with the same text (Python's once-per-location rule would
    # have swallowed it).
    other = tiny_model("llama")
    flashprefill_hf.configure(other, fp_config(0.0))
    padded_forward(other)
    assert fallback_warnings(caught)[2] == messages[0]


def test_warning_names_the_callers_line(caught):
    model = tiny_model("llama")
    flashprefill_hf.configure(model, fp_config(0.0))
    ids = prompt(24)
    with torch.no_grad():
        line = sys._getframe().f_lineno + 1  # the next line
        model(ids, attention_mask=torch.ones_like(ids).index_fill(1, torch.tensor([5]), 0))
    [w] = [w for w in caught if issubclass(w.category, FlashPrefillFallbackWarning)]
    assert (w.filename, w.lineno) == (__file__, line)  # the model call above, not a transformers internal


def test_dense_layers_never_warn(caught):
    model = tiny_model("llama")
    cfg = flashprefill_hf.configure(model, fp_config(0.5, dense_layers=2))
    logits(model, prompt())
    assert [r["path"] for r in cfg.recorder.records] == ["dense_layer"] * 2
    assert fallback_warnings(caught) == []


def test_warning_filters_apply():
    model = tiny_model("llama")
    flashprefill_hf.configure(model, fp_config(0.0))
    with warnings.catch_warnings(record=True) as log:
        warnings.simplefilter("always")
        warnings.filterwarnings("ignore", category=FlashPrefillFallbackWarning)
        padded_forward(model)
    assert fallback_warnings(log) == []
    other = tiny_model("llama")
    flashprefill_hf.configure(other, fp_config(0.0))
    with warnings.catch_warnings(), pytest.raises(FlashPrefillFallbackWarning, match="padding_or_custom_mask"):
        warnings.filterwarnings("error", category=FlashPrefillFallbackWarning)
        padded_forward(other)


# --------------------------------------------------------------------------------------------------------------
# Autograd: the kernels are inference-only, the backend routes tracked calls to sdpa
# --------------------------------------------------------------------------------------------------------------
def forbid_reference(monkeypatch):
    import reference

    def forbidden(*args, **kwargs):
        raise AssertionError("the PyTorch reference ran where sdpa was expected")

    monkeypatch.setattr(reference, "flash_prefill", forbidden)
    monkeypatch.setattr(reference, "block_sparse_attention", forbidden)


def projection_grads(model, ids) -> list[torch.Tensor]:
    model.train()
    model.zero_grad()
    model(ids, labels=ids).loss.backward()
    return [getattr(m, p).weight.grad for m in flashprefill_hf.attention_modules(model)
            for p in ("q_proj", "k_proj", "v_proj")]


@pytest.mark.parametrize("impl", ["auto", "reference", "triton"])
def test_training_goes_to_sdpa_and_gradients_reach_the_projections(impl, monkeypatch, caught):
    """With grad enabled the backend runs sdpa (the Triton kernels have no backward; the autouse fixture forbids
    them on the CPU, and the reference is forbidden here), so the gradients are the eager model's."""
    ids = prompt(64)
    expected = projection_grads(tiny_model("llama"), ids)
    model = tiny_model("llama")
    cfg = flashprefill_hf.configure(model, fp_config(0.5, impl=impl))
    forbid_reference(monkeypatch)
    got = projection_grads(model, ids)
    assert all(g is not None and g.abs().sum() > 0 for g in got)
    for g, e in zip(got, expected):
        torch.testing.assert_close(g, e, atol=1e-4, rtol=1e-4)
    assert paths(cfg.recorder) == [(64, "dense_fallback", "requires_grad")] * 2
    [message] = fallback_warnings(caught)
    assert "'requires_grad'" in message and "torch.no_grad()" in message


# --------------------------------------------------------------------------------------------------------------
# impl="auto" on CUDA with what the Triton kernels do not support
# --------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("case", ["head_dim", "dtype"])
def test_auto_on_cuda_unsupported_by_kernels_falls_back_to_sdpa(case, monkeypatch, caught):
    """The device rule is patched to CUDA's ("auto" -> Triton); the Triton kernels (forbidden on the CPU by the
    autouse fixture) and the reference (forbidden here) must not run: sdpa does, exactly, with a warning."""
    from triton_impl.common import HEAD_DIMS

    if case == "head_dim":  # head dim 16, float32
        model, what = tiny_model("llama"), "head dim 16"
    else:  # a kernel head dim in float64
        model, what = tiny_model("llama", heads=2, kv_heads=1, head_dim=HEAD_DIMS[0]).double(), "torch.float64"
    ids = prompt(64)
    eager = logits(model, ids)
    monkeypatch.setattr(backend, "_auto_impl", lambda device: "triton")
    cfg = flashprefill_hf.configure(model, fp_config(0.5))
    forbid_reference(monkeypatch)
    torch.testing.assert_close(logits(model, ids), eager, atol=2e-4, rtol=2e-4)
    assert paths(cfg.recorder) == [(64, "dense_fallback", "unsupported_by_kernels")] * 2
    [message] = fallback_warnings(caught)
    assert "'unsupported_by_kernels'" in message and what in message and "impl='reference'" in message


def test_explicit_impl_keeps_its_behaviour_on_unsupported_shapes(monkeypatch, caught):
    """impl="reference" runs the reference whatever the device rule says; no fallback, no warning. (impl="triton"
    lets the kernels raise: test_hf_backend.py::test_explicit_triton_on_an_unsupported_head_dim_raises.)"""
    monkeypatch.setattr(backend, "_auto_impl", lambda device: "triton")
    model = tiny_model("llama")  # head dim 16
    cfg = flashprefill_hf.configure(model, fp_config(0.5, impl="reference"))
    logits(model, prompt(64))
    assert cfg.recorder.impls() == {"reference": 2}
    assert fallback_warnings(caught) == []


# --------------------------------------------------------------------------------------------------------------
# The recorder
# --------------------------------------------------------------------------------------------------------------
def test_recorder_keeps_prefill_records_and_honours_its_bound():
    rec = DensityRecorder()
    rec.add(layer=0, length=1, batch=1, decode=True, path="dense_fallback", reason="decode", density=None)
    assert len(rec) == 0  # decoding steps: only with record_decode=True
    bounded = DensityRecorder(max_records=3)
    for layer in range(5):
        bounded.add(layer=layer, length=64, batch=1, decode=False, path="dense_layer", reason="dense_layer",
                    density=1.0)
    assert [r["layer"] for r in bounded.records] == [2, 3, 4] and bounded.dropped == 2
    assert bounded.per_layer() == {2: 1.0, 3: 1.0, 4: 1.0} and bounded.paths() == {"dense_layer": 3}
    bounded.clear()
    assert len(bounded) == 0 and bounded.dropped == 0


@pytest.mark.parametrize("kwargs, error, match", [
    (dict(record_decode=1), TypeError, "record_decode must be a bool"),
    (dict(max_records=0), ValueError, "max_records must be >= 1"),
    (dict(max_records=2.5), TypeError, "max_records must be an int or None"),
    (dict(max_records=True), TypeError, "max_records must be an int or None"),
])
def test_recorder_validation(kwargs, error, match):
    with pytest.raises(error, match=match):
        DensityRecorder(**kwargs)
