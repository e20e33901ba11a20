"""Experiment configs, sweeps, benchmarks and reports."""
