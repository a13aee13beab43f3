"""Longer real contexts (`python -m repro.long_context`; usage, options and outputs in run.py): SmolLM2 past its
trained 8K context with RoPE scaling, Full against FlashPrefill on the powered evaluation's prompts.

rope.py      RoPE scaling of a loaded model (linear, dynamic NTK, YaRN) through transformers' initialisers
summary.py   the RoPE choice on dev, per-layer densities (the test comparisons are repro.powered.summary's)
report.py    the markdown report; figures.py the figure
run.py       the command line
"""
