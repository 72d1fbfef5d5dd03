"""Evaluation: MileBench-layout data (real or synthetic), scoring, and the `madakv-eval` CLI."""
