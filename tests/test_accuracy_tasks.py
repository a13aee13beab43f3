"""The locally generated long-context tasks (repro/accuracy/tasks.py) and RULER-style scoring.

No model and no tokenizer: lengths are measured in words (`count_words`), which is how the generators are meant
to be tested; the runner passes the model's tokenizer instead.

The runner's own logic (repro/accuracy/: run.py, experiments.py, report.py; repro/harness.py) is tested without a
real model too: prompt order, the GPU command's flags (taken from repro/accuracy/device_run.sh), the report written
from synthetic rows, the run's metadata (<prefix>run.json, written by the run and read back by --report-only), and
notebook 04 choosing the GPU results when they are present. So is repro/sparsity_accuracy/ (the selectors inside the
model, matched by task accuracy): its settings, the rows `run_samples` writes for them, the matching rule, the
report and its JSON across --append.
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


def test_same_prompts_in_every_process():
    """Prompts do not depend on the process's string-hash seed (PYTHONHASHSEED): the multi-key tasks once
    shuffled a set, whose iteration order differs between processes."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    code = ("from repro.accuracy.tasks import GENERATORS, count_words, generate\n"
            "for t in sorted(GENERATORS): s = generate(t, 300, 10, count_words); print(t, s.user_message, s.answers)")
    root = Path(__file__).resolve().parent.parent
    outs = {subprocess.run([sys.executable, "-c", code], cwd=root, capture_output=True, text=True, check=True,
                           env=dict(os.environ, PYTHONHASHSEED=seed)).stdout for seed in ("1", "2", "3", "4")}
    assert len(outs) == 1


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


# ---- the runner (no model) --------------------------------------------------------------------------------------
ROOT = __import__("pathlib").Path(__file__).resolve().parent.parent


def device_run_args() -> list[str]:
    """The repro.accuracy.run arguments of repro/accuracy/device_run.sh, as run with MODEL=model.gguf BUDGET=360
    (the script passes those two as --model / --time-budget through its `limits` array)."""
    import re
    import shlex

    script = (ROOT / "repro" / "accuracy" / "device_run.sh").read_text()
    command = re.search(r'-m repro\.accuracy\.run "\$\{limits\[@\]\}" \\\n(.*?)2>&1', script, re.S).group(1)
    command = command.replace("\\\n", " ").replace('"$OUT"', "/tmp/out").replace("${EXTRA:-}", "")
    return ["--model", "model.gguf", "--time-budget", "360"] + shlex.split(command)


def test_device_command_parses_to_the_planned_grid():
    from repro.accuracy.run import parse_args

    args = parse_args(device_run_args())
    assert args.model == "model.gguf" and args.device == "cuda" and args.prefix == "accuracy_gpu_"
    assert args.lengths == [1024, 2048, 4096, 8192] and args.depths == 10 and args.seeds == [0, 1, 2]
    assert args.niah_tasks == ["passkey", "niah_single"] and args.ruler_lengths == [4096, 8192]
    assert args.ruler_tasks == RULER_TASKS
    assert args.alphas == [0.05, 0.08, 0.18, 0.3] and args.sweep_lengths == [2048, 4096, 8192]
    assert args.error_lengths == [4096, 8192] and args.error_layers is None and 0.0 in args.error_alphas
    assert args.time_budget == 360


def test_prompts_run_seed_by_seed():
    """A time budget must cut whole seeds: every seed's prompts (all tasks and lengths) come before the next seed's."""
    from repro.accuracy.experiments import niah_samples, ruler_samples
    from repro.harness import seed_major

    niah = niah_samples([1024, 2048], [0.0, 1.0], ["passkey", "niah_single"], [0, 1], count_words)
    ruler = ruler_samples([2048], ["qa", "vt"], [0, 1], count_words)
    ordered = seed_major(niah + ruler)
    seeds = [s.seed for _, s in ordered]
    assert seeds == sorted(seeds)
    first = [s for _, s in ordered[: len(ordered) // 2]]
    assert {(s.task, s.length) for s in first} == {("passkey", 1024), ("passkey", 2048), ("niah_single", 1024),
                                                   ("niah_single", 2048), ("qa", 2048), ("vt", 2048)}


def _synthetic_rows(seeds, alphas=(0.12, 0.3)):
    rows = []
    for seed in seeds:
        for task, L, depth in [("passkey", 2048, 0.0), ("niah_single", 4096, 1.0)]:
            base = dict(experiment="niah", task=task, length=L, tokens=L - 50, depth=depth, seed=seed,
                        answer="42", seconds=0.1, model_dtype="bfloat16")
            rows.append(dict(base, method="full", alpha="", score=100.0, density=1.0, impl="sdpa", prediction="42"))
            for a in alphas:
                rows.append(dict(base, method="flashprefill", alpha=a, score=100.0, density=0.5 - a, impl="triton",
                                 prediction="42"))
    return rows


def test_report_states_device_path_coverage_and_paper(tmp_path):
    from repro.accuracy import report, run

    args = run.parse_args(["--lengths", "2048", "4096", "--depths", "2", "--seeds", "0", "1", "--niah-tasks",
                           "passkey", "niah_single", "--ruler-lengths", "--alphas", "0.3", "--error-lengths", "4096",
                           "--prefix", "accuracy_gpu_"])
    rows = _synthetic_rows([0])  # seed 1 never ran: the report must say the run is incomplete
    err = [dict(experiment="layer_error", layer=layer, length=4096, tokens=4000, alpha=a, density=0.6,
                rel_error=0.002 if a == 0 else 0.05, impl="triton", dtype="bfloat16",
                **({"ref_density": 0.6, "ref_rel_error": 0.049} if a == 0.12 else {}))
           for layer in (0, 1) for a in (0.0, 0.12)]
    stamp = dict(device="cuda", device_name="NVIDIA H200", torch="2.11", triton="3.6.0", python="3.12.3",
                 date="2026-11-29", commit="abc1234")
    path = tmp_path / "summary.md"
    report.write_report(path, rows, err, args, "SmolLM2-135M-Instruct", 0.12, stamp, 400.0, {}, "accuracy_gpu_")
    text = path.read_text()
    assert "NVIDIA H200 (cuda)" in text and "wall time 6.7 min" in text
    assert "in bfloat16" in text and "Triton kernels (triton_impl.flash_prefill)" in text
    assert "sdpa attention on the GPU" in text
    assert "**Incomplete:**" in text and "| Full | 2 | 16 | 0 |" in text
    assert "Paper: NIAH" in text and "93.28" not in text  # no RULER rows, so no RULER paper line
    assert "bf16 floor" not in text and "rounding error in bfloat16" in text
    assert "Cross-check on the same activations, alpha 0.12" in text and "2/2 checked layers" in text
    assert "Time budget:" not in text and "## Calibration" not in text
    # What only the run knows (run.json): what the time budget skipped and the calibrated alphas.
    report.write_report(path, rows, err, args, "SmolLM2-135M-Instruct", 0.12, stamp, 400.0, {2048: 0.18},
                        "accuracy_gpu_", ["alpha sweep [0.3]: 2 of 4 prompts skipped (time budget)"])
    text = path.read_text()
    assert "Time budget: alpha sweep [0.3]: 2 of 4 prompts skipped (time budget)." in text
    assert "calibration prompts (seed >= 100000): 2048: 0.18." in text


def test_report_only_redraws_a_run_into_another_folder(tmp_path):
    """--report-only reads the run in --in-dir (by default the committed one): its CSVs and run.json (command line,
    wall time, note), and writes its summary and figures into --out-dir, leaving the run it reads untouched."""
    import shutil

    from repro.accuracy import run as acc

    committed = ROOT / "repro" / "results" / "accuracy"
    source = tmp_path / "run"
    source.mkdir()
    for name in ("samples.csv", "layer_error.csv", "summary.md", "run.json"):
        shutil.copy(committed / f"accuracy_quick_{name}", source / f"accuracy_quick_{name}")
    before = {p.name: p.read_bytes() for p in source.iterdir()}
    acc.main(["--report-only", "--prefix", "accuracy_quick_", "--in-dir", str(source), "--out-dir",
              str(tmp_path / "redrawn")])
    assert {p.name: p.read_bytes() for p in source.iterdir()} == before
    assert sorted(p.name for p in (tmp_path / "redrawn").iterdir()) == [
        "accuracy_quick_layer_error.png", "accuracy_quick_niah_heatmap.png", "accuracy_quick_summary.md"]
    text = (tmp_path / "redrawn" / "accuracy_quick_summary.md").read_text()
    assert "Command: `python -m repro.accuracy.run --quick --threads 1` — wall time 6.9 min" in text

    # Without run.json it says which file is missing instead of guessing the command.
    (source / "accuracy_quick_run.json").unlink()
    with pytest.raises(SystemExit, match="accuracy_quick_run.json does not exist"):
        acc.main(["--report-only", "--prefix", "accuracy_quick_", "--in-dir", str(source), "--out-dir",
                  str(tmp_path / "again")])


@pytest.mark.parametrize("prefix", ["accuracy_gpu_ruler_", "accuracy_gpu_"])
def test_report_only_reproduces_the_committed_summary(tmp_path, prefix, monkeypatch):
    """The committed GPU summaries come back byte for byte from their CSVs and run.json (note included)."""
    from repro.accuracy import run as acc

    monkeypatch.setattr(acc, "safe_plot", lambda *args: [])  # the figures are not what this test checks
    committed = ROOT / "repro" / "results" / "accuracy"
    acc.main(["--report-only", "--prefix", prefix, "--in-dir", str(committed), "--out-dir", str(tmp_path)])
    assert (tmp_path / f"{prefix}summary.md").read_text() == (committed / f"{prefix}summary.md").read_text()


def test_figures_draw_from_rows_read_back_from_the_committed_csvs():
    """Each figure function draws from the committed CSVs' rows as read_long_csv returns them (strings: the
    notebook passes them so), the same as from typed rows, and returns None where there is nothing to draw."""
    matplotlib = pytest.importorskip("matplotlib")
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from repro.accuracy import figures
    from repro.accuracy.report import typed
    from repro.common import read_long_csv

    committed = ROOT / "repro" / "results" / "accuracy"
    rows = read_long_csv(committed / "accuracy_gpu_samples.csv")
    err = read_long_csv(committed / "accuracy_gpu_layer_error.csv")
    assert isinstance(rows[0]["score"], str) and typed(typed(rows)) == typed(rows)  # typed rows pass through
    try:
        # The runner's heatmap (single-needle only), default alpha and model from the CSV's columns ...
        fig = figures.niah_heatmap(rows)
        assert [ax.get_title() for ax in fig.axes[:2]] == ["Full", "FlashPrefill (alpha 0.12)"]
        assert "Single-needle NIAH, SmolLM2-135M-Instruct" in fig._suptitle.get_text()
        # ... the same picture as from typed rows with explicit arguments (what save_figures passes).
        same = figures.niah_heatmap(typed(rows), 0.12, "SmolLM2-135M-Instruct")
        for a, b in zip(fig.axes[:2], same.axes[:2]):
            assert (a.images[0].get_array().filled(-1) == b.images[0].get_array().filled(-1)).all()
        # The notebook's grid: one row of panels per task.
        grid = figures.niah_heatmap(rows, tasks=("passkey", "niah_single"))
        assert [ax.get_title() for ax in grid.axes[:4]] == [
            "passkey: Full", "passkey: FlashPrefill (alpha 0.12)", "single-needle NIAH: Full",
            "single-needle NIAH: FlashPrefill (alpha 0.12)"]
        assert grid.axes[0].images[0].get_array().shape == (10, 4)  # 10 depths x 4 lengths

        sweep = figures.alpha_sweep(rows)
        labels = sweep.axes[0].get_legend_handles_labels()[1]
        assert "FlashPrefill 2048 (11 prompts)" in labels and not any("1024" in x for x in labels)  # no 1K sweep
        ours = [h for h, label in zip(*sweep.axes[1].get_legend_handles_labels()) if label.startswith("ours")]
        assert [len(line.get_xdata()) for line in ours] == [5, 5, 5]  # 2K, 4K, 8K at five alphas

        layers = figures.layer_error(err)
        assert len(layers.axes[0].get_lines()) == 2 * 6  # 2 lengths x 6 alphas
        assert "real SmolLM2-135M-Instruct activations" in layers._suptitle.get_text()

        # Nothing to draw: None.
        ruler = [r for r in rows if r["experiment"] == "ruler"]
        assert figures.niah_heatmap(ruler) is None
        assert figures.niah_heatmap(rows, tasks=("no_such_task",)) is None
        assert figures.alpha_sweep([r for r in rows if r["alpha"] in ("", "0.12")]) is None  # one alpha: no sweep
        assert figures.layer_error([]) is None
    finally:
        plt.close("all")


def test_notebook_shows_gpu_results_when_present(tmp_path, monkeypatch):
    """Notebook 04 prefers accuracy_gpu_* over the CPU files and compares the prompts both runs answered."""
    import shutil

    nbformat = pytest.importorskip("nbformat")
    nbclient = pytest.importorskip("nbclient")
    results = ROOT / "repro" / "results" / "accuracy"
    if not (results / "accuracy_samples.csv").exists():
        pytest.skip("no committed CPU accuracy results")
    for name in ("samples.csv", "layer_error.csv", "summary.md"):
        shutil.copy(results / f"accuracy_{name}", tmp_path / f"accuracy_{name}")
        shutil.copy(results / f"accuracy_{name}", tmp_path / f"accuracy_gpu_{name}")  # stand-in for a GPU run
    monkeypatch.setenv("FLASHPREFILL_RESULTS", str(tmp_path))
    monkeypatch.delenv("MPLBACKEND", raising=False)
    path = ROOT / "notebooks" / "04_accuracy.ipynb"
    nb = nbformat.read(path, as_version=4)
    nbclient.NotebookClient(nb, kernel_name="python3", timeout=300,
                            resources={"metadata": {"path": str(path.parent)}}).execute()
    texts = [o.get("text", "") + str(o.get("data", {}).get("text/markdown", ""))
             for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", [])]
    joined = "\n".join(texts)
    assert "showing: GPU run" in joined
    assert "| full  |" in joined and "identical answers" in joined  # the GPU-vs-CPU table, from shared prompts


class WordTokenizer:  # one id per word: enough for build_prompt and the length budget
    chat_template = None

    def __call__(self, text, return_tensors=None, add_special_tokens=False):
        import torch

        ids = [sum(map(ord, w)) % 97 for w in text.split()]
        return type("Enc", (), {"input_ids": torch.tensor([ids]) if return_tensors == "pt" else ids})()


def test_layer_errors_triton_cross_check_on_a_tiny_model():
    """The error study's Triton path (what runs on the GPU) with its reference cross-check, here under the Triton
    interpreter in float32 on a tiny random Llama (head dim 64) with a stand-in tokenizer."""
    transformers = pytest.importorskip("transformers")
    import torch

    from repro.accuracy import experiments
    from repro.harness import token_counter
    from triton_impl.common import interpreting

    if not torch.cuda.is_available() and not interpreting():
        pytest.skip("needs CUDA or TRITON_INTERPRET=1")

    config = transformers.LlamaConfig(vocab_size=97, hidden_size=96, intermediate_size=96, num_hidden_layers=2,
                                      num_attention_heads=6, num_key_value_heads=2, head_dim=64,
                                      max_position_embeddings=2048)
    torch.manual_seed(0)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model = transformers.AutoModelForCausalLM.from_config(config, attn_implementation="sdpa").to(device).eval()
    tok = WordTokenizer()
    rows, skipped = experiments.layer_errors(model, tok, [400], [0.0, 0.12], None, token_counter(tok), None,
                                             cross_check_alpha=0.12, use_triton=True)
    assert skipped == []
    assert [(r["layer"], r["alpha"]) for r in rows] == [(0, 0.0), (0, 0.12), (1, 0.0), (1, 0.12)]
    assert all(r["impl"] == "triton" and r["dtype"] == "float32" for r in rows)
    assert all(r["rel_error"] < 1e-4 for r in rows if r["alpha"] == 0.0)  # float32: rounding only
    checked = [r for r in rows if "ref_rel_error" in r]
    assert [r["alpha"] for r in checked] == [0.12, 0.12]  # layers 0 (every fourth) and 1 (the last)
    assert all(r["ref_density"] == pytest.approx(r["density"]) for r in checked)


# --------------------------------------------------------------------------------------------------------------
# run_samples with other settings, the runs' JSON, and repro/sparsity_accuracy/ (no model: the decoding is stubbed)
# --------------------------------------------------------------------------------------------------------------
RUN_SAMPLES_COLUMNS = ["experiment", "task", "method", "alpha", "length", "tokens", "depth", "seed", "score",
                       "density", "impl", "seconds", "answer", "prediction"]


class _StubRecorder:
    def mean_density(self):
        return 0.5

    def impls(self):
        return {"reference": 30}


class _StubSwitch:
    """harness.AttentionSwitch without a model: Full records nothing, every other setting density 0.5."""

    def __init__(self, model=None, cpu_threads=None, columns=None):
        from repro import harness

        self.columns = columns or harness.alpha_columns
        self.config = type("Config", (), {"replace": lambda self, **kw: self})()

    def use(self, setting):
        return None if setting.selector == "full" else _StubRecorder()


def _stub_decoding(monkeypatch, answer=None, seconds=0.0):
    """Prompts of 7 tokens; the "answer" is the tokenizer argument (or `answer`), after `seconds` of sleep."""
    import time

    import torch

    from repro import harness

    def greedy(model, tokenizer, ids, n):
        time.sleep(seconds)
        return " " + (answer if answer is not None else tokenizer)
    monkeypatch.setattr(harness, "build_prompt", lambda tokenizer, sample: torch.zeros(1, 7, dtype=torch.long))
    monkeypatch.setattr(harness, "greedy_answer", greedy)


STAMP = dict(device="cpu", device_name="AMD EPYC (1 threads)", torch="2.13", triton="3.6.0", python="3.11.7",
             date="2026-11-29", commit="abc1234")


def _stub_model(monkeypatch, module):
    """`module`'s load_for_run returns a stand-in model with WordTokenizer; its AttentionSwitch is _StubSwitch; its
    environment stamp is STAMP (no git call inside a timed run)."""
    import torch

    model = type("Model", (), {"dtype": torch.float32, "device": torch.device("cpu")})()
    monkeypatch.setattr(module, "load_for_run", lambda path, device: (model, WordTokenizer(), "Stub-Model"))
    monkeypatch.setattr(module, "AttentionSwitch", _StubSwitch)
    monkeypatch.setattr(module, "environment_stamp", lambda device: dict(STAMP))


def test_run_samples_rows_for_alphas_and_for_selector_settings(monkeypatch):
    """The accuracy runner's rows keep their columns (alpha settings); the selector settings of
    repro/sparsity_accuracy/ name themselves with their own columns through the same run_samples."""
    from block_selectors import Setting
    from repro import harness
    from repro.accuracy.experiments import alpha_setting

    _stub_decoding(monkeypatch)
    sample = generate("niah_single", 300, 10, count_words, depth=0.5)
    rows, skipped = harness.run_samples(None, sample.answers[0], _StubSwitch(), [("niah", sample)],
                                        [alpha_setting(None), alpha_setting(0.12)], "test")
    assert skipped == []
    assert [list(r) for r in rows] == [RUN_SAMPLES_COLUMNS] * 2
    assert [(r["method"], r["alpha"], r["density"], r["impl"], r["score"]) for r in rows] == [
        ("full", "", 1.0, "sdpa", 100.0), ("flashprefill", 0.12, 0.5, "reference", 100.0)]

    settings = [Setting("full"), Setting("flashprefill", 0.12), Setting("xattention", 0.95)]
    rows, _ = harness.run_samples(None, "wrong", _StubSwitch(columns=harness.selector_columns),
                                  [("needle", sample)], settings, "test")
    assert [(r["method"], r["param"], r["value"], r["setting"], r["paper_default"]) for r in rows] == [
        ("full", "", "", "Full", False), ("flashprefill", "alpha", 0.12, "FlashPrefill alpha=0.12", True),
        ("xattention", "threshold", 0.95, "XAttention threshold=0.95", False)]
    assert all(r["score"] == 0.0 for r in rows)

    # Past the deadline the remaining samples are skipped, and run_samples says so (no module-global list).
    rows, skipped = harness.run_samples(None, "x", _StubSwitch(), [("niah", sample)] * 3, [alpha_setting(None)],
                                        "late", deadline=0.0)
    assert rows == [] and skipped == ["late: 3 of 3 prompts skipped (time budget)"]


def test_run_json_helpers(tmp_path):
    from repro.common import read_run_json, write_run_json

    info = dict(argv=["--note", "a — b"], wall_seconds=12.5, skipped=[], note="a — b")
    write_run_json(tmp_path / "x" / "run.json", info)
    assert read_run_json(tmp_path / "x" / "run.json") == info
    with pytest.raises(FileNotFoundError, match="nothing.json does not exist"):
        read_run_json(tmp_path / "nothing.json")


def test_accuracy_run_writes_run_json_and_report_only_reads_it(tmp_path, monkeypatch):
    """A (stubbed) run writes <prefix>run.json with its command line, wall time, what the time budget skipped and
    its note; --report-only rebuilds the same summary from the CSV and that JSON, and a new --note replaces the old
    one (saved into --out-dir's run.json)."""
    import json

    from repro.accuracy import run as acc

    _stub_model(monkeypatch, acc)
    _stub_decoding(monkeypatch, answer="nothing", seconds=0.4)
    out = tmp_path / "run"
    argv = ["--device", "cpu", "--lengths", "300", "--depths", "1", "--niah-tasks", "passkey", "--seeds", "0", "1",
            "--ruler-lengths", "--alphas", "--error-lengths", "--time-budget", "0.5", "--note", "First note.",
            "--out-dir", str(out), "--prefix", "t_"]
    acc.main(argv)
    info = json.loads((out / "t_run.json").read_text())
    assert info["argv"] == argv and info["finished"] is True and info["note"] == "First note."
    assert info["skipped"] == ["Full + FlashPrefill: 1 of 2 prompts skipped (time budget)"]
    assert 0.8 <= info["wall_seconds"] < 60 and info["calibrated_alpha"] == {}  # seed 0: two answers of 0.4 s
    summary = (out / "t_summary.md").read_text()
    assert "Time budget: Full + FlashPrefill: 1 of 2 prompts skipped (time budget)." in summary
    assert f"wall time {info['wall_seconds'] / 60:.1f} min" in summary and "\nFirst note.\n" in summary

    acc.main(["--report-only", "--in-dir", str(out), "--out-dir", str(tmp_path / "redrawn"), "--prefix", "t_"])
    assert (tmp_path / "redrawn" / "t_summary.md").read_text() == summary
    assert not (tmp_path / "redrawn" / "t_run.json").exists()  # nothing new to keep

    acc.main(["--report-only", "--in-dir", str(out), "--out-dir", str(out), "--prefix", "t_", "--note", "Second."])
    assert (out / "t_summary.md").read_text() == summary.replace("\nFirst note.\n", "\nSecond.\n")
    assert json.loads((out / "t_run.json").read_text()) == dict(info, note="Second.")


def test_sparsity_accuracy_settings_build_valid_configs():
    import flashprefill_hf
    from block_selectors import PEERS
    from repro.sparsity_accuracy import cli, experiment

    args = cli.parse_args([])
    settings = experiment.settings_for(args)
    assert args.lengths == [4096] and args.seeds == [10, 11, 12] and not set(args.seeds) & {0, 1, 2}
    assert [s.label for s in settings][:2] == ["Full", "FlashPrefill alpha=0.12"]
    defaults = [s.label for s in settings if s.paper_default]
    assert defaults == ["FlashPrefill alpha=0.12", "FlexPrefill gamma=0.9", "XAttention threshold=0.9"]
    assert any(s.value < 0.9 for s in settings if s.selector in PEERS)  # a sparser value than each default
    base = flashprefill_hf.FlashPrefillConfig()
    for s in settings[1:]:
        cfg = base.replace(**s.config_changes())  # validated by FlashPrefillConfig
        assert cfg.describe() == s.label.lower()  # e.g. "xattention threshold=0.95"
    quick = cli.parse_args(["--quick"])
    assert quick.lengths == [2048] and len(quick.seeds) * len(quick.tasks) <= 2
    assert quick.prefix == "sparsity_accuracy_quick" and args.prefix == "sparsity_accuracy"


def _selector_rows(scores: dict[str, list[float]], densities: dict[str, float]) -> list[dict]:
    """CSV-like rows (strings) of two prompts: scores[label] per prompt; predictions equal Full's iff score 100."""
    from block_selectors import Setting
    from repro.harness import selector_columns

    rows = []
    for label, per_prompt in scores.items():
        method, _, value = label.partition(" ")
        setting = Setting(method, float(value) if value else None)
        for seed, score in zip((10, 11), per_prompt):
            rows.append({k: str(v) for k, v in dict(
                experiment="needle", task="niah_single", length=4096, tokens=3770, depth=0.5, seed=seed,
                **selector_columns(setting), score=score,
                density=densities[label], prediction="42" if score == 100 else f"no {label}",
                model="SmolLM2-135M-Instruct").items()})
    return rows


def test_sparsity_accuracy_matching_and_report(tmp_path):
    import json
    import shlex

    from repro.common import write_long_csv, write_run_json
    from repro.sparsity_accuracy import cli, report, summary as sm

    scores = {"full": [100, 100], "flashprefill 0.12": [100, 0], "flexprefill 0.8": [0, 0],
              "flexprefill 0.9": [100, 0], "flexprefill 0.99": [100, 100], "xattention 0.8": [100, 0],
              "xattention 0.9": [100, 100]}
    dens = {"full": 1.0, "flashprefill 0.12": 0.55, "flexprefill 0.8": 0.4, "flexprefill 0.9": 0.5,
            "flexprefill 0.99": 0.8, "xattention 0.8": 0.3, "xattention 0.9": 0.45}
    rows = _selector_rows(scores, dens)
    summary = sm.summarize(rows, 4096)
    by = {s["setting"]: s for s in summary}
    assert by["FlashPrefill alpha=0.12"]["score"] == 50 and by["FlashPrefill alpha=0.12"]["same"] == 0.5
    match = sm.matched(summary, 0.12)
    assert match["flexprefill"]["setting"] == "FlexPrefill gamma=0.9"  # 0.8 scores lower
    assert match["xattention"]["setting"] == "XAttention threshold=0.8"  # the sparsest that reaches 50
    only_08 = [s for s in summary if s["setting"] not in ("FlexPrefill gamma=0.9", "FlexPrefill gamma=0.99")]
    assert sm.matched(only_08, 0.12)["flexprefill"] is None  # no grid setting reaches FlashPrefill's score
    # A prompt that some setting did not answer is left out of every setting's mean.
    partial = [r for r in rows if not (r["setting"] == "XAttention threshold=0.9" and r["seed"] == "11")]
    assert {s["n"] for s in sm.summarize(partial, 4096)} == {1}

    stamp = dict(device="cpu", device_name="AMD EPYC (1 threads)", torch="2.13", triton="3.6.0", python="3.11.7",
                 date="2026-11-29", commit="abc1234")
    argv = ["--seeds", "10", "11", "--tasks", "niah_single", "--out-dir", str(tmp_path),
            "--sparsity-csv", str(tmp_path / "sparsity.csv")]
    args = cli.parse_args(argv)
    rows = [dict(r, command=shlex.join(argv), **stamp) for r in rows]
    write_long_csv(tmp_path / "sparsity_accuracy.csv", rows)
    # The error-matched settings of the `python -m repro.sparsity` run named by --sparsity-csv are marked beside ours.
    write_long_csv(tmp_path / "sparsity.csv", [
        dict(what="selection", selector="XAttention", param="threshold", value=0.9, L=7554, density=0.49,
             matched=True),
        dict(what="selection", selector="FlexPrefill", param="gamma", value=0.95, L=7554, density=0.53,
             matched=True),
        dict(what="selection", selector="XAttention", param="threshold", value=0.8, L=7554, density=0.4)], stamp)
    report.write_report(tmp_path / "sparsity_accuracy.md", rows, args, stamp, {shlex.join(argv): 600.0}, [])
    text = (tmp_path / "sparsity_accuracy.md").read_text()
    assert "Command: `python -m repro.sparsity_accuracy --seeds 10 11 --tasks niah_single --out-dir" in text
    assert "wall time 10.0 min; 14 answers; commit abc1234" in text and "AMD EPYC (1 threads)" in text
    assert "| XAttention | threshold 0.8 | 50.0 | 1/2 | 30.0% | **matched** |" in text
    assert "| FlexPrefill | gamma 0.9 | 50.0 | 1/2 | 50.0% | paper default, **matched** |" in text
    assert "XAttention threshold 0.8 (the sparsest setting of its grid" in text
    assert "(same as Full >= FlashPrefill's 1/2): FlexPrefill gamma 0.9, density 50.0%" in text
    assert "| XAttention | threshold 0.9 | 100.0 | 2/2 | 45.0% | paper default, *error-matched* |" in text
    assert "7554 tokens" in text and "FlexPrefill gamma 0.95 53.0%" in text
    assert f"The error-matched comparison on activations is {tmp_path / 'sparsity.md'}." in text
    assert "**paper**" in text and "FlexPrefill 8.4%" in text and "seeds [10, 11]" in text
    assert "`peers.flexprefill_select`" in text and "reference.peers" not in text

    # --report-only needs the run's JSON, and says which file is missing.
    redrawn = tmp_path / "redrawn"
    with pytest.raises(SystemExit, match="sparsity_accuracy.json does not exist"):
        cli.main(["--report-only", "--in-dir", str(tmp_path), "--out-dir", str(redrawn)])
    # With it, it rebuilds the same tables from the CSV and keeps the command and the wall time; it reads the run
    # in --in-dir and writes into --out-dir.
    write_run_json(tmp_path / "sparsity_accuracy.json", cli.run_info({shlex.join(argv): 600.0}, [], ""))
    cli.main(["--report-only", "--in-dir", str(tmp_path), "--out-dir", str(redrawn),
              "--sparsity-csv", str(tmp_path / "sparsity.csv")])
    again = (redrawn / "sparsity_accuracy.md").read_text()
    assert again == text + "\n![score and same-as-Full vs density](sparsity_accuracy.png)\n"  # and the figure
    assert (redrawn / "sparsity_accuracy.png").exists()
    assert not (tmp_path / "sparsity_accuracy.png").exists()  # nothing written into the run it redrew

    # Rows appended by a later command (--append: more settings on the same prompts) are reported beside the first
    # run's, each run with its own command line and wall time (from the JSON); the planned prompts are the first
    # run's; a note given once is kept.
    extra = _selector_rows({"xattention 0.5": [0, 0]}, {"xattention 0.5": 0.15})
    later = ["--append", "--xattn-thresholds", "0.5", "--out-dir", str(tmp_path)]
    extra = [dict(r, command=shlex.join(later), **dict(stamp, commit="def5678")) for r in extra]
    write_long_csv(tmp_path / "sparsity_accuracy.csv", rows + extra)
    walls = {shlex.join(argv): 600.0, shlex.join(later): 120.0}
    write_run_json(tmp_path / "sparsity_accuracy.json", cli.run_info(walls, [], "What the numbers say."))
    info = json.loads((tmp_path / "sparsity_accuracy.json").read_text())
    assert info["commands"] == [dict(argv=argv, wall_seconds=600.0), dict(argv=later, wall_seconds=120.0)]
    cli.main(["--report-only", "--in-dir", str(tmp_path), "--out-dir", str(redrawn),
              "--sparsity-csv", str(tmp_path / "sparsity.csv")])
    merged = (redrawn / "sparsity_accuracy.md").read_text()
    assert "\nNote: What the numbers say.\n" in merged
    assert "--append --xattn-thresholds 0.5 --out-dir" in merged
    assert "wall time 2.0 min; 2 answers; commit def5678" in merged
    assert "| XAttention | threshold 0.5 | 0.0 | 0/2 | 15.0% |  |" in merged
    assert "of 2 planned" in merged and "XAttention threshold 0.8, density 30.0%" in merged  # no longer the edge


def test_sparsity_accuracy_run_and_append_keep_the_json(tmp_path, monkeypatch):
    """A (stubbed) run writes <prefix>.json beside its CSV; --append adds its command and wall time to it (and
    fails, naming the file, without it); --report-only rebuilds the run's markdown byte for byte."""
    import json
    import shlex

    from repro.common import read_long_csv
    from repro.sparsity_accuracy import cli

    _stub_model(monkeypatch, cli)
    _stub_decoding(monkeypatch, answer="nothing")
    out = tmp_path / "run"
    first = ["--device", "cpu", "--lengths", "300", "--seeds", "10", "11", "--tasks", "niah_single",
             "--flex-gammas", "0.9", "--xattn-thresholds", "0.9", "--out-dir", str(out), "--sparsity-csv",
             str(tmp_path / "none.csv"), "--note", "Kept."]
    cli.main(first)
    info = json.loads((out / "sparsity_accuracy.json").read_text())
    assert [c["argv"] for c in info["commands"]] == [first] and info["skipped"] == [] and info["note"] == "Kept."
    md = (out / "sparsity_accuracy.md").read_text()
    cli.main(["--report-only", "--in-dir", str(out), "--out-dir", str(tmp_path / "redrawn"), "--sparsity-csv",
              str(tmp_path / "none.csv")])
    assert (tmp_path / "redrawn" / "sparsity_accuracy.md").read_text() == md

    later = ["--device", "cpu", "--append", "--lengths", "300", "--seeds", "10", "11", "--tasks", "niah_single",
             "--flex-gammas", "0.9", "--xattn-thresholds", "0.5", "--out-dir", str(out)]  # new: XAttention 0.5
    cli.main(later)
    info = json.loads((out / "sparsity_accuracy.json").read_text())
    assert [c["argv"] for c in info["commands"]] == [first, later] and info["note"] == "Kept."
    rows = read_long_csv(out / "sparsity_accuracy.csv")
    assert {r["command"] for r in rows if r["setting"] == "XAttention threshold=0.5"} == {shlex.join(later)}
    assert len(rows) == 2 * 5  # 2 prompts x (Full, FlashPrefill, FlexPrefill 0.9, XAttention 0.9 and 0.5)
    md = (out / "sparsity_accuracy.md").read_text()
    assert md.count("Command: `python -m repro.sparsity_accuracy") == 2 and "\nNote: Kept.\n" in md

    (out / "sparsity_accuracy.json").unlink()
    with pytest.raises(SystemExit, match="sparsity_accuracy.json does not exist"):
        cli.main(later)


def test_sparsity_accuracy_append_keys_match_rows(tmp_path):
    """--append finds a generated prompt's rows: sample_key(sample) == prompt_key(the row written for it, read
    back)."""
    from repro.common import read_long_csv, write_long_csv
    from repro.sparsity_accuracy import experiment

    for sample in (generate("niah_multikey", 400, 11, count_words), generate("cwe", 400, 11, count_words)):
        depth = "" if sample.depth is None else round(sample.depth, 4)  # as run_samples writes it
        write_long_csv(tmp_path / "x.csv", [dict(task=sample.task, length=sample.length, depth=depth,
                                                 seed=sample.seed)])
        assert experiment.prompt_key(read_long_csv(tmp_path / "x.csv")[0]) == experiment.sample_key(sample)
