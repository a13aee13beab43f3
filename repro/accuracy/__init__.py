"""Accuracy of FlashPrefill on a real LLM, offline (issue 5).

tasks.py        seeded generators: passkey, single-needle NIAH at depths, one task per RULER family
scoring.py      RULER's string_match_all / string_match_part
experiments.py  the NIAH grid's and the RULER-style suite's prompts, the per-layer error of sparse vs dense
                attention on real activations, the calibration of alpha on separate seeds
report.py       the markdown summary, one function per section
figures.py      the figures, one function per figure (NIAH heatmap, alpha sweep, layer error): notebooks can call them
run.py          `python -m repro.accuracy.run [--quick] [--model PATH] ...`: Full vs FlashPrefill, alpha sweep,
                per-layer error on real activations; writes accuracy_*.{csv,json,md,png} into a run folder
                (repro/runs/<date>-<device>/accuracy/; the committed runs are in repro/results/accuracy/)
device_run.sh   the GPU run (bf16, Triton kernels), files accuracy_gpu_*

The model, the prompts' chat format, greedy decoding and the switch between attention settings are
repro/harness.py's (shared with repro/sparsity_accuracy/); the activation capture is repro/capture.py's.
"""
