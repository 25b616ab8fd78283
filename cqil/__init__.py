"""cqil: Concurrent Computation of Quasi-Independent Layers (Zou et al., ACL 2024), reproduced.

`load_model`, `load_tokenizer`, `apply_plan` and `remove_plan` are imported when first used: importing the package
(and light modules of it such as `cqil.config` or `cqil.plan`) does not import torch or transformers.
"""

from importlib import import_module

from .errors import CqilError, PlanError
from .plan import Plan, Prune, Setup, parse_plan

__version__ = "0.1.0"
__all__ = [
    "CqilError",
    "Plan",
    "PlanError",
    "Prune",
    "parse_plan",
    "Setup",
    "apply_plan",
    "remove_plan",
    "load_model",
    "load_tokenizer",
    "__version__",
]
_LAZY = {"load_model": "models", "load_tokenizer": "models", "apply_plan": "transform", "remove_plan": "transform"}


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
