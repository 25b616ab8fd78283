"""What a user can get wrong, as one error type: `CqilError`, whose message is one line.

`cqil` prints it as `cqil: error: <message>` and exits with status 2, before any heavy work where it
can; anything else that escapes is a bug and keeps its traceback. The subclasses say where it came
from, for code that catches one kind.
"""


class CqilError(ValueError):
    """Bad input (a plan, a model, a setting, a file), described in one line naming the field."""


class PlanError(CqilError):
    """A plan that cannot be applied (cqil.plan, cqil.transform)."""


class ModelError(CqilError):
    """A model spec that cannot be loaded, or a family the layer API does not know (cqil.models, cqil.layers)."""


class ConfigError(CqilError):
    """A workflow config that cannot run; the message starts with the path of the field (cqil.config)."""


class EngineError(CqilError):
    """An engine that cannot run with these ranks or this model, or whose check failed (cqil.runtime, cqil/latency/)."""
