"""Typed configs of stage 3 (fine-tuning and hyperparameter search). ``tune``, ``search``
and ``scheduler`` mirror Ray's ``TuneConfig``, ``HyperOptSearch`` and ``ASHAScheduler``
field for field; ``lora`` and ``quantization`` mirror ``peft.LoraConfig`` and
``transformers.BitsAndBytesConfig``; ``scaling`` and ``run`` are stage 2's. Optimizer
fields carry the names of Hugging Face ``TrainingArguments``. This module imports neither
torch nor Ray.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any, Literal

from cellfoundry.config.schema import RayConfig
from cellfoundry.config.train import RunConfig, ScalingConfig
from cellfoundry.paths import expand
from cellfoundry.storage import is_remote, normalize


def location(path: str) -> str:
    """A configured path or URI made canonical: ``{shared}``, ``$VARS`` and ``~`` expanded;
    an object-store URI (``s3://``, ``gs://``) kept as a URI, a local path made absolute.
    (``os.path.abspath`` alone would turn ``s3://b/k`` into a local ``.../s3:/b/k``.)"""
    path = expand(path)
    return normalize(path) if is_remote(path) else os.path.abspath(path)


#: Baselines on normalised counts of highly variable genes (scikit-learn).
BASELINES = ("logreg", "random_forest", "svm")


@dataclass
class LabelDataConfig:
    """Labelled cells: tokens from a ``tokenized`` artifact, raw counts from ``cells``."""

    tokenized: str
    """Folder of ``part-*.parquet`` shards (``cell_id``, ``input_ids``, metadata columns), or
    the ``s3://`` / ``gs://`` URI of a tokenized artifact (its manifest lists the shards)."""
    cells: str | None = None
    """The ``cells`` artifact (raw counts, a folder or URI) for the baselines; default:
    ``cells`` beside ``tokenized`` when it exists. Cells join on ``cell_id``."""
    label_column: str = "cell_type"
    """Metadata column of the cell labels (cell task); cells with a null label are dropped."""
    dataset_ids: list[str] = field(default_factory=list)
    """Keep only these datasets (``dataset_id``); empty: all."""
    max_length: int | None = None
    """Tokens per cell; longer cells keep their top-ranked genes and ``<eos>``. Default: the
    model's max_position_embeddings."""
    batch_size: int = 16
    """Cells per batch."""
    max_train_cells: int | None = None
    """Train on at most this many cells (stratified by label, seeded; validation and test
    are unchanged): for quick runs."""
    few_shot: int | None = None
    """Train on at most N cells per class (few-shot); validation and test are unchanged."""
    min_cells_per_class: int = 2
    """Classes with fewer labelled cells are dropped (with a warning)."""

    def __post_init__(self) -> None:
        self.tokenized = location(self.tokenized)
        if self.cells is not None:
            self.cells = location(self.cells)
        if self.max_length is not None and self.max_length < 3:
            raise ValueError("data.max_length must be >= 3 (or null for the model's maximum)")
        if self.batch_size < 1:
            raise ValueError("data.batch_size must be >= 1")
        if self.max_train_cells is not None and self.max_train_cells < 2:
            raise ValueError("data.max_train_cells must be >= 2 (or null for all cells)")
        if self.few_shot is not None and self.few_shot < 1:
            raise ValueError("data.few_shot must be >= 1 cell per class (or null for all)")
        if self.min_cells_per_class < 1:
            raise ValueError("data.min_cells_per_class must be >= 1")


@dataclass
class SplitConfig:
    """How cells are split so that no group leaks between train and test."""

    column: str | None = None
    """A given split column (e.g. ``split``): rows in ``train_values`` train, rows in
    ``test_values`` test. Null: split by ``group_by`` or by stratified cells."""
    train_values: list[str] = field(default_factory=lambda: ["train"])
    test_values: list[str] = field(default_factory=lambda: ["test"])
    group_by: str | None = None
    """Attribute whose groups never straddle train and test (e.g. dataset_id, donor)."""
    test_size: float = 0.2
    """Share of cells (or groups) in test when no split column is given."""
    k_folds: int = 1
    """> 1: k-fold cross-validation (by group with ``group_by``); fold ``fold`` is tested,
    or every fold when ``fold`` is null."""
    fold: int | None = None
    validation_size: float = 0.15
    """Share of the training cells (or groups) held out for validation (the metric that
    Tune maximises and epochs are chosen by)."""
    seed: int = 0

    def __post_init__(self) -> None:
        if not 0.0 < self.test_size < 1.0:
            raise ValueError("split.test_size must lie in (0, 1), e.g. 0.2")
        if not 0.0 < self.validation_size < 1.0:
            raise ValueError("split.validation_size must lie in (0, 1), e.g. 0.15")
        if self.k_folds < 1:
            raise ValueError("split.k_folds must be >= 1 (1: one train/test split)")
        if self.k_folds > 1 and self.column is not None:
            raise ValueError("split.k_folds > 1 makes its own folds: set split.column to null")
        if self.fold is not None and not 0 <= self.fold < self.k_folds:
            raise ValueError(f"split.fold must lie in [0, {self.k_folds}) or be null for all folds")


@dataclass
class TaskConfig:
    """Cell classification (a metadata column) or gene classification (gene label lists)."""

    kind: Literal["cell", "gene"] = "cell"
    """cell: ``BertForSequenceClassification``; gene: ``BertForTokenClassification``."""
    gene_labels: dict[str, list[str]] = field(default_factory=dict)
    """Gene task: label -> Ensembl IDs, e.g. {sensitive: [...], insensitive: [...]}."""
    gene_labels_file: str | None = None
    """Gene task: a JSON or YAML file with that mapping (instead of ``gene_labels``)."""

    def __post_init__(self) -> None:
        if self.gene_labels_file is not None:
            self.gene_labels_file = location(self.gene_labels_file)
        if self.kind == "gene" and not self.gene_labels and self.gene_labels_file is None:
            raise ValueError("task.kind gene needs task.gene_labels or task.gene_labels_file")


@dataclass
class LoraConfig:
    """Mirrors ``peft.LoraConfig`` (QLoRA adapters)."""

    r: int | None = None
    """Rank; default from the seeds: 32 for cells, 128 for genes."""
    lora_alpha: int | None = None
    """Scale numerator; default 2 x r (64 for cells, 256 for genes)."""
    lora_dropout: float = 0.1
    target_modules: list[str] = field(default_factory=lambda: ["query", "key", "value"])
    bias: Literal["none", "all", "lora_only"] = "none"

    def __post_init__(self) -> None:
        if (self.r is not None and self.r < 1) or (
            self.lora_alpha is not None and self.lora_alpha < 1
        ):
            raise ValueError("lora.r and lora.lora_alpha must be >= 1 (or null for the defaults)")
        if not 0.0 <= self.lora_dropout < 1.0:
            raise ValueError("lora.lora_dropout must lie in [0, 1)")


@dataclass
class QuantizationConfig:
    """Mirrors ``transformers.BitsAndBytesConfig`` for the QLoRA base model."""

    load_in_4bit: bool = True
    """4-bit base weights (QLoRA); false: 8-bit."""
    bnb_4bit_quant_type: Literal["nf4", "fp4"] = "nf4"
    bnb_4bit_use_double_quant: bool = True
    bnb_4bit_compute_dtype: Literal["auto", "bf16", "fp32"] = "auto"
    """auto: bf16 on GPUs that support it, else fp32."""
    llm_int8_skip_modules: list[str] = field(
        default_factory=lambda: ["classifier", "pooler", "pooler.dense"]
    )
    """Modules kept unquantized: the new head and pooler (k-bit heads cannot train)."""


@dataclass
class FinetuneModelConfig:
    """The pretrained model and how it is adapted."""

    model_dir: str
    """A ``model`` artifact or Hugging Face BERT folder (e.g. artifacts/smoke/model), or the
    ``s3://`` / ``gs://`` URI of a model artifact (each node downloads it once)."""
    mode: Literal["full", "probe", "qlora"] = "full"
    """full: all weights train; probe: logistic regression on frozen mean-pooled cell
    embeddings (zero-shot encoder); qlora: 4-bit NF4 base + LoRA adapters."""
    freeze_layers: int = 0
    """full: freeze the embeddings and the first N encoder layers."""
    dropout: float | None = None
    """Hidden and attention dropout; null: the pretrained config's."""
    lora: LoraConfig = field(default_factory=LoraConfig)
    quantization: QuantizationConfig = field(default_factory=QuantizationConfig)

    def __post_init__(self) -> None:
        self.model_dir = location(self.model_dir)
        if self.freeze_layers < 0:
            raise ValueError("model.freeze_layers must be >= 0")
        if self.dropout is not None and not 0.0 <= self.dropout < 1.0:
            raise ValueError("model.dropout must lie in [0, 1) or be null")


@dataclass
class FinetuneOptimConfig:
    """AdamW with warm-up and a scheduler; names as in ``transformers.TrainingArguments``."""

    learning_rate: float = 5e-5
    lr_scheduler_type: Literal["linear", "cosine", "polynomial", "constant"] = "linear"
    warmup_ratio: float = 0.1
    weight_decay: float = 0.01
    max_grad_norm: float = 1.0
    """Clip the global gradient norm (0: no clipping)."""
    num_train_epochs: int = 3
    """Epochs; each ends with a validation (one Tune report, one ASHA rung step)."""
    max_steps_per_epoch: int | None = None
    """Cap on batches per epoch (quick runs); null: the whole training split."""

    def __post_init__(self) -> None:
        if self.learning_rate <= 0:
            raise ValueError("optim.learning_rate must be > 0 (e.g. 5e-5)")
        if not 0.0 <= self.warmup_ratio < 1.0:
            raise ValueError("optim.warmup_ratio must lie in [0, 1)")
        if self.weight_decay < 0 or self.max_grad_norm < 0:
            raise ValueError("optim.weight_decay and optim.max_grad_norm must be >= 0")
        if self.num_train_epochs < 1:
            raise ValueError("optim.num_train_epochs must be >= 1")
        if self.max_steps_per_epoch is not None and self.max_steps_per_epoch < 1:
            raise ValueError("optim.max_steps_per_epoch must be >= 1 or null")


@dataclass
class BaselineConfig:
    """scikit-learn baselines on normalised counts of highly variable genes, same splits."""

    methods: list[str] = field(default_factory=lambda: list(BASELINES))
    """Any of logreg, random_forest, svm; empty: no baselines."""
    n_top_genes: int = 2000
    """Highly variable genes (by dispersion of log1p(CP10k), on training cells only)."""
    max_iter: int = 1000

    def __post_init__(self) -> None:
        unknown = sorted(set(self.methods) - set(BASELINES))
        if unknown:
            raise ValueError(f"baselines.methods: unknown {unknown}; choose from {list(BASELINES)}")
        if self.n_top_genes < 2 or self.max_iter < 1:
            raise ValueError("baselines.n_top_genes must be >= 2 and baselines.max_iter >= 1")


@dataclass
class FinetuneJobConfig:
    """What ``cellfoundry finetune`` and ``jobs/finetune.py`` read (and each Tune trial)."""

    data: LabelDataConfig
    model: FinetuneModelConfig
    split: SplitConfig = field(default_factory=SplitConfig)
    task: TaskConfig = field(default_factory=TaskConfig)
    optim: FinetuneOptimConfig = field(default_factory=FinetuneOptimConfig)
    baselines: BaselineConfig = field(default_factory=BaselineConfig)
    scaling: ScalingConfig = field(default_factory=ScalingConfig)
    """One worker per run or trial; ``resources_per_worker`` (e.g. {CPU: 1}) and
    ``use_gpu`` set what it reserves."""
    output_dir: str | None = None
    """The fine-tuned model artifact, a folder or an ``s3://`` / ``gs://`` prefix (required
    for ``cellfoundry finetune``)."""
    seed: int = 0
    """Head initialisation, data order, dropout and few-shot sampling."""
    log_every: int = 20
    """Optimizer steps between progress lines (step, loss, cells/s, ETA) on the console;
    every epoch also ends with its validation line. Does not change the model."""
    ray: RayConfig = field(default_factory=RayConfig)

    def __post_init__(self) -> None:
        if self.output_dir is not None:
            self.output_dir = location(self.output_dir)
        if self.scaling.num_workers != 1:
            raise ValueError("scaling.num_workers must be 1: a fine-tuning run is one worker")
        if self.log_every < 1:
            raise ValueError("log_every must be >= 1 (optimizer steps between progress lines)")
        if self.model.mode == "probe" and self.task.kind == "gene":
            raise ValueError("model.mode probe is for cells; use full or qlora for task.kind gene")


@dataclass
class TuneConfig:
    """Mirrors ``ray.tune.TuneConfig``."""

    metric: str = "val_macro_f1"
    mode: Literal["max", "min"] = "max"
    num_samples: int = 8
    """Trials to run."""
    max_concurrent_trials: int | None = None
    """Null: as many as the cluster fits (more queue, and the autoscaler adds nodes)."""
    time_budget_s: float | None = None

    def __post_init__(self) -> None:
        if self.num_samples < 1:
            raise ValueError("tune.num_samples must be >= 1")
        if self.max_concurrent_trials is not None and self.max_concurrent_trials < 1:
            raise ValueError("tune.max_concurrent_trials must be >= 1 or null")


@dataclass
class HyperOptConfig:
    """Mirrors ``ray.tune.search.hyperopt.HyperOptSearch``."""

    n_initial_points: int = 20
    """Random trials before TPE takes over."""
    random_state_seed: int | None = 0


@dataclass
class ASHAConfig:
    """Mirrors ``ray.tune.schedulers.ASHAScheduler`` (rungs in epochs)."""

    time_attr: str = "training_iteration"
    max_t: int | None = None
    """Default: optim.num_train_epochs."""
    grace_period: int = 1
    reduction_factor: float = 2.0
    brackets: int = 1

    def __post_init__(self) -> None:
        if self.grace_period < 1 or self.reduction_factor <= 1:
            raise ValueError("scheduler.grace_period must be >= 1 and reduction_factor > 1")


@dataclass
class TuneJobConfig:
    """What ``cellfoundry tune`` and ``jobs/tune.py`` read."""

    finetune: FinetuneJobConfig
    """The base run; each trial overrides the keys of ``space``."""
    output_dir: str
    """The best trial's model artifact (metrics and the trial table beside it)."""
    space: dict[str, dict[str, list[Any]]] = field(default_factory=dict)
    """Dotted finetune keys -> one distribution, e.g. {optim.learning_rate: {loguniform:
    [1e-5, 1e-3]}}; kinds: uniform, loguniform, quniform, randint, choice."""
    tune: TuneConfig = field(default_factory=TuneConfig)
    search: HyperOptConfig = field(default_factory=HyperOptConfig)
    scheduler: ASHAConfig = field(default_factory=ASHAConfig)
    run: RunConfig = field(default_factory=RunConfig)
    """Experiment name and storage; a rerun with both unchanged resumes (Tuner.restore)."""
    interrupt_after_trials: int | None = None
    """Stop the search (state saved, as if preempted) once this many trials have finished;
    a rerun restores it and runs the rest. Null: run to the end."""
    ray: RayConfig = field(default_factory=RayConfig)

    def __post_init__(self) -> None:
        self.output_dir = location(self.output_dir)
        self.run.resolve(self.output_dir, "tune_runs")
        kinds = {"uniform", "loguniform", "quniform", "randint", "choice"}
        for key, dist in self.space.items():
            if len(dist) != 1 or next(iter(dist)) not in kinds:
                raise ValueError(
                    f"space.{key}: give one of {sorted(kinds)} with its arguments, "
                    "e.g. {loguniform: [1e-5, 1e-3]}"
                )
        if self.interrupt_after_trials is not None and self.interrupt_after_trials < 1:
            raise ValueError("interrupt_after_trials must be >= 1 or null")


@dataclass
class ProbeConfig:
    """What ``cellfoundry evaluate probe`` reads: a linear probe on frozen cell embeddings vs
    the fine-tuned classifier vs scikit-learn baselines on raw counts, on the same splits."""

    finetune: FinetuneJobConfig
    """Data, splits, pretrained model, fine-tuning and baseline settings (``model.mode`` and
    ``output_dir`` are not used: ``methods`` says what runs)."""
    output_dir: str
    """probe_report.json, probe_report.md, confusion_matrix.png, roc.png (a folder, or an
    ``s3://`` / ``gs://`` prefix: probe_report.json is uploaded last)."""
    methods: list[str] = field(default_factory=lambda: ["probe", "full"])
    """Any of probe (frozen encoder + logistic regression), full, qlora (fine-tuned)."""
    finetuned_dir: str | None = None
    """A ``finetuned`` artifact (from ``cellfoundry finetune`` on the same data and splits)
    to score instead of fine-tuning its mode here."""

    def __post_init__(self) -> None:
        self.output_dir = location(self.output_dir)
        if self.finetuned_dir is not None:
            self.finetuned_dir = location(self.finetuned_dir)
        unknown = sorted(set(self.methods) - {"probe", "full", "qlora"})
        if unknown or not self.methods:
            raise ValueError(f"methods: {unknown or 'empty'}; choose from probe, full, qlora")
        if self.finetune.task.kind != "cell":
            raise ValueError("the probe comparison is for cells: set finetune.task.kind: cell")
