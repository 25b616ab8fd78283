"""Check a workflow config before any job runs: the schema, every stage's settings, the plans against each model.

    check_config(config, "workflow/schemas/config.schema.yaml")   # raises ConfigError, one line

The schema (JSON Schema draft 2020-12) checks keys, types, enums and ranges. Then each stage's section
becomes that stage's settings, as the job will build them (stages.SECTIONS), so what the settings
refuse (a missing file, a task without its data) fails here; and every plan and grid value must fit
every model of the run, which needs the models' layer counts. Last, each job's memory estimate (cqil/memory.py)
must fit the host memory and the GPU its rule asks for.

Importing this module imports neither torch nor transformers (the schema and the plans need neither): the
stages' settings and the memory estimate import them when a config is checked, inside the functions.
"""

from __future__ import annotations

from pathlib import Path

import yaml
from jsonschema import Draft202012Validator
from jsonschema.exceptions import best_match

from .errors import ConfigError, CqilError
from .plan import Plan


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
                    raise ConfigError(
                        f"config.search.{field}[{i}]: {value} does not fit model {name!r} "
                        f"with {layers} layers (0 <= S < E <= {layers})"
                    )
        for field, names in (
            ("search.include", search.get("include", [])),
            ("select.always", select.get("always", [])),
            (f"catalog.{name}.plans", config["catalog"][name].get("plans", [])),
        ):
            for i, plan in enumerate(names):
                try:
                    Plan.parse(plan).validate(layers)
                except CqilError as err:
                    raise ConfigError(f"config.{field}[{i}]: {err} (model {name!r})") from None
        for i, plan in enumerate(config.get("baselines", {}).get("match", [])):
            try:
                if plan != "selected":
                    Plan.parse(plan).validate(layers)
            except CqilError as err:
                raise ConfigError(f"config.baselines.match[{i}]: {err} (model {name!r})") from None
        grid = Plan.grid(
            layers,
            search["starts"],
            search["ends"],
            search["sizes"],
            search.get("bypasses", [0]),
            search.get("modes", ["paper"]),
        )
        if not grid and not search.get("include"):
            raise ConfigError(f"config.search: the grid has no valid plan for model {name!r} ((E-S) % P == 0, D < P)")


def check_latency(config: dict) -> None:
    latency = config.get("latency_setups") or {"models": []}
    for i, name in enumerate(latency["models"]):
        entry = config["catalog"].get(name)
        if entry is None:
            raise ConfigError(
                f"config.latency_setups.models[{i}]: {name!r} is not in config.catalog ({', '.join(config['catalog'])})"
            )
        for field, plans in (
            ("latency_setups.plans", latency["plans"]),
            (f"catalog.{name}.plans", entry.get("plans", [])),
        ):
            for j, plan in enumerate(plans):
                try:
                    Plan.parse(plan).validate(entry["layers"])
                except CqilError as err:
                    raise ConfigError(f"config.{field}[{j}]: {err} (model {name!r})") from None
        missing = [key for key in ("heads", "kv_heads") if key not in entry]
        if latency["tp_degrees"] and missing:
            raise ConfigError(
                f"config.catalog.{name}: needs {' and '.join(missing)} for config.latency_setups.tp_degrees"
            )


def check_settings(config: dict) -> None:
    """Build each stage's settings from its section, as its job will: what they refuse fails now, in one line."""
    from .stages import SECTIONS, settings  # every stage's module, torch with them

    for section, cls in SECTIONS.items():
        try:
            settings(cls, config.get(section, {}), section)
        except CqilError as err:
            raise ConfigError(f"config.{err}") from None


def check_config(config: dict, schema_path) -> None:
    from .memory import check_memory  # the models' configs: transformers

    check_schema(config, schema_path)
    check_settings(config)
    check_plans(config)
    check_latency(config)
    check_memory(config)


def merged(base: dict, overlay: dict) -> dict:
    """`overlay` over `base`, mappings merged key by key (as Snakemake merges a --configfile over the default)."""
    out = dict(base)
    for key, value in overlay.items():
        out[key] = merged(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out
