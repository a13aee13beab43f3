"""The powered evaluation (repro/powered/): prompts of an exact length from disjoint dev/test seeds, batching, the
arms, the paired summary and its dev rule, the report and figures from synthetic rows, and one batched run of a
tiny random Llama through the backend (the CPU reference), with a stand-in tokenizer."""

from __future__ import annotations

import random

import pytest
import torch

from repro.accuracy.tasks import count_words
from repro.powered import arms as arms_mod
from repro.powered import prompts, summary
from repro.powered.experiment import Batch, make_batches


class WordTokenizer:
    """One id per whitespace-separated word (ids 3..99); decodes to "w<id>" words."""

    chat_template = None
    pad_token_id = 0
    eos_token_id = 1

    def __call__(self, text, return_tensors=None, add_special_tokens=False):
        ids = [3 + sum(map(ord, w)) % 97 for w in text.split()]
        return type("Enc", (), {"input_ids": torch.tensor([ids]) if return_tensors == "pt" else ids})()

    def batch_decode(self, rows, skip_special_tokens=True):
        return [" ".join(f"w{int(i)}" for i in row if not (skip_special_tokens and int(i) < 3)) for row in rows]


def word_length(tok):
    return prompts.prompt_length(tok)


# ---------------------------------------------------------------------------------------------------- prompts
@pytest.mark.parametrize("family", sorted(prompts.FAMILIES))
def test_prompts_have_the_exact_length_and_rotate_tasks(family):
    tok = WordTokenizer()
    got = prompts.family_prompts(family, 1024, "dev", 7, count_words, word_length(tok))
    tasks = prompts.FAMILIES[family]
    assert [p.sample.task for p in got] == [tasks[i % len(tasks)] for i in range(7)]
    for p in got:
        assert p.sample.length == 1024
        ids = prompts.prompt_ids(tok, p.sample)
        assert ids.shape == (1, 1024)
        head, tail = prompts.prompt_text(tok, p.sample)
        # The filler sits between the context and the question, and the generator used most of the budget.
        assert ids[0, -len(tok(tail).input_ids):].tolist() == tok(tail).input_ids
        # (qa and fwe fill in coarse units: whole documents, whole word lists)
        assert 1024 - word_length(tok)(p.sample) <= max(prompts.MAX_FILLER, 0.15 * 1024)


def test_prompts_are_deterministic_and_the_splits_disjoint():
    tok = WordTokenizer()
    a = prompts.family_prompts("needle", 1024, "test", 4, count_words, word_length(tok))
    b = prompts.family_prompts("needle", 1024, "test", 4, count_words, word_length(tok))
    dev = prompts.family_prompts("needle", 1024, "dev", 4, count_words, word_length(tok))
    assert [p.sample for p in a] == [p.sample for p in b]
    assert not {p.sample.seed for p in a} & {p.sample.seed for p in dev}
    assert {p.key for p in a}.isdisjoint({p.key for p in dev})
    for p in a:  # a result row names its prompt well enough to rebuild it
        s = p.sample
        assert prompts.regenerate(s.task, s.length, s.seed, s.meta["budget"], count_words) == s


def test_prompt_errors_name_the_argument():
    with pytest.raises(ValueError, match="family"):
        prompts.family_prompts("nope", 1024, "dev", 1, count_words)
    with pytest.raises(ValueError, match="split"):
        prompts.family_prompts("needle", 1024, "train", 1, count_words)
    with pytest.raises(ValueError, match="n and start must"):
        prompts.family_prompts("needle", 1024, "dev", -1, count_words)
    sample = prompts.family_prompts("needle", 1024, "dev", 1, count_words)[0].sample
    from dataclasses import replace

    with pytest.raises(ValueError, match="more than its length"):
        prompts.prompt_ids(WordTokenizer(), replace(sample, length=100))


def test_batches_group_by_task_and_length_and_respect_the_token_cap():
    tok = WordTokenizer()
    pairs = []
    for L in (512, 1024):
        for p in prompts.family_prompts("needle", L, "dev", 9, count_words, word_length(tok)):
            pairs.append((p, prompts.prompt_ids(tok, p.sample)[0].tolist()))
    batches = make_batches(pairs, max_batch_tokens=2048)
    assert sum(len(b.prompts) for b in batches) == len(pairs)
    for b in batches:
        assert len({(p.split, p.sample.task, p.sample.length) for p in b.prompts}) == 1
        assert b.ids.shape == (len(b.prompts), b.prompts[0].sample.length)
        assert b.ids.numel() <= 2048 or len(b.prompts) == 1
    assert max(len(b.prompts) for b in batches if b.prompts[0].sample.length == 512) == 3  # 9 // 4 tasks + 1


# ---------------------------------------------------------------------------------------------------- arms
def test_arms():
    assert [a.name for a in arms_mod.check_arms(["fp"])] == ["full", "fp"]  # Full always runs, first
    with pytest.raises(ValueError, match="unknown arm"):
        arms_mod.check_arms(["fp", "nope"])
    fp_mc = arms_mod.ARMS["fp+mc"]
    assert fp_mc.columns()["mean_correction"] is True and "mean corr" in fp_mc.label
    assert arms_mod.ARMS["fp+dense4"].columns()["dense_layers"] == 4
    assert arms_mod.ARMS["dense_kernels"].value == 0.0
    for arm in arms_mod.ARMS.values():  # every arm is a valid backend configuration
        if arm.selector != "full":
            import flashprefill_hf

            flashprefill_hf.FlashPrefillConfig().replace(**arm.setting.config_changes(), **arm.knobs)


# ---------------------------------------------------------------------------------------------------- summary
def synthetic_rows(n=200, seed=0):
    """Full right on 80%; "fp" loses 8 prompts and wins 2 per split; "dense_kernels" flips 1 each way;
    "fp_a0.3" loses 30, density lower; needle depths uniform."""
    rng = random.Random(seed)
    rows = []
    for split in ("dev", "test"):
        full = [100.0 if rng.random() < 0.8 else 0.0 for _ in range(n)]
        right = [i for i, s in enumerate(full) if s]
        wrong = [i for i, s in enumerate(full) if not s]
        arms = {"full": (full, 1.0), "dense_kernels": (_flip(full, right[:1], wrong[:1]), 1.0),
                "fp": (_flip(full, right[:8], wrong[:2]), 0.5), "fp_a0.3": (_flip(full, right[:30], []), 0.3)}
        for arm, (scores, density) in arms.items():
            group = {"full": "reference", "dense_kernels": "floor", "fp": "default", "fp_a0.3": "sweep"}[arm]
            for i, s in enumerate(scores):
                rows.append(dict(split=split, family="needle" if i % 2 else "ruler", task=f"t{i % 4}",
                                 length=str(2048 * (1 + i % 2)), seed=str(1000 + i), budget="", depth=f"{i / n:.3f}",
                                 arm=arm, group=group, score=str(s), density=str(density)))
    return rows


def _flip(scores, lose, win):
    out = list(scores)
    for i in lose:
        out[i] = 0.0
    for i in win:
        out[i] = 100.0
    return out


def test_summary_pairs_with_full():
    rows = synthetic_rows()
    c = summary.overall(rows, "fp", "test", n_boot=500)
    assert (c.result.a_wins, c.result.b_wins) == (8, 2)
    assert c.result.diff == pytest.approx(-6 * 100 / 200)
    assert c.density == pytest.approx(0.5)
    assert summary.discordant_rate(rows, "fp", "test") == pytest.approx(10 / 200)
    per = summary.compare(rows, "fp", "test", by=("length",), n_boot=200)
    assert [s.group["length"] for s in per] == ["2048", "4096", "all"]
    prof = summary.depth_profile(rows, ["full"], "test", bins=4)
    assert len(prof["full"]) == 4


def test_dev_rule():
    rows = synthetic_rows()
    pick, looked = summary.choose_on_dev(rows, n_boot=500)
    # fp loses 3 points on dev (not within 1 point), fp_a0.3 loses 15: none qualifies -> the largest difference.
    assert {c.arm for c in looked} == {"fp", "fp_a0.3"}
    assert pick == "fp"
    # Make the sparser arm lossless on dev: it qualifies and has the lower density.
    for r in rows:
        if r["arm"] == "fp_a0.3" and r["split"] == "dev":
            r["score"] = next(x["score"] for x in rows if x["arm"] == "full" and x["split"] == "dev"
                              and x["seed"] == r["seed"])
    assert summary.choose_on_dev(rows, n_boot=500)[0] == "fp_a0.3"


def test_report_and_figures(tmp_path):
    from repro.common import environment_stamp
    from repro.powered.figures import save_figures
    from repro.powered.report import write_report

    stamp = environment_stamp("cpu")
    rows = [dict(r, **stamp) for r in synthetic_rows(n=120)]
    text = write_report(tmp_path / "s.md", rows, dict(model="tiny", commands=["cmd"], wall_seconds=[1],
                                                     note="a note")).read_text()
    for needle in ("noise floor", "McNemar", "8 lost / 2 won", "not decided", "Knobs chosen on dev", "chosen",
                   "Pareto", "a note", "by needle depth"):
        assert needle in text, needle
    paths = save_figures(rows, tmp_path / "p.png", tmp_path / "d.png")
    assert [p.name for p in paths] == ["p.png", "d.png"] and all(p.stat().st_size > 10_000 for p in paths)


# ---------------------------------------------------------------------------------------------------- a real run
def test_batched_run_through_the_backend_on_a_tiny_model():
    """Two prompts of one (task, length) in one batch: Full and FlashPrefill (reference on the CPU) answer both;
    the sparse arm records its density and implementation, and never silently falls back to dense."""
    transformers = pytest.importorskip("transformers")
    import flashprefill_hf
    from repro.harness import AttentionSwitch
    from repro.powered.arms import ARMS
    from repro.powered.experiment import run_arm

    config = transformers.LlamaConfig(vocab_size=100, hidden_size=64, intermediate_size=64, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048)
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config, attn_implementation=flashprefill_hf.register())
    model = model.eval()
    tok = WordTokenizer()
    pairs = [(p, prompts.prompt_ids(tok, p.sample)[0].tolist())
             for p in prompts.family_prompts("needle", 768, "dev", 6, count_words, word_length(tok))
             if p.sample.task == "niah_single"]
    (batch,) = make_batches(pairs, 1 << 16)
    assert isinstance(batch, Batch) and batch.ids.shape == (2, 768)
    switch = AttentionSwitch(model, cpu_threads=1)
    with torch.inference_mode():
        full = run_arm(model, tok, switch, ARMS["full"], [batch])
        sparse = run_arm(model, tok, switch, ARMS["fp_a0.3"], [batch])
    assert [r["impl"] for r in full] == ["sdpa"] * 2
    assert [r["impl"] for r in sparse] == ["reference"] * 2
    assert all(0 < r["density"] <= 1 for r in sparse)
    assert [r["seed"] for r in full] == [r["seed"] for r in sparse]
    assert all(r["budget"] for r in full)
