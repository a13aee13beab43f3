"""The locally generated long-context tasks (repro/accuracy/tasks.py) and RULER-style scoring.

No model and no tokenizer: lengths are measured in words (`count_words`), which is how the generators are meant
to be tested; the runner passes the model's tokenizer instead.
"""

from __future__ import annotations

import pytest

from repro.accuracy import scoring, tasks
from repro.accuracy.tasks import GENERATORS, RULER_TASKS, count_words, generate, needle_depth

ALL_TASKS = sorted(GENERATORS)


@pytest.mark.parametrize("task", ALL_TASKS)
def test_seeded_and_deterministic(task):
    a = generate(task, 2048, seed=7)
    b = generate(task, 2048, seed=7)
    c = generate(task, 2048, seed=8)
    assert a == b
    assert (a.context, a.answers) != (c.context, c.answers)


@pytest.mark.parametrize("task", ALL_TASKS)
@pytest.mark.parametrize("length", [1024, 4096])
def test_fits_the_budget_and_answer_is_in_context(task, length):
    s = generate(task, length, seed=0)
    n = count_words(s.user_message + " " + s.answer_prefix)
    assert n <= length - tasks.TEMPLATE_RESERVE + 8  # the question may add a word or two of joining
    assert n >= 0.6 * length, f"{task} uses only {n} of {length}"
    assert s.answers and all(a for a in s.answers)
    assert s.metric in ("all", "part") and s.max_new_tokens > 0
    if task in ("cwe", "fwe"):  # the answers are words of the list, and occur more often than any other
        counts = {w: s.context.split().count(w) for w in set(s.context.split())}
        others = max(c for w, c in counts.items() if w not in s.answers and w.isalpha() and w != "...")
        assert all(counts[a] > others for a in s.answers)
    else:
        assert all(a in s.context for a in s.answers)


@pytest.mark.parametrize("task", ["passkey", "niah_single", "niah_single_noise"])
@pytest.mark.parametrize("depth", [0.0, 0.1, 0.5, 0.9, 1.0])
def test_needle_at_requested_depth(task, depth):
    s = generate(task, 4096, seed=3, depth=depth)
    assert s.depth == depth
    got = needle_depth(s, s.meta["needle"])
    # The instruction line precedes the haystack; relative to ~4K words it shifts the depth by < 1%.
    assert abs(got - depth) < 0.02, (got, depth)
    assert s.context.count(s.meta["needle"]) == 1


def test_qa_gold_document_at_depth():
    for depth in (0.0, 0.5, 1.0):
        s = generate("qa", 4096, seed=2, depth=depth)
        gold = f": {s.meta['name']}\n"
        assert abs(needle_depth(s, gold) - depth) < 0.05
        assert s.context.count(gold) == 1


def test_multikey_has_distractors_and_multivalue_all_values():
    s = generate("niah_multikey", 2048, seed=1)
    assert s.answers[0] in s.context and all(v in s.context for v in s.meta["distractor_values"])
    assert s.context.count("special magic numbers for") == 4
    s = generate("niah_multivalue", 2048, seed=1)
    assert len(s.answers) == 4 and s.context.count(f"numbers for {s.meta['key']} is") == 4


def test_variable_tracking_chain():
    s = generate("vt", 2048, seed=5, hops=4)
    names = s.answers
    assert len(names) == 5 and f"VAR {names[0]} = {s.meta['value']}." in s.context
    for prev, cur in zip(names, names[1:]):
        assert f"VAR {cur} = VAR {prev}." in s.context
        assert s.context.index(f"VAR {prev} =") < s.context.index(f"VAR {cur} =")


def test_ruler_suite_covers_the_families():
    assert {"niah_single", "niah_multikey", "niah_multivalue", "niah_multiquery", "vt", "cwe", "fwe",
            "qa"} <= set(RULER_TASKS)
    with pytest.raises(ValueError, match="unknown task"):
        generate("nope", 1024, 0)
    with pytest.raises(ValueError, match="too short"):
        generate("passkey", 40, 0)


def test_custom_token_counter_is_used():
    """A tokenizer that counts characters / 4 changes the haystack size accordingly."""
    words = generate("passkey", 2048, seed=0)
    chars = generate("passkey", 2048, seed=0, count_tokens=lambda t: len(t) // 4)
    assert len(chars.context) // 4 <= 2048 < len(words.context) // 4


# ---- scoring --------------------------------------------------------------------------------------------------
def test_string_match_all_on_hand_made_answers():
    refs = [["1234567"], ["111", "222", "333", "444"], ["alpha", "beta"]]
    preds = ["The number is 1234567.", "111, 222 and 999", "BETA and Alpha"]
    # 1 + 2/4 + 1 (case-insensitive) over 3 samples
    assert scoring.string_match_all(preds, refs) == pytest.approx(100 * (1 + 0.5 + 1) / 3)
    assert scoring.string_match_all(["nothing"], [["x1"]]) == 0.0


def test_string_match_part_on_hand_made_answers():
    refs = [["Anna Marsh", "Marsh"], ["Belmoor"], ["1901"]]
    preds = ["It was founded by Marsh.", "In Tyrsfield", " 1901\n"]
    assert scoring.string_match_part(preds, refs) == pytest.approx(200 / 3)


def test_scoring_errors_and_postprocess():
    assert scoring.postprocess("  42\x00x \n") == "42\nx"
    with pytest.raises(ValueError):
        scoring.sample_score("x", [], "all")
    with pytest.raises(ValueError):
        scoring.sample_score("x", ["x"], "mean")
    with pytest.raises(ValueError):
        scoring.string_match_all(["a"], [["a"], ["b"]])
