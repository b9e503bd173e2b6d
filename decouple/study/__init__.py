"""Studies: sweeps over stage two's grid, the results store, tables and plots."""
