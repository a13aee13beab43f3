"""Developer tools that check the implementations; nothing here runs in a model.

oracle.py          FlashPrefill's contract restated in float64 independently of reference/, and the comparison rules
                   (FlashAttention's 2x rule, threshold ties); imported by tests/ and `python -m repro.check_triton`
hopper_compile.py  `python -m tools.hopper_compile`: compiles every triton_impl kernel variant for sm_90 on any
                   machine (no GPU needed) and reports registers, spills, shared memory and the MMA instructions
"""
