"""Typed dataclass configs: YAML loading (unknown keys are errors) and ``--set a.b=c`` overrides."""

from cellfoundry.config.loader import ConfigError, config_to_dict, load_config, parse_config
from cellfoundry.config.schema import (
    CorpusConfig,
    CorpusJobConfig,
    MediansConfig,
    QCConfig,
    RayConfig,
    TokenizeConfig,
)

__all__ = [
    "ConfigError",
    "CorpusConfig",
    "CorpusJobConfig",
    "MediansConfig",
    "QCConfig",
    "RayConfig",
    "TokenizeConfig",
    "config_to_dict",
    "load_config",
    "parse_config",
]
