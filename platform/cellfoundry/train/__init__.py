"""Stage 2: pretraining on Ray Train with DeepSpeed ZeRO.

- :func:`run_pretrain` (:class:`PretrainJobConfig` -> :class:`PretrainResult`): runs
  ``ray.train.torch.TorchTrainer`` and writes the ``model`` artifact.
- :func:`train_loop_per_worker`: the module-level loop every worker runs; it reads only its
  config, resumes from ``ray.train.get_checkpoint()`` and reports checkpoints.
- :func:`deepspeed_config`: the DeepSpeed config dict built from the typed config.
"""

from cellfoundry.config.train import PretrainJobConfig
from cellfoundry.train.loop import FAIL_ONCE_ENV, train_loop_per_worker
from cellfoundry.train.trainer import PretrainResult, run_pretrain, run_pretrain_job
from cellfoundry.train.zero import Settings, deepspeed_config, resolve_settings

__all__ = [
    "FAIL_ONCE_ENV",
    "PretrainJobConfig",
    "PretrainResult",
    "Settings",
    "deepspeed_config",
    "resolve_settings",
    "run_pretrain",
    "run_pretrain_job",
    "train_loop_per_worker",
]
