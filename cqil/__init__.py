"""cqil: Concurrent Computation of Quasi-Independent Layers (Zou et al., ACL 2024), reproduced."""

from .concurrent import apply_plan, remove_plan
from .models import load_model, load_tokenizer
from .plan import Plan, PlanError

__version__ = "0.1.0"
__all__ = ["Plan", "PlanError", "apply_plan", "remove_plan", "load_model", "load_tokenizer", "__version__"]
