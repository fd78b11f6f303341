"""mcl: continual learning of multimodal LLMs on Ray.

The engine lives here; methods live in the top-level ``methods`` package and plug in through
:mod:`mcl.methods_api`. Heavy dependencies (torch, ray, transformers, mlflow) are imported lazily by the
modules that need them so that ``import mcl`` and config validation stay fast.
"""

__version__ = "0.1.0"
