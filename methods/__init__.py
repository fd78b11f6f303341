"""Continual-learning methods, one module each; every module registers itself with ``mcl.methods_api``."""
