"""Runs: pipeline, rounds, rejection-sampled SFT and the demo; the only place stages are composed."""
