"""Typed dataclass configs: YAML loading (unknown keys are errors) and ``--set a.b=c`` overrides."""

from cellfoundry.config.infer import (
    EmbedJobConfig,
    GoalConfig,
    InferComputeConfig,
    PerturbationSpec,
    PerturbJobConfig,
)
from cellfoundry.config.loader import ConfigError, config_to_dict, load_config, parse_config
from cellfoundry.config.schema import (
    CorpusConfig,
    CorpusJobConfig,
    MediansConfig,
    QCConfig,
    RayConfig,
    TokenizeConfig,
)
from cellfoundry.config.train import (
    CheckpointConfig,
    DataConfig,
    DeepSpeedConfig,
    FailureConfig,
    ModelConfig,
    OptimConfig,
    PretrainJobConfig,
    RunConfig,
    ScalingConfig,
    TrackingConfig,
)

__all__ = [
    "CheckpointConfig",
    "ConfigError",
    "CorpusConfig",
    "CorpusJobConfig",
    "DataConfig",
    "DeepSpeedConfig",
    "EmbedJobConfig",
    "FailureConfig",
    "GoalConfig",
    "InferComputeConfig",
    "MediansConfig",
    "ModelConfig",
    "OptimConfig",
    "PerturbJobConfig",
    "PerturbationSpec",
    "PretrainJobConfig",
    "QCConfig",
    "RayConfig",
    "RunConfig",
    "ScalingConfig",
    "TokenizeConfig",
    "TrackingConfig",
    "config_to_dict",
    "load_config",
    "parse_config",
]
