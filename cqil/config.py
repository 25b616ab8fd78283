"""Check a workflow config before any job runs: the schema first, then the plans against each model.

    check_config(config, "workflow/schemas/config.schema.yaml")   # raises ConfigError, one line

The schema (JSON Schema draft 2020-12) checks keys, types, enums and ranges; this module adds what
needs the models' layer counts: every plan and grid value must fit every model of the run.
"""

from __future__ import annotations

from pathlib import Path

import yaml
from jsonschema import Draft202012Validator
from jsonschema.exceptions import best_match

from .plan import Plan, PlanError


class ConfigError(ValueError):
    """A config that cannot run; the message is one line with the path of the field."""


def _where(path) -> str:
    return "config" + "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in path)


def check_schema(config: dict, schema_path) -> None:
    schema = yaml.safe_load(Path(schema_path).read_text())
    error = best_match(Draft202012Validator(schema).iter_errors(config))
    if error is not None:
        raise ConfigError(f"{_where(error.absolute_path)}: {error.message}")


def check_plans(config: dict) -> None:
    search, select = config["search"], config["select"]
    for i, name in enumerate(config["models"]):
        if name not in config["catalog"]:
            raise ConfigError(f"config.models[{i}]: {name!r} is not in config.catalog ({', '.join(config['catalog'])})")
        layers = config["catalog"][name]["layers"]
        for field in ("starts", "ends"):
            for i, value in enumerate(search[field]):
                if value > layers or (field == "starts" and value >= layers):
                    raise ConfigError(f"config.search.{field}[{i}]: {value} does not fit model {name!r} "
                                      f"with {layers} layers (0 <= S < E <= {layers})")
        for field, names in (("search.include", search.get("include", [])), ("select.always", select.get("always", [])),
                             (f"catalog.{name}.plans", config["catalog"][name].get("plans", []))):
            for i, plan in enumerate(names):
                try:
                    Plan.parse(plan).validate(layers)
                except PlanError as err:
                    raise ConfigError(f"config.{field}[{i}]: {err} (model {name!r})") from None
        grid = Plan.grid(layers, search["starts"], search["ends"], search["sizes"], search.get("bypasses", [0]),
                         search.get("modes", ["paper"]))
        if not grid and not search.get("include"):
            raise ConfigError(f"config.search: the grid has no valid plan for model {name!r} ((E-S) % P == 0, D < P)")


def check_latency(config: dict) -> None:
    latency = config.get("latency") or {"models": []}
    for i, name in enumerate(latency["models"]):
        entry = config["catalog"].get(name)
        if entry is None:
            raise ConfigError(f"config.latency.models[{i}]: {name!r} is not in config.catalog ({', '.join(config['catalog'])})")
        for field, plans in (("latency.plans", latency["plans"]), (f"catalog.{name}.plans", entry.get("plans", []))):
            for j, plan in enumerate(plans):
                try:
                    Plan.parse(plan).validate(entry["layers"])
                except PlanError as err:
                    raise ConfigError(f"config.{field}[{j}]: {err} (model {name!r})") from None
        missing = [key for key in ("heads", "kv_heads") if key not in entry]
        if latency["tp_degrees"] and missing:
            raise ConfigError(f"config.catalog.{name}: needs {' and '.join(missing)} for config.latency.tp_degrees")


def check_simulate(config: dict) -> None:
    from .simulate import SimulateError, SimulateSettings

    try:
        SimulateSettings(**config.get("simulate", {}))
    except SimulateError as err:
        raise ConfigError(f"config.{err}") from None


def check_config(config: dict, schema_path) -> None:
    check_schema(config, schema_path)
    check_plans(config)
    check_latency(config)
    check_simulate(config)
