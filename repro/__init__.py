"""Scripts that regenerate the tables and figures in repro/results/ (`bash repro/run_all.sh` runs them all)."""
