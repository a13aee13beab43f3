"""Pictures of the block selection, outside `reference/` so that the paper's listing needs no plotting library.

panels.py       one matplotlib panel per stage of one (batch, head) pair: block scores, the alpha * max threshold,
                the kept blocks by reason, the compacted lists, logical vs physical visits; `draw_walkthrough`
walkthrough.py  the synthetic toy that `python -m reference` and notebooks/01 push through stages 1-5
"""
