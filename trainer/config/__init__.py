"""Experiment configuration: frozen dataclasses loaded from YAML, dotted CLI overrides, validation.

One job per module, each importing only the ones below it:

- `schema`: the typed dataclasses (`Config` and its sections), their defaults and field docs,
  `ConfigError`, `COMPAT_PRESETS`.
- `factories`: what a run makes of a `Config` (`build_head_margin`, `resolve` -> `Resolved`,
  `to_dict`, `save_config`); imports the schema only.
- `validate`: choices, ranges and cross-field rules (`validate`); uses `build_head_margin`.
- `load`: YAML + `key=value` overrides, aliases, `compat` presets, the alias-bomb guard, typed
  construction, then `validate` (`load_config`, `parse_overrides`, `safe_load_yaml`).

Every error is a `ConfigError` whose message names the file and the dotted field. Import the
names from `trainer.config`; the modules are its layout, not its interface.
"""

from trainer.config.factories import Resolved, build_head_margin, resolve, save_config, to_dict
from trainer.config.load import (
    ALIASES,
    MAX_YAML_NODES,
    load_config,
    parse_overrides,
    safe_load_yaml,
)
from trainer.config.schema import (
    COMPAT_PRESETS,
    CheckpointConfig,
    Config,
    ConfigError,
    DataConfig,
    EngineConfig,
    EvalConfig,
    HeadConfig,
    LoggingConfig,
    ModelConfig,
    OptimConfig,
    ScheduleConfig,
)
from trainer.config.validate import validate

__all__ = [
    "ALIASES",
    "COMPAT_PRESETS",
    "MAX_YAML_NODES",
    "CheckpointConfig",
    "Config",
    "ConfigError",
    "DataConfig",
    "EngineConfig",
    "EvalConfig",
    "HeadConfig",
    "LoggingConfig",
    "ModelConfig",
    "OptimConfig",
    "Resolved",
    "ScheduleConfig",
    "build_head_margin",
    "load_config",
    "parse_overrides",
    "resolve",
    "safe_load_yaml",
    "save_config",
    "to_dict",
    "validate",
]
