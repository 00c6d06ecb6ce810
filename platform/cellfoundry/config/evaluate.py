"""Typed configs of the evaluation stage: masked-gene accuracy and batch-robustness metrics.

``cellfoundry evaluate masked`` reads :class:`MaskedEvalConfig`, ``cellfoundry evaluate batch``
reads :class:`BatchEvalConfig`. This module imports neither torch nor Ray.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Literal

from cellfoundry.config.tune import location
from cellfoundry.storage import is_remote, join, parent


@dataclass
class HoldoutConfig:
    """Which cells are evaluated (held out); every other cell fits the rank baseline."""

    mode: Literal["column", "hash"] = "column"
    """column: held out = cells whose ``column`` value is one of ``values``; hash: held out =
    cells whose cell_id hashes (with ``seed``) below ``fraction`` (deterministic, any corpus)."""
    column: str = "split"
    """Metadata column of the tokenized shards (mode column)."""
    values: list[str] = field(default_factory=lambda: ["test"])
    """Values of ``column`` that mark held-out cells (mode column)."""
    fraction: float = 0.1
    """Share of cells held out (mode hash)."""
    seed: int = 0
    """Seed of the cell_id hash (mode hash) and of the ``max_cells`` subsample."""
    train_values: list[str] | None = None
    """Mode column: the rank baseline uses only cells whose ``column`` is one of these (e.g.
    [train]); null: every cell that is not held out."""
    max_cells: int | None = None
    """Evaluate at most this many held-out cells (a deterministic hash subsample); null: all."""

    def __post_init__(self) -> None:
        if self.mode == "column" and not self.values:
            raise ValueError(
                "holdout.values must name at least one value of holdout.column, e.g. [test]"
            )
        if not 0.0 < self.fraction < 1.0:
            raise ValueError("holdout.fraction must lie in (0, 1), e.g. 0.1")
        if self.max_cells is not None and self.max_cells < 1:
            raise ValueError("holdout.max_cells must be >= 1, or null for all held-out cells")


@dataclass
class MaskedEvalConfig:
    """What ``cellfoundry evaluate masked`` reads."""

    model: str
    """Model directory (config.json, model.safetensors, token_dictionary.json), or the
    ``s3://`` / ``gs://`` URI of a model artifact (downloaded once per machine)."""
    tokenized: str
    """Tokenized artifact (folder or URI): ``part-*.parquet`` shards with ``cell_id`` and
    ``input_ids``."""
    output_dir: str | None = None
    """Where metrics.json, report.md, per_cell.parquet and the PNGs go (a folder or an
    ``s3://`` / ``gs://`` prefix); default: ``<model name>-eval-masked`` beside the model."""
    holdout: HoldoutConfig = field(default_factory=HoldoutConfig)
    mask_fraction: float = 0.15
    """Share of each cell's gene tokens replaced by ``<mask>`` (at least one per cell)."""
    seed: int = 0
    """Masked positions are a function of (seed, cell_id) only."""
    max_length: int | None = None
    """Tokens per cell fed to the model (longer cells keep their top genes and ``<eos>``);
    default: the model's max_position_embeddings."""
    batch_size: int = 64
    """Cells per forward pass (cells are sorted by length within each shard)."""
    device: Literal["auto", "cpu", "cuda"] = "auto"
    """auto: cuda when available, else cpu."""
    dtype: Literal["auto", "fp32", "bf16"] = "auto"
    """auto: bf16 autocast on GPUs that support it, fp32 otherwise; bf16 on a CPU is
    downgraded to fp32 with a warning."""
    group_by: str | None = "dataset_id"
    """Also report accuracies per value of this metadata column (null: no breakdown)."""

    def __post_init__(self) -> None:
        self.model = location(self.model)
        self.tokenized = location(self.tokenized)
        if self.output_dir is None:
            name = self.model.rstrip("/").rpartition("/")[2]
            self.output_dir = join(parent(self.model), f"{name}-eval-masked")
        self.output_dir = location(self.output_dir)
        if not 0.0 < self.mask_fraction < 1.0:
            raise ValueError("mask_fraction must lie in (0, 1); Geneformer masks 0.15")
        if self.max_length is not None and self.max_length < 3:
            raise ValueError("max_length must be >= 3 (or null for the model's maximum)")
        if self.batch_size < 1:
            raise ValueError("batch_size must be >= 1")


@dataclass
class BatchEvalConfig:
    """What ``cellfoundry evaluate batch`` reads (the embedding contract of stage 4)."""

    embeddings: str
    """Cell embeddings: .h5ad with ``.obsm[obsm_key]`` (n_cells, hidden) and metadata in ``.obs``."""
    batch_key: str = "dataset_id"
    """``.obs`` column naming each cell's batch (e.g. dataset_id: one 10x chemistry each)."""
    label_key: str = "cell_type"
    """``.obs`` column with cell types; cells with an empty or missing label only enter the
    label-free (same batch vs other batch) comparison."""
    gene_embeddings: str | None = None
    """Gene embeddings Parquet (ensembl_id, token_id, group, n_cells, embedding); null: the
    ``genes.parquet`` that ``cellfoundry embed`` writes beside the .h5ad
    (``<embeddings stem>.embeddings/genes.parquet``) when it exists (for embeddings on
    object storage, looked up in that artifact's manifest when the evaluation runs);
    "none": skip genes (kept as "").
    The separability index needs them grouped (e.g. embed with group_by: dataset_id)."""
    output_dir: str | None = None
    """Where metrics.json, report.md and the PNGs go; default: ``<embeddings stem>-eval-batch``
    beside the embeddings file."""
    obsm_key: str = "X_cellfoundry"
    batches: list[str] | None = None
    """Keep only cells of these batches (e.g. [pbmc1k_v2_raw, pbmc1k_v3_filt]); null: all."""
    label_map: dict[str, str] = field(default_factory=dict)
    """Rename labels before comparing, to harmonise datasets' vocabularies (e.g. pbmc_facs
    "CD19+ B" and pbmc3k "B" -> "B"); labels not in the map are kept as they are."""
    max_pairs: int = 20000
    """Pairs per category: all of them when there are at most this many, else this many
    sampled uniformly (with replacement) with ``seed``."""
    max_nn: int = 20000
    """Rows entering the nearest-neighbour indices (cells; gene embeddings): beyond this, a
    seeded subsample (of whole genes for gene embeddings). Cost grows with its square."""
    gene_groups: list[str] | None = None
    """Keep only gene embeddings of these groups (e.g. the batches compared); null: all."""
    min_gene_cells: int = 1
    """Gene embeddings averaged over fewer cells than this are left out."""
    seed: int = 0

    def __post_init__(self) -> None:
        self.embeddings = location(self.embeddings)
        if self.gene_embeddings is None:
            beside = os.path.join(
                os.path.splitext(self.embeddings)[0] + ".embeddings", "genes.parquet"
            )
            # a URI is not probed while a config loads (no network here): name it to use it
            local = not is_remote(beside) and os.path.exists(beside)
            self.gene_embeddings = beside if local else None
        elif self.gene_embeddings.lower() in ("none", ""):
            self.gene_embeddings = ""  # off, unlike null (not given: looked up at run time)
        else:
            self.gene_embeddings = location(self.gene_embeddings)
        if self.output_dir is None:
            stem = os.path.splitext(self.embeddings)[0]
            self.output_dir = f"{stem}-eval-batch"
        self.output_dir = location(self.output_dir)
        if self.max_pairs < 1 or self.max_nn < 2:
            raise ValueError("max_pairs must be >= 1 and max_nn >= 2")
        if self.min_gene_cells < 1:
            raise ValueError("min_gene_cells must be >= 1")
