"""Accuracy of FlashPrefill on a real LLM, offline (issue 5).

tasks.py    seeded generators: passkey, single-needle NIAH at depths, one task per RULER family
scoring.py  RULER's string_match_all / string_match_part
run.py      `python -m repro.accuracy.run [--quick] [--model PATH] ...`: Full vs FlashPrefill, alpha sweep,
            per-layer error on real activations; writes accuracy_*.{csv,md,png} into a run folder
            (repro/runs/<date>-<device>/accuracy/; the committed runs are in repro/results/accuracy/)
"""
