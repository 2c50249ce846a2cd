"""Evaluation: load trained workdirs, measure, and plot. Evaluation never trains."""
