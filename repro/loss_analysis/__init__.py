"""Where FlashPrefill's accuracy loss comes from (`python -m repro.loss_analysis`; usage, options and outputs in
cli.py).

prompts.py         which prompts (flipped / control, from the powered run's samples CSV) and where the needle sits
operator_level.py  per layer and alpha on Full's q/k/v: error against float32 dense, density, nestedness, the
                   needle key block kept or not (teacher-forced: no drift between layers)
in_model.py        the whole model at each alpha through the backend: each layer's drift against Full, the answer's
                   logit margins
analysis.py        monotone checks, pooled errors, flips against Full's margin, the samples CSV's paired comparisons
report.py          the markdown summary; figures.py the four-panel figure
cli.py             the command line, the per-prompt loop, the CSVs and run.json
"""
