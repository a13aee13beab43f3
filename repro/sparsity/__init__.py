"""FlashPrefill vs FlexPrefill vs XAttention: block density, selection time and attention-output error on the
same inputs (`python -m repro.sparsity`; cli.py's docstring says what it runs and writes).

    settings.py   lengths, shapes, the settings of each selector (`block_selectors.Setting`), the error-matching
                  grids, and the display vocabulary (impl labels, colours, line styles, number formats)
    measure.py    measure_synthetic, measure_real, match_errors, density_check: one row (dict) per measurement
    report.py     <tag>.md, one function per section
    figures.py    panels of one run drawn into a given Axes (synthetic_density_panel, real_density_panel,
                  selection_time_panel, error_panel; from measured rows or CSV rows), density_figure / error_figure
                  (matplotlib Figures) and the PNGs of the CLI
    cli.py        the command line: parse, measure, check, write; __main__.py runs it

Dependencies run one way: settings <- measure <- report; settings <- figures; cli uses all four. Timing is
`repro.timing.measure_call`.
"""

from .cli import main
from .figures import (density_figure, error_figure, error_panel, plot_density, plot_error, real_density_panel,
                      real_rows, selection_time_panel, synthetic_density_panel, synthetic_rows)
from .measure import density_check, match_errors, measure_real, measure_synthetic
from .report import render_markdown, write_markdown
from .settings import (BLOCK, COLORS, CPU_LENGTHS, CPU_SHAPE, DEFAULT_SETTINGS, DENSITY_TOLERANCE, GPU_LENGTHS,
                       GPU_SHAPE, MATCH_GRID, PEER_SETTINGS, PYTORCH, REAL, REAL_LENGTHS, REFERENCE, SYNTHETIC,
                       TRITON, TRITON_SETTINGS, V1_ALPHA, impl_label, impl_of, line_style, output_tag, pct,
                       settings_for, sweep_settings)

__all__ = [
    "main",
    "density_figure", "error_figure", "error_panel", "plot_density", "plot_error", "real_density_panel", "real_rows",
    "selection_time_panel", "synthetic_density_panel", "synthetic_rows",
    "density_check", "match_errors", "measure_real", "measure_synthetic",
    "render_markdown", "write_markdown",
    "BLOCK", "COLORS", "CPU_LENGTHS", "CPU_SHAPE", "DEFAULT_SETTINGS", "DENSITY_TOLERANCE", "GPU_LENGTHS",
    "GPU_SHAPE", "MATCH_GRID", "PEER_SETTINGS", "PYTORCH", "REAL", "REAL_LENGTHS", "REFERENCE", "SYNTHETIC",
    "TRITON", "TRITON_SETTINGS", "V1_ALPHA", "impl_label", "impl_of", "line_style", "output_tag", "pct",
    "settings_for", "sweep_settings",
]
