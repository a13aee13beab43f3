"""`python -m repro.serving_check`: the serving check under the name it was asked for; the code is the package
repro/serving/ (`python -m repro.serving`, same options)."""

from repro.serving.run import main

if __name__ == "__main__":
    raise SystemExit(main())
