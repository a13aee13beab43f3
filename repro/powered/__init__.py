"""A powered, held-out accuracy evaluation (`python -m repro.powered`; usage, options and outputs in run.py).

prompts.py     the task families, the dev/test splits, prompts of an exact token length
arms.py        Full, the noise floor (dense through the backend) and the sparse settings, and the switch
experiment.py  prompt generation (in worker processes), batching by (split, task, length), batched greedy decoding
summary.py     each arm paired with Full (repro/stats.py), the noise floor, the dev rule, the depth profile
report.py      the markdown report; figures.py the Pareto and depth figures
run.py         the command line; the run's JSON (commands, wall times, skipped work, note)

The statistics are repro/stats.py's; the tasks are repro/accuracy/tasks.py's generators.
"""
