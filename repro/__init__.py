"""Scripts that make the tables and figures: into a run folder, repro/runs/<date>-<device>/ (git-ignored), by
default; the committed ones are in repro/results/. `bash repro/run_all.sh` runs them all."""
