"""The long-context run (repro/long_context/): RoPE scaling through transformers' initialisers on a tiny random
Llama, the dev choice of the method, the report and figure from synthetic rows, and one batched run past the
trained context through the backend (the CPU reference)."""

from __future__ import annotations

import random

import pytest
import torch

transformers = pytest.importorskip("transformers")

from repro.accuracy.tasks import count_words  # noqa: E402
from repro.long_context import rope, summary  # noqa: E402

TRAINED = 256


def tiny_llama(attn_implementation=None):
    config = transformers.LlamaConfig(vocab_size=100, hidden_size=64, intermediate_size=64, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=TRAINED,
                                      rope_theta=10_000.0)
    torch.manual_seed(0)
    kwargs = {"attn_implementation": attn_implementation} if attn_implementation else {}
    return transformers.AutoModelForCausalLM.from_config(config, **kwargs).eval()


# ---------------------------------------------------------------------------------------------------- rope.py
def test_each_method_rescales_the_frequencies_as_transformers_defines_it_and_is_undone_afterwards():
    model = tiny_llama()
    trained = model.model.rotary_emb
    base = trained.inv_freq.clone()
    ids = torch.randint(0, 100, (1, 2 * TRAINED))
    with torch.no_grad():
        before = model(ids).logits
        with rope.scaled_rope(model, "linear", 2 * TRAINED) as factor:
            assert factor == 2.0
            torch.testing.assert_close(model.model.rotary_emb.inv_freq, base / 2)
            linear = model(ids).logits
        with rope.scaled_rope(model, "yarn", 2 * TRAINED):
            emb = model.model.rotary_emb
            assert emb.attention_scaling > 1  # YaRN's temperature
            assert emb.inv_freq[0] == base[0] and torch.isclose(emb.inv_freq[-1], base[-1] / 2)
        with rope.scaled_rope(model, "dynamic", 2 * TRAINED):
            model(ids[:, :TRAINED])  # within the trained context: unchanged
            torch.testing.assert_close(model.model.rotary_emb.inv_freq, base)
            model(ids)  # past it: a larger base, so lower frequencies
            assert (model.model.rotary_emb.inv_freq[1:] < base[1:]).all()
        with rope.scaled_rope(model, "none", 2 * TRAINED):
            torch.testing.assert_close(model(ids).logits, before)
    assert model.model.rotary_emb is trained
    assert not torch.allclose(linear, before)
    torch.testing.assert_close(model(ids).logits, before)


def test_the_factor_is_the_length_over_the_trained_context_and_bad_input_is_refused():
    model = tiny_llama()
    assert rope.rope_factor(model, 4 * TRAINED) == 4.0 and rope.rope_factor(model, TRAINED // 2) == 1.0
    with pytest.raises(ValueError, match="rope method"):
        rope.scaled_config(model.config, "ntk", 2.0)
    with pytest.raises(ValueError, match="factor"):
        rope.scaled_config(model.config, "linear", 0.5)
    scaled = rope.scaled_config(model.config, "linear", 2.0)
    with pytest.raises(ValueError, match="plain RoPE"):
        rope.scaled_config(scaled, "yarn", 2.0)
    assert model.config.rope_parameters["rope_type"] == "default"  # the model's own config is not touched


# ---------------------------------------------------------------------------------------------------- summary
def dev_rows(scores: dict[tuple[int, str], list[float]]):
    return [dict(split="dev", arm="full", family="needle", task="niah_single", length=L, seed=i, rope=m, score=s)
            for (L, m), xs in scores.items() for i, s in enumerate(xs)]


def test_the_method_with_the_best_full_dev_score_is_chosen_per_length_never_the_control():
    rows = dev_rows({(16384, "none"): [100, 100], (16384, "linear"): [0, 100], (16384, "dynamic"): [100, 0],
                     (16384, "yarn"): [0, 0], (32768, "none"): [0, 0], (32768, "linear"): [0, 0],
                     (32768, "dynamic"): [0, 100], (32768, "yarn"): [100, 100]})
    # 16K: linear and dynamic tie at 50 (the earlier wins); the control's 100 is not a candidate.
    assert summary.choose_methods(rows) == {16384: "linear", 32768: "yarn"}
    against = summary.method_comparisons(rows)
    assert against[32768]["dynamic"].diff == -50 and against[32768]["none"].diff == -100
    assert "yarn" not in against[32768]
    with pytest.raises(ValueError, match="no dev rows"):
        summary.choose_methods(rows, [8192])


def synthetic_run():
    """Dev rows for every method and test rows for Full, the floor and FlashPrefill, with per-layer densities."""
    rng = random.Random(0)
    rows, layers = [], []
    for L in (16384, 32768):
        for method in ("none", *rope.ROPE_METHODS):
            rows += [dict(r, family="needle", task="niah_single") for r in
                     dev_rows({(L, method): [100.0 * (rng.random() < 0.5) for _ in range(20)]})]
        for arm, group in (("full", "reference"), ("dense_kernels", "floor"), ("fp", "default")):
            for i in range(40):
                rows.append(dict(split="test", arm=arm, group=group, family=["needle", "ruler"][i % 2],
                                 task=["niah_single", "fwe"][i % 2], length=L, seed=i, depth=(i % 10) / 10,
                                 rope="yarn", score=100.0 * (rng.random() < 0.6),
                                 density=1.0 if arm != "fp" else 0.3 - L / 1e6))
            if arm != "full":
                layers += [dict(arm=arm, split="test", length=L, rope="yarn", layer=layer, batch=20,
                                density=1.0 if arm != "fp" else 0.1 + 0.02 * layer) for layer in range(30)]
    from repro.common import environment_stamp

    stamp = environment_stamp("cpu")
    return [dict(r, **stamp) for r in rows], layers


def test_report_and_figure_from_synthetic_rows(tmp_path):
    from repro.long_context.figures import save_figure
    from repro.long_context.report import write_report

    rows, layers = synthetic_run()
    assert summary.layer_density(layers, "fp")[16384][29] == pytest.approx(0.68)
    text = write_report(tmp_path / "s.md", rows, layers, dict(commands=["c"], note="a note"),
                        powered_rows=[dict(arm="full", split="test", length=8192, score=50.0)]).read_text()
    for needle in ("RoPE scaling chosen on dev", "**chosen**", "Does Full itself hold up?", "8K 50.0",
                   "Density per layer", "noise floor", "a note", "minus chosen"):
        assert needle in text, needle
    path = save_figure(rows, layers, [], tmp_path / "f.png")
    assert path.stat().st_size > 20_000


# ---------------------------------------------------------------------------------------------------- a real run
def test_a_batch_past_the_trained_context_runs_sparse_with_the_rope_recorded(tmp_path):
    """Two prompts of twice the trained length: Full and FlashPrefill (reference on the CPU) answer them with YaRN;
    rows carry the method and factor, per-layer densities are recorded, the rotary embedding is restored."""
    import flashprefill_hf
    from repro.harness import AttentionSwitch
    from repro.long_context.run import answer
    from repro.powered import prompts
    from repro.powered.arms import ARMS
    from repro.powered.experiment import make_batches
    from test_powered import WordTokenizer, word_length

    model = tiny_llama(flashprefill_hf.register())
    trained = model.model.rotary_emb
    tok = WordTokenizer()
    pairs = [(p, prompts.prompt_ids(tok, p.sample)[0].tolist())
             for p in prompts.family_prompts("needle", 2 * TRAINED + 256, "test", 6, count_words, word_length(tok))
             if p.sample.task == "niah_single"]
    batches = make_batches(pairs, 1 << 16)
    switch = AttentionSwitch(model, cpu_threads=1)
    layers = []
    with torch.inference_mode():
        methods = {2 * TRAINED + 256: "yarn"}
        full = answer(model, tok, switch, ARMS["full"], batches, methods, layers)
        sparse = answer(model, tok, switch, ARMS["fp_a0.3"], batches, methods, layers)
    assert model.model.rotary_emb is trained
    assert [r["rope"] for r in full + sparse] == ["yarn"] * 4
    assert {r["rope_factor"] for r in sparse} == {3.0}
    assert [r["impl"] for r in sparse] == ["reference"] * 2
    assert sorted({r["layer"] for r in layers}) == [0, 1] and all(r["arm"] == "fp_a0.3" for r in layers)
    assert all(0 < r["density"] <= 1 for r in layers)
