"""Typed configs of stage 4 (embeddings and in-silico perturbation screens).

``compute`` mirrors the arguments of Ray Data's ``map_batches`` (``batch_size``,
``num_gpus``, ``num_cpus``; ``min_actors`` / ``max_actors`` bound its autoscaling
``ActorPoolStrategy``, ``concurrency`` fixes its size) plus how each actor runs the model.
This module imports neither torch nor Ray.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Literal

from cellfoundry.config.schema import ActorPoolConfig, RayConfig
from cellfoundry.paths import expand

KINDS = ("delete", "overexpress", "inhibit", "activate")
METRICS = ("geneformer", "pooled")


def resolve_layer_convention(layer: int | None, emb_layer: int | None) -> int:
    """Our ``layer`` index from either convention (the table in :class:`PerturbJobConfig`);
    neither given: -2, the second-to-last layer (Geneformer's ``emb_layer: -1``)."""
    if layer is not None and emb_layer is not None:
        raise ValueError(
            f"give layer ({layer}, ours: -1 last, -2 second-to-last) or emb_layer ({emb_layer}, "
            "Geneformer's: 0 last, -1 second-to-last), not both"
        )
    if emb_layer is not None:
        if emb_layer > 0:
            raise ValueError(
                f"emb_layer {emb_layer}: Geneformer's emb_layer counts back from the last layer "
                "(0 last, -1 second-to-last); for a layer counted from the first use layer"
            )
        return emb_layer - 1
    return -2 if layer is None else layer


def emb_layer_of(layer: int, num_layers: int | None = None) -> int | None:
    """Geneformer's ``emb_layer`` of our ``layer`` (None for a layer counted from the first
    when the model's depth is not known)."""
    if layer < 0:
        return layer + 1
    return None if num_layers is None else layer - num_layers + 1


def _local_or_uri(path: str) -> str:
    """``path`` with ``{shared}``/``~``/``$VARS`` expanded and made absolute (Ray actors do
    not run in the driver's working directory); an object-store URI (``s3://bucket/key``)
    is kept as it is, less a trailing slash."""
    return path.rstrip("/") if "://" in path else os.path.abspath(expand(path))


@dataclass
class InferComputeConfig(ActorPoolConfig):
    """Where and how the model runs: an actor pool of ``map_batches``, each actor loading
    the model once. The pool autoscales between ``min_actors`` and ``max_actors`` (null: it
    grows with the cluster), unless ``concurrency`` fixes its size."""

    batch_size: int = 256
    """Cells per Ray Data batch handed to an actor (map_batches' batch_size)."""
    model_batch_size: int = 32
    """Sequences per forward pass inside an actor (after sorting by length)."""
    max_tokens: int | None = None
    """Also cap the padded tokens of one forward pass (null: rows only)."""
    concurrency: int | None = None
    """A fixed pool of this many actors (``ActorPoolStrategy(size=...)``) instead of
    min_actors..max_actors; null: autoscale."""
    num_gpus: float = 0
    """GPUs per actor (map_batches' num_gpus); 0 runs on CPU."""
    num_cpus: float = 1
    """CPUs per actor (map_batches' num_cpus)."""
    device: str = "auto"
    """auto: CUDA when the actor has a GPU, else CPU."""
    dtype: Literal["auto", "fp32", "bf16", "fp16"] = "auto"
    """auto: for embeddings bf16 weights on CUDA, fp32 on CPU; for perturbation screens
    fp32 everywhere (bf16 moved ``<cls>`` cosines by up to 2.1e-3, a median 1.9% of the
    shift, and real shifts are often small). bf16/fp16 stay possible by asking (on CPU they
    become fp32, warned); the screen's manifest and ``stats.parquet`` record the precision
    that ran. Note: the screens' default stays fp32 unless ``bench/perturb.py`` measures a
    Spearman correlation >= 0.99 between bf16 and fp32 cell shifts on the target hardware
    (``precision.bf16_vs_fp32.shift_spearman``), and then only for that hardware."""
    compile: bool = False
    """torch.compile the encoder layers (dynamic shapes; GPU runs)."""
    wait_for_nodes: bool = False
    """An autoscaling cluster whose nodes with the asked CPUs / GPUs join later: only warn
    when the cluster as it is cannot place the actor pool. False (the default): such a job
    fails at once with the numbers instead of waiting for resources that never come."""

    def __post_init__(self) -> None:
        if self.batch_size < 1 or self.model_batch_size < 1:
            raise ValueError("compute.batch_size and compute.model_batch_size must be >= 1")
        if self.max_tokens is not None and self.max_tokens < 8:
            raise ValueError("compute.max_tokens must be >= 8 (or null)")
        if self.num_gpus < 0 or self.num_cpus <= 0:
            raise ValueError("compute.num_gpus must be >= 0 and compute.num_cpus > 0")
        super().__post_init__()
        if self.concurrency is not None:
            if self.concurrency < 1:
                raise ValueError("compute.concurrency must be >= 1 (actors in the pool)")
            if self.min_actors != 1 or self.max_actors is not None:
                raise ValueError(
                    "give compute.concurrency (a fixed pool) or compute.min_actors / "
                    "compute.max_actors (an autoscaling pool), not both"
                )

    @property
    def pool(self) -> ActorPoolConfig:
        """The pool's bounds; a fixed ``concurrency`` is min = max."""
        if self.concurrency is not None:
            return ActorPoolConfig(self.concurrency, self.concurrency)
        return ActorPoolConfig(self.min_actors, self.max_actors)


@dataclass
class EmbedJobConfig:
    """What ``cellfoundry embed`` and ``jobs/embed.py`` read."""

    model: str
    """A model directory (config.json + model.safetensors + token_dictionary.json), or a
    model artifact on object storage (``s3://bucket/model``)."""
    tokenized: str
    """A tokenized artifact (``part-*.parquet`` shards with cell_id and input_ids), a folder
    or a URI."""
    output: str
    """The AnnData file to write (``.h5ad``, a path or ``s3://bucket/emb.h5ad``); gene
    embeddings, the UMAP and the manifest go into the artifact folder beside it,
    ``<output without .h5ad>.embeddings/``."""
    layer: int | None = None
    """Layer whose output is used, ours: -2 second-to-last (the default), -1 the last, 0 the
    first. See ``emb_layer`` for Geneformer's convention (table: :class:`PerturbJobConfig`)."""
    emb_layer: int | None = None
    """The layer in Geneformer's convention (0 the last, -1 the second-to-last), instead of
    ``layer``; read back as ``layer`` (``layer = emb_layer - 1``)."""
    pooling: Literal["mean", "cls"] = "mean"
    """Cell embedding: mean over gene tokens (specials excluded), or the <cls> state."""
    genes: bool = True
    """Also write contextual gene embeddings (``genes.parquet``)."""
    group_by: str | None = None
    """Metadata column that groups the gene embeddings (e.g. cell_type); null: "all"."""
    umap_color: str | None = "cell_type"
    """Metadata column colouring ``umap.png``; null: no UMAP."""
    max_cells: int | None = None
    """Embed only the first this many cells (in shard order); null: all."""
    compute: InferComputeConfig = field(default_factory=InferComputeConfig)
    ray: RayConfig = field(default_factory=RayConfig)

    def __post_init__(self) -> None:
        self.model = _local_or_uri(self.model)
        self.tokenized = _local_or_uri(self.tokenized)
        self.output = _local_or_uri(self.output)
        self.layer, self.emb_layer = resolve_layer_convention(self.layer, self.emb_layer), None
        if not self.output.endswith(".h5ad"):
            raise ValueError(f"output {self.output!r} must end with .h5ad")
        if self.max_cells is not None and self.max_cells < 1:
            raise ValueError("max_cells must be >= 1 (or null for all cells)")

    @property
    def artifact_dir(self) -> str:
        """The embeddings artifact folder beside ``output``."""
        return self.output[: -len(".h5ad")] + ".embeddings"


@dataclass
class PerturbationSpec:
    """One perturbation: a kind and one gene, or several genes perturbed together."""

    kind: Literal["delete", "overexpress", "inhibit", "activate"]
    genes: list[str]
    """Ensembl IDs (or token ids) of the genes; more than one: a combination."""

    def __post_init__(self) -> None:
        if not self.genes:
            raise ValueError("a perturbation needs genes: [ENSG...]")


@dataclass
class GoalConfig:
    """Goal state (Geneformer's ``goal_state``): the mean (or median) embedding of a seeded
    random sample of the cells whose ``column`` equals ``value``; ``alternatives``: other
    values of the same column (Geneformer's ``alt_states``), each summarised the same way,
    toward which the shift is also reported."""

    column: str
    value: str
    max_cells: int = 2000
    """Goal cells embedded per state: a random sample of this many when more match."""
    seed: int = 0
    """Seed of the sample. A cell is drawn by a hash of (seed, cell_id), so the sample
    depends on the cells and the seed only, not on shard order or the number of shards."""
    statistic: Literal["mean", "median"] = "mean"
    """How the sampled cells' embeddings make the state's embedding: their mean, or their
    element-wise median (of an even count: the average of the two middle values)."""
    alternatives: list[str] = field(default_factory=list)
    """Other states of ``column``: the shift toward each is also reported, in the screen
    column ``alt_shift:<state>`` and the stats columns ``alt_shift_mean:<state>`` /
    ``alt_shift_std:<state>`` (Geneformer's ``Shift_to_alt_end_<state>``)."""

    def __post_init__(self) -> None:
        if self.max_cells < 1:
            raise ValueError("goal.max_cells must be >= 1 (goal cells sampled per state)")
        self.alternatives = [str(a) for a in self.alternatives]
        if self.value in self.alternatives or len(set(self.alternatives)) != len(self.alternatives):
            raise ValueError(
                "goal.alternatives: list other states of goal.column, each once and not "
                f"goal.value ({self.value!r})"
            )

    @property
    def states(self) -> list[str]:
        """The goal state first, then the alternatives."""
        return [self.value, *self.alternatives]


@dataclass
class StartConfig:
    """Start state (Geneformer's ``start_state``): only cells whose ``column`` equals
    ``value`` are perturbed."""

    column: str
    value: str


@dataclass
class PerturbJobConfig:
    """What ``cellfoundry perturb`` and ``jobs/perturb.py`` read.

    ``metric`` says what the cell shift ``cell_cos`` is:

    - ``geneformer`` (the default; Geneformer's in-silico perturber): on a V2 model (its
      vocabulary has ``<cls>``) the cosine of the perturbed and original ``<cls>``
      embeddings; on a V1 model the mean, over the genes left in place, of each gene's
      cosine between its original and perturbed contextual embeddings. An overexpression
      that pushes the lowest-ranked genes out of a full cell is compared with the original
      cut by as many genes (their loss is not the gene's effect). Genome-wide
      overexpression skips each cell's top-ranked gene (a no-op).
    - ``pooled``: the cosine of the pooled (``pooling``) perturbed and original cell
      embeddings, overexpression compared with the whole original.

    The layer: ``layer`` (ours) or ``emb_layer`` (Geneformer's), never both:

    ============================  ============  =======================
    output of                     layer (ours)  emb_layer (Geneformer)
    ============================  ============  =======================
    the last layer                -1            0
    the second-to-last (default)  -2            -1
    the k-th layer from the end   -k            1 - k
    the first layer               0             1 - number of layers
    ============================  ============  =======================
    """

    model: str
    """A model directory (config.json + model.safetensors + token_dictionary.json), or a
    model artifact on object storage (``s3://bucket/model``)."""
    tokenized: str
    """A tokenized artifact whose cells are perturbed (a folder or a URI)."""
    output_dir: str
    """The ``screen`` artifact (a folder or ``s3://bucket/screen``): ``screen/part-*.parquet``,
    ``stats.parquet``, ``gene_stats.parquet``, ``stats.png``. Finished shards are kept in
    ``<output_dir>.work`` (a sibling folder or prefix) so a rerun skips them."""
    perturbations: list[PerturbationSpec] = field(default_factory=list)
    """Perturbations applied to every cell (genes not expressed: see ``perturb_ops``)."""
    genome_wide: Literal["delete", "overexpress", "inhibit", "activate"] | None = None
    """Also perturb every gene each cell expresses, one at a time, with this kind."""
    anchor_gene: str | None = None
    """With ``genome_wide``: perturb this gene (Ensembl ID or token id) together with each
    other gene of the cell instead of each gene alone, rows ``kind:ANCHOR+GENE``; cells
    that do not express it give no rows (Geneformer's ``anchor_gene``)."""
    fraction: float = 0.25
    """inhibit/activate move a gene by this share of the cell's ranks (a quartile)."""
    metric: Literal["geneformer", "pooled"] = "geneformer"
    """What the cell shift is (see above): ``geneformer`` (Geneformer's number) or
    ``pooled`` (cosine of pooled cell embeddings, whole original for overexpression)."""
    layer: int | None = None
    """Layer whose output is used, ours: -2 second-to-last (the default), -1 the last."""
    emb_layer: int | None = None
    """The layer in Geneformer's convention (0 the last, -1 the second-to-last), instead of
    ``layer``; read back as ``layer`` (``layer = emb_layer - 1``)."""
    pooling: Literal["mean", "cls"] | None = None
    """Cell embedding of the goal shift, and of the cell shift with ``metric: pooled``:
    mean over gene tokens or the ``<cls>`` state; null: as Geneformer (``<cls>`` on a V2
    model, mean on a V1 model) with ``metric: geneformer``, mean with ``metric: pooled``."""
    gene_shifts: bool = True
    """Per-gene embedding cosines of the genes left in place (large for genome-wide screens)."""
    goal: GoalConfig | None = None
    """Goal state for the goal shift; null: no goal shift (tests use the cell shift)."""
    start: StartConfig | None = None
    """Start state: perturb only the cells in it, e.g. {column: disease, value: dcm}
    (Geneformer's ``start_state``); applied with ``filter``; null: every cell."""
    null_screen: str | None = None
    """A screen artifact (folder or URI) of the same perturbations in null conditions (e.g.
    other cells, or an untrained model): each perturbation is tested against that screen's
    values of the same perturbation (as Geneformer's ``isp_stats_vs_null``); null: against
    ``null_draws`` rank-matched random genes per cell (targeted screens) or, in a genome-wide
    screen, against every other gene (as Geneformer's goal-state statistics)."""
    null_draws: int = 2
    """Targeted screens without a null screen: per cell and perturbation, this many
    controls, the same kind applied to random genes of the cell of about the same rank
    (an unexpressed gene stands for an unexpressed one), seeded by ``seed``; they are the
    perturbation's null (rows with ``control`` true). 0: no controls and no test."""
    seed: int = 0
    """Seed of the control genes' draws (per cell and perturbation, so the draws of one
    perturbation do not depend on which others are listed)."""
    filter: dict[str, list[str]] = field(default_factory=dict)
    """Perturb only cells whose metadata column is one of the values, e.g.
    {cell_type: [CD14+ Monocyte]} (Geneformer's ``filter_data``; the start state is
    ``start``)."""
    max_cells: int | None = None
    """Perturb at most this many cells per shard; null: all."""
    max_sequences: int = 2048
    """Perturbed sequences held at once per actor (bounds memory; results stream to disk)."""
    compute: InferComputeConfig = field(default_factory=InferComputeConfig)
    ray: RayConfig = field(default_factory=RayConfig)

    def __post_init__(self) -> None:
        self.model = _local_or_uri(self.model)
        self.tokenized = _local_or_uri(self.tokenized)
        self.output_dir = _local_or_uri(self.output_dir)
        if self.null_screen is not None:
            self.null_screen = _local_or_uri(self.null_screen)
        self.layer, self.emb_layer = resolve_layer_convention(self.layer, self.emb_layer), None
        if self.metric not in METRICS:
            raise ValueError(f"metric {self.metric!r}: use geneformer or pooled")
        if self.null_draws < 0:
            raise ValueError("null_draws must be >= 0 (0: no control perturbations)")
        if not self.perturbations and self.genome_wide is None:
            raise ValueError(
                "give perturbations: [{kind: delete, genes: [ENSG...]}] or genome_wide: delete"
            )
        if self.anchor_gene is not None and self.genome_wide is None:
            raise ValueError(
                "anchor_gene perturbs the anchor with every other gene of each cell: give "
                "genome_wide: delete (or another kind) too"
            )
        if not 0.0 < self.fraction <= 1.0:
            raise ValueError("fraction must lie in (0, 1] (0.25: a quartile of the cell's ranks)")
        if self.max_cells is not None and self.max_cells < 1:
            raise ValueError("max_cells must be >= 1 (or null for all cells)")
        if self.max_sequences < 1:
            raise ValueError("max_sequences must be >= 1")
        if self.start is not None and self.start.column in self.filter:
            raise ValueError(
                f"start.column {self.start.column!r} is also in filter: give the start state "
                "once (start: {column, value})"
            )

    @property
    def cell_filter(self) -> dict[str, list[str]]:
        """The cells perturbed: ``filter`` and the start state together (column -> values)."""
        start = {self.start.column: [self.start.value]} if self.start is not None else {}
        return {**self.filter, **start}
