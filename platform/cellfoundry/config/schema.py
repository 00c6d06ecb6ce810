"""Typed configs. Each field's meaning sits right under it; checks live in ``__post_init__``."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from cellfoundry.paths import expand


@dataclass
class RayConfig:
    """How to reach Ray. Mirrors the arguments of ``ray.init``."""

    address: str | None = None
    """Cluster address; None means ``$RAY_ADDRESS`` if set (as under ``ray job submit``),
    else a new local in-process cluster bound to 127.0.0.1."""
    num_cpus: int | None = None
    """CPUs of the local cluster (None: all). Ignored when connecting to a cluster."""
    object_store_memory: int | None = None
    """Bytes of object store for the local cluster (None: Ray's default)."""

    def __post_init__(self) -> None:
        if self.num_cpus is not None and self.num_cpus < 1:
            raise ValueError("ray.num_cpus must be >= 1 (or null for all CPUs)")
        if self.object_store_memory is not None and self.object_store_memory < 75 * 1024**2:
            raise ValueError(
                "ray.object_store_memory must be at least 78643200 (75 MiB), Ray's minimum"
            )


@dataclass
class ActorPoolConfig:
    """Bounds of an autoscaling actor pool (Ray Data's ``ActorPoolStrategy(min_size=...,
    max_size=...)``): the pool starts at ``min_actors`` and grows while work is queued and
    the cluster has room, so nodes that join while a step runs get actors too."""

    min_actors: int = 1
    """Actors the pool keeps (ActorPoolStrategy's min_size)."""
    max_actors: int | None = None
    """Most actors at once (ActorPoolStrategy's max_size); null: no fixed cap, the pool grows
    with the cluster (Ray Data also asks the autoscaler for nodes while the pool is busy)."""

    def __post_init__(self) -> None:
        if self.min_actors < 1:
            raise ValueError("compute.min_actors must be >= 1")
        if self.max_actors is not None and self.max_actors < self.min_actors:
            raise ValueError(
                f"compute.max_actors ({self.max_actors}) must be >= compute.min_actors "
                f"({self.min_actors}), or null for no fixed cap"
            )


@dataclass
class QCConfig:
    """Per-dataset quality control, as in the Geneformer seeds."""

    n_sd: float = 3.0
    """Cells whose total counts or mitochondrial percentage lie more than n_sd standard
    deviations from their dataset's mean are filtered."""
    min_protein_coding_genes: int = 7
    """Cells with fewer detected protein-coding genes are filtered."""
    exclude_malignant: bool = True
    """Exclude datasets flagged malignant in the catalog."""
    exclude_cell_line: bool = True
    """Exclude datasets flagged as cell lines."""
    exclude_non_droplet: bool = True
    """Exclude datasets whose platform is not droplet-based."""
    deduplicate_cells: bool = True
    """Drop cells that copy an earlier cell (catalog order), across datasets."""
    duplicate_min_identity: float = 0.99
    """A cell copies another when, over the genes both datasets measure, their counts are
    identical on at least this share of the genes either expresses."""

    def __post_init__(self) -> None:
        if self.n_sd <= 0:
            raise ValueError("qc.n_sd must be > 0 (the seeds use 3)")
        if not 0.5 <= self.duplicate_min_identity <= 1.0:
            raise ValueError("qc.duplicate_min_identity must be within [0.5, 1] (default 0.99)")
        if self.min_protein_coding_genes < 0:
            raise ValueError("qc.min_protein_coding_genes must be >= 0 (the seeds use 7)")


@dataclass
class MediansConfig:
    """Corpus-wide non-zero medians of depth-normalised expression."""

    method: Literal["exact", "sketch"] = "exact"
    """exact: two or more passes, exact order statistics; sketch: one pass, bounded error."""
    bins: int = 2048
    """Log-spaced histogram bins over [1e-3, 1e4]; the sketch's relative error is
    10**(7/bins) - 1 (0.79% at 2048)."""
    max_values_per_gene: int = 200_000
    """Exact mode collects at most this many values per gene in memory; more triggers a
    refining pass."""

    def __post_init__(self) -> None:
        if self.bins < 16:
            raise ValueError("medians.bins must be >= 16")
        if self.max_values_per_gene < 2:
            raise ValueError("medians.max_values_per_gene must be >= 2")


@dataclass
class TokenizeConfig:
    """Rank value encoding (see DESIGN.md)."""

    mode: Literal["v1", "v2"] = "v2"
    """v2: <cls> + 4,094 genes + <eos>; v1: 2,048 genes, no special tokens."""
    dictionaries: str | None = None
    """A Geneformer dictionary folder (token + median dictionaries) to use instead of the
    corpus's own medians and vocabulary, e.g. ../shared/geneformer/v2."""
    model_input_size: int | None = None
    """Tokens per cell including special tokens (default 4,096 for v2, 2,048 for v1)."""

    def __post_init__(self) -> None:
        if self.dictionaries is not None:
            self.dictionaries = expand(self.dictionaries)
        if self.model_input_size is None:
            self.model_input_size = 4096 if self.mode == "v2" else 2048
        if self.model_input_size < (3 if self.mode == "v2" else 1):
            raise ValueError("tokenize.model_input_size is too small to hold any gene")

    @property
    def max_genes(self) -> int:
        """Genes kept per cell (input size less the special tokens)."""
        assert self.model_input_size is not None
        return self.model_input_size - (2 if self.mode == "v2" else 0)


@dataclass
class CorpusConfig:
    """Stage 1: catalog -> cells -> medians -> vocabulary -> tokenized."""

    catalog: str
    """Catalog file (YAML or CSV) listing the datasets; relative URIs in it are relative to it."""
    output_dir: str
    """Root folder of the artifacts (catalog/, cells/, medians/, vocabulary/, tokenized/)."""
    gene_table: str | None = None
    """Gene table (Ensembl ID, symbol, biotype, HGNC previous/alias symbols); default:
    ../shared/data/genes/human_genes_ensembl_hgnc.tsv.gz."""
    rows_per_chunk: int = 4096
    """Cells per read task (one Ray task per file chunk); each chunk becomes one Parquet
    file of the cells and tokenized artifacts, so this is also the shard size."""
    qc: QCConfig = field(default_factory=QCConfig)
    medians: MediansConfig = field(default_factory=MediansConfig)
    tokenize: TokenizeConfig = field(default_factory=TokenizeConfig)
    compute: ActorPoolConfig = field(default_factory=ActorPoolConfig)
    """Actor pool of each per-file step (ingest, QC, encode); one CPU per actor."""
    single_task_max_cells: int = 50_000
    """Corpora of at most this many cells run the duplicate search and the medians each in
    one Ray task (same results) instead of distributed Ray Data steps, whose shuffle and
    reducer actors cost tens of seconds before any work; 0: always distributed. Memory of
    that task: the medians' histograms (8 bytes x genes x bins) and one cells file."""

    def __post_init__(self) -> None:
        self.catalog = expand(self.catalog)
        self.output_dir = expand(self.output_dir)
        if self.gene_table is not None:
            self.gene_table = expand(self.gene_table)
        if self.rows_per_chunk < 1:
            raise ValueError("corpus.rows_per_chunk must be >= 1")
        if self.single_task_max_cells < 0:
            raise ValueError("corpus.single_task_max_cells must be >= 0 (0: always distributed)")


@dataclass
class CorpusJobConfig:
    """What ``cellfoundry corpus`` and ``jobs/corpus.py`` read."""

    corpus: CorpusConfig
    ray: RayConfig = field(default_factory=RayConfig)
