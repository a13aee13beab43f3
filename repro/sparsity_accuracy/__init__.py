"""Density vs task accuracy per block selector inside a real model (`python -m repro.sparsity_accuracy`; usage,
options and outputs in cli.py, which is its --help).

experiment.py  the settings (block_selectors.Setting: Full, FlashPrefill, each peer on a grid of its knob), the
               prompts, and the prompt-by-prompt run that --append / --redo extend
summary.py     per-setting score / agreement with Full / density, and the accuracy-matched setting of each peer
report.py      the markdown report, one function per section
figure.py      score and same-as-Full vs density
cli.py         parse_args, main, --report-only; the run's JSON (commands, wall times, skipped work, note)

The model, prompts and decoding are repro/harness.py's, shared with repro/accuracy/.
"""
