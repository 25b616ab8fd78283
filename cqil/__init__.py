"""cqil: Concurrent Computation of Quasi-Independent Layers (Zou et al., ACL 2024), reproduced."""

from .errors import CqilError, PlanError
from .models import load_model, load_tokenizer
from .plan import Plan, Prune, Setup, parse_plan
from .transform import apply_plan, remove_plan

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
