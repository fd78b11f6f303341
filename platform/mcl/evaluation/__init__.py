"""Evaluation: continual-learning metrics over accuracy matrices and per-sample answer scorers.

Submodules are imported explicitly (``mcl.evaluation.metrics``, ``mcl.evaluation.scoring``); this package
imports nothing so that ``import mcl.evaluation`` stays light.
"""
