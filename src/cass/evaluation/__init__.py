"""Downstream evaluation: label-fraction subsets, fine-tuning losses and classification metrics.

Submodules are imported where used (``cass.evaluation.metrics`` pulls in torchmetrics), so that
importing the package stays cheap for the CLI.
"""
