"""Typed configs of stage 2 (pretraining). ``scaling``, ``run``, ``failure`` and ``checkpoint``
mirror Ray's ``ScalingConfig``, ``RunConfig``, ``FailureConfig`` and ``CheckpointConfig``
field for field; ``deepspeed`` becomes the DeepSpeed config dict (no JSON file to keep in
sync). Defaults of ``optim`` are the Geneformer seeds' (max LR 2e-4, warm-up 0.007, weight
decay 0.044). This module imports neither torch nor Ray.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass, field
from typing import Any, Literal

from cellfoundry.config.schema import RayConfig
from cellfoundry.paths import expand


@dataclass
class ModelConfig:
    """Which BERT to pretrain (see ``cellfoundry.model.PRESETS``)."""

    preset: str = "tiny"
    """A preset name: tiny, gf-10m, gf-38m, gf-65m, gf-104m, gf-228m, gf-316m."""
    overrides: dict[str, Any] = field(default_factory=dict)
    """``BertConfig`` fields to change, e.g. {num_hidden_layers: 2, hidden_size: 64}.
    ``vocab_size`` and ``pad_token_id`` always come from the token dictionary."""


def _local_or_uri(path: str) -> str:
    """``path`` with ``{shared}``/``~``/``$VARS`` expanded and made absolute (Ray workers do
    not run in the driver's working directory); a URI (``s3://...``) is kept as it is."""
    return path if "://" in path else os.path.abspath(expand(path))


@dataclass
class ValidationConfig:
    """Held-out cells whose masked-gene loss is logged as ``val_loss`` / ``val_accuracy``."""

    fraction: float = 0.0
    """Share of ``data.tokenized``'s cells held out, chosen by a hash of their ``cell_id``:
    the same cells on every run, rank and seed, never trained on. 0: none."""
    tokenized: str | None = None
    """Or a separate tokenized artifact (local folder or URI) whose cells (after
    ``data.exclude``) form the validation set."""
    batches: int = 8
    """Micro-batches per worker per evaluation (fewer when the held-out set is smaller);
    the same cells and the same masks at every evaluation."""

    def __post_init__(self) -> None:
        if not 0.0 <= self.fraction < 1.0:
            raise ValueError("data.validation.fraction must lie in [0, 1) (e.g. 0.01)")
        if self.tokenized is not None:
            if self.fraction > 0:
                raise ValueError(
                    "data.validation: set either fraction (cells held out of data.tokenized) "
                    "or tokenized (a separate artifact), not both"
                )
            self.tokenized = _local_or_uri(self.tokenized)
        if self.batches < 1:
            raise ValueError("data.validation.batches must be >= 1")

    @property
    def enabled(self) -> bool:
        """True when some cells are held out for validation."""
        return self.fraction > 0 or self.tokenized is not None


@dataclass
class DataConfig:
    """Tokenized cells (stage 1's ``tokenized`` artifact) and how each worker streams them.

    No worker holds the corpus: each reads only its share of blocks (slices of Parquet row
    groups) through a window of ``batch_size x megabatch_mult`` cells (see
    ``cellfoundry.train.stream``).
    """

    tokenized: str
    """Folder of ``part-*.parquet`` shards (``input_ids`` list<int32>, ``length``): a local
    path or a URI pyarrow can open (``s3://bucket/tokenized``)."""
    token_dictionary: str | None = None
    """token_dictionary .json/.pkl, or a folder holding one (a ``vocabulary`` artifact or a
    Geneformer dictionary folder such as "{shared}/geneformer/v2"). Default: the
    ``vocabulary`` artifact beside ``tokenized``."""
    max_length: int | None = None
    """Tokens per cell fed to the model; longer cells keep their top-ranked genes and their
    ``<eos>`` (as if tokenized with this model_input_size). Default: the model's
    max_position_embeddings."""
    batch_size: int = 8
    """Cells per micro-batch per worker (DeepSpeed's train_micro_batch_size_per_gpu)."""
    group_by_length: bool = True
    """Batches of cells of similar length within each window (less padding); false: plain
    random batches of the window."""
    megabatch_mult: int = 50
    """Each worker streams its cells through a window of batch_size x this many cells: the
    shuffle buffer and the length-grouping window. Memory per worker ~ window x max_length
    x 4 bytes, whatever the corpus size."""
    block_rows: int = 256
    """Cells per read block. Row groups are cut into blocks of at most this many rows; each
    epoch shuffles the blocks and gives every worker a contiguous run of them. Smaller
    blocks mix more datasets into a window; shards written with row groups of a few
    thousand cells keep each block read cheap."""
    mlm_probability: float = 0.15
    """Share of gene tokens to predict per cell (80% <mask>, 10% random gene, 10% kept)."""
    pad_to_multiple_of: int = 8
    """Padded length is rounded up to a multiple of this (tensor-core friendly)."""
    exclude: dict[str, list[str]] = field(default_factory=dict)
    """Metadata column -> values whose cells are left out of pretraining and validation,
    e.g. ``{split: [test]}`` keeps the cells a later evaluation holds out unseen."""
    validation: ValidationConfig = field(default_factory=ValidationConfig)
    """Held-out cells for the validation loss (evaluated every ``eval_every`` steps)."""

    def __post_init__(self) -> None:
        self.tokenized = _local_or_uri(self.tokenized)
        if self.token_dictionary is not None:
            self.token_dictionary = _local_or_uri(self.token_dictionary)
        if self.max_length is not None and self.max_length < 3:
            raise ValueError("data.max_length must be >= 3 (or null for the model's maximum)")
        if self.batch_size < 1:
            raise ValueError("data.batch_size must be >= 1")
        if self.megabatch_mult < 1:
            raise ValueError("data.megabatch_mult must be >= 1 (50 is a good default)")
        if self.block_rows < 1:
            raise ValueError("data.block_rows must be >= 1 (256 is a good default)")
        if not 0.0 < self.mlm_probability < 1.0:
            raise ValueError("data.mlm_probability must lie in (0, 1); Geneformer uses 0.15")
        if self.pad_to_multiple_of < 1:
            raise ValueError("data.pad_to_multiple_of must be >= 1 (1: no rounding)")


@dataclass
class OptimConfig:
    """AdamW with a linear warm-up then cosine decay, clipping and accumulation."""

    lr: float = 2e-4
    """Peak learning rate (reached at the end of warm-up)."""
    warmup_ratio: float = 0.007
    """Share of all optimizer steps spent warming up linearly to ``lr``."""
    min_lr_ratio: float = 0.0
    """The cosine decays to lr x this at the last step."""
    weight_decay: float = 0.044
    """Decoupled weight decay; biases and LayerNorm weights are never decayed."""
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    grad_clip: float = 1.0
    """Clip the global gradient norm to this (0: no clipping)."""
    grad_accum: int = 1
    """Micro-batches per optimizer step on each worker."""
    max_steps: int | None = None
    """Optimizer steps to train; null: ``epochs`` passes over the data."""
    epochs: float = 1.0
    """Passes over the data when ``max_steps`` is null (may be fractional)."""

    def __post_init__(self) -> None:
        if self.lr <= 0:
            raise ValueError("optim.lr must be > 0 (the seeds use 2e-4)")
        if not 0.0 <= self.warmup_ratio < 1.0:
            raise ValueError("optim.warmup_ratio must lie in [0, 1) (the seeds use 0.007)")
        if not 0.0 <= self.min_lr_ratio <= 1.0:
            raise ValueError("optim.min_lr_ratio must lie in [0, 1]")
        if self.weight_decay < 0:
            raise ValueError("optim.weight_decay must be >= 0 (the seeds use 0.044)")
        if not all(0.0 <= b < 1.0 for b in self.betas):
            raise ValueError("optim.betas must lie in [0, 1), e.g. [0.9, 0.999]")
        if self.eps <= 0 or self.grad_clip < 0:
            raise ValueError("optim.eps must be > 0 and optim.grad_clip >= 0")
        if self.grad_accum < 1:
            raise ValueError("optim.grad_accum must be >= 1")
        if self.max_steps is not None and self.max_steps < 1:
            raise ValueError("optim.max_steps must be >= 1 (or null to train for optim.epochs)")
        if self.epochs <= 0:
            raise ValueError("optim.epochs must be > 0")


@dataclass
class DeepSpeedConfig:
    """ZeRO sharding, offload and precision; turned into DeepSpeed's config dict."""

    stage: Literal[0, 1, 2, 3] = 2
    """ZeRO stage: 0 plain data parallel, 1 optimizer states, 2 + gradients, 3 + parameters."""
    offload_optimizer: bool = False
    """Keep optimizer states (and the step) in CPU memory (ZeRO-Offload; GPU runs only)."""
    offload_params: bool = False
    """Keep parameters in CPU memory between uses (ZeRO-Infinity; stage 3, GPU runs only)."""
    dtype: Literal["auto", "bf16", "fp32"] = "auto"
    """auto: bf16 on GPUs that support it, else fp32. bf16 asked for on CPU is downgraded
    to fp32 with a warning."""

    def __post_init__(self) -> None:
        if self.offload_params and self.stage != 3:
            raise ValueError("deepspeed.offload_params needs deepspeed.stage: 3")
        if self.offload_optimizer and self.stage == 0:
            raise ValueError("deepspeed.offload_optimizer needs deepspeed.stage 1, 2 or 3")


@dataclass
class ScalingConfig:
    """Mirrors ``ray.train.ScalingConfig``."""

    num_workers: int = 1
    """Training workers (one per GPU, or per CPU slot)."""
    use_gpu: bool = False
    """One GPU per worker; false trains on CPU (fp32, gloo)."""
    resources_per_worker: dict[str, float] | None = None
    """e.g. {CPU: 1}; default: Ray's (1 CPU, plus 1 GPU with use_gpu)."""

    def __post_init__(self) -> None:
        if self.num_workers < 1:
            raise ValueError("scaling.num_workers must be >= 1")


@dataclass
class RunConfig:
    """Mirrors ``ray.train.RunConfig``. A rerun with the same name and storage_path resumes
    from the run's latest checkpoint."""

    name: str | None = None
    """Run name; default: the folder name of ``output_dir``."""
    storage_path: str | None = None
    """Where Ray Train keeps checkpoints (local, NFS, s3://, gs://); default: a ``runs``
    folder beside ``output_dir``."""

    def resolve(self, output_dir: str, folder: str) -> None:
        """Fill the defaults: name = ``output_dir``'s folder name, storage = ``folder``
        beside it (a prefix beside it when ``output_dir`` is a URI); a local storage path
        becomes absolute, a URI loses its trailing slash."""
        output_dir = output_dir.rstrip("/")
        if self.name is None:
            self.name = os.path.basename(output_dir)
        if self.storage_path is None:
            self.storage_path = f"{os.path.dirname(output_dir)}/{folder}"
        if "://" in self.storage_path:
            self.storage_path = self.storage_path.rstrip("/")
        else:
            self.storage_path = os.path.abspath(expand(self.storage_path))


@dataclass
class FailureConfig:
    """Mirrors ``ray.train.FailureConfig``."""

    max_failures: int = 0
    """Worker-group failures to recover from (restart from the latest checkpoint); -1: no limit."""

    def __post_init__(self) -> None:
        if self.max_failures < -1:
            raise ValueError("failure.max_failures must be >= 0, or -1 for no limit")


@dataclass
class CheckpointConfig:
    """Mirrors ``ray.train.CheckpointConfig``."""

    num_to_keep: int | None = 2
    """Most recent checkpoints kept in the run folder (null: all)."""

    def __post_init__(self) -> None:
        if self.num_to_keep is not None and self.num_to_keep < 1:
            raise ValueError("checkpoint.num_to_keep must be >= 1 (or null to keep all)")


@dataclass
class TrackingConfig:
    """Where rank 0 writes metrics: a CSV always, TensorBoard and MLflow optionally."""

    log_dir: str | None = None
    """metrics.csv, loss_curve.png, tensorboard/ and mlruns/ (a local or mounted folder,
    written by rank 0 on its node); default: ``logs`` in the run folder, or, when
    ``run.storage_path`` is a URI, ``runs/<name>-<hash of storage_path>/logs`` in the local
    cache (``$CELLFOUNDRY_CACHE_DIR``, else ``~/.cache/cellfoundry``). The model artifact
    gets metrics.csv and the loss curve through the checkpoints either way."""
    tensorboard: bool = True
    mlflow: bool = True
    mlflow_tracking_uri: str | None = None
    """Default: a local MLflow file store, ``file:<log_dir>/mlruns``."""
    mlflow_experiment: str = "cellfoundry-pretrain"

    def __post_init__(self) -> None:
        if self.log_dir is not None:
            self.log_dir = expand(self.log_dir)


def _local_log_dir(storage_path: str, name: str) -> str:
    """The default ``tracking.log_dir`` of a run kept on object storage: a folder of the
    local cache, distinct per storage URI and run name (the same on a rerun, so a resumed
    run on this machine appends to its metrics). Not shared between nodes: the model
    artifact takes its metrics from the checkpoints instead."""
    base = os.environ.get("CELLFOUNDRY_CACHE_DIR") or os.path.join("~", ".cache", "cellfoundry")
    tag = hashlib.sha256(storage_path.encode()).hexdigest()[:8]
    return os.path.join(os.path.expanduser(base), "runs", f"{name}-{tag}", "logs")


@dataclass
class PretrainJobConfig:
    """What ``cellfoundry pretrain`` and ``jobs/pretrain.py`` read."""

    data: DataConfig
    output_dir: str
    """The ``model`` artifact: a Hugging Face folder (config.json, model.safetensors,
    token_dictionary.json), the DeepSpeed training state, metrics and the loss curve. A
    local path or an object-store prefix (``s3://bucket/model``)."""
    model: ModelConfig = field(default_factory=ModelConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    deepspeed: DeepSpeedConfig = field(default_factory=DeepSpeedConfig)
    scaling: ScalingConfig = field(default_factory=ScalingConfig)
    run: RunConfig = field(default_factory=RunConfig)
    failure: FailureConfig = field(default_factory=FailureConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    checkpoint_every: int = 500
    """Optimizer steps between checkpoints (one is always written at the end)."""
    log_every: int = 10
    """Optimizer steps between metric rows (loss, accuracy, LR, tokens/s, MFU)."""
    eval_every: int = 100
    """Optimizer steps between validation losses (and one at the last step); used when
    ``data.validation`` holds cells out. Its rows carry ``val_loss`` beside ``loss``."""
    seed: int = 0
    """Initial weights, data order, masks and dropout are functions of (seed, step, rank)."""
    stop_at_step: int | None = None
    """Checkpoint and stop after this step, as if preempted; the LR schedule still follows
    the full run, and a rerun with the same run name continues. Null: train to the end."""
    ray: RayConfig = field(default_factory=RayConfig)

    def __post_init__(self) -> None:
        self.output_dir = _local_or_uri(self.output_dir)
        if "://" in self.output_dir:
            self.output_dir = self.output_dir.rstrip("/")
        self.run.resolve(self.output_dir, "runs")
        assert self.run.storage_path is not None and self.run.name is not None
        if self.tracking.log_dir is None:
            if "://" in self.run.storage_path:
                self.tracking.log_dir = _local_log_dir(self.run.storage_path, self.run.name)
            else:
                self.tracking.log_dir = os.path.join(self.run.storage_path, self.run.name, "logs")
        if "://" in self.tracking.log_dir:
            raise ValueError(
                f"tracking.log_dir {self.tracking.log_dir} is a URI: TensorBoard, MLflow's file "
                "store and the CSV are written to a local or mounted folder; set one, or leave "
                "it unset for the default"
            )
        self.tracking.log_dir = os.path.abspath(self.tracking.log_dir)
        if self.checkpoint_every < 1 or self.log_every < 1 or self.eval_every < 1:
            raise ValueError(
                "checkpoint_every, log_every and eval_every must be >= 1 (optimizer steps)"
            )
        if self.stop_at_step is not None and self.stop_at_step < 1:
            raise ValueError("stop_at_step must be >= 1, or null to train to the end")
