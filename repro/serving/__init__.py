"""Serving-style calls vs one-shot FlashPrefill in a transformers model (`python -m repro.serving`, also
`python -m repro.serving_check`; usage, options and outputs in run.py).

calls.py      how the model is called: greedy generate, a chunked prefill over a DynamicCache, a left-padded batch,
              the two turns of a chat (transformers 5.0 and 5.24)
scenarios.py  the one-shot references and the three scenarios (chunked, padded, multi_turn), one row per prompt
evidence.py   which path the backend's recorder saw per run, and the check: no prefill call fell back to dense
report.py     the markdown report
run.py        the command line; the CSV, the run's JSON and the report

The prompts are the powered evaluation's test split (repro/powered/prompts.py); the scores RULER's string match
(repro/accuracy/scoring.py); the paired differences repro/stats.py's.
"""
