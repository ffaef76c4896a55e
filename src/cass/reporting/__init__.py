"""Plots and reports (matplotlib, headless)."""
