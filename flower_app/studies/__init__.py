"""Studies: the sweeps as data, the runner (`fl-experiments`), its engines, tables and reports."""
