"""Typed config of stage 5 (Ray Serve). Sections mirror Ray Serve's own objects."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from cellfoundry.config.schema import RayConfig
from cellfoundry.paths import expand
from cellfoundry.storage import is_remote


@dataclass
class HTTPOptions:
    """Where the HTTP proxy listens (``ray.serve.config.HTTPOptions``)."""

    host: str = "127.0.0.1"
    """Bind address. Loopback unless you mean to expose the API (then set auth)."""
    port: int = 8000
    """TCP port of the proxy."""

    def __post_init__(self) -> None:
        if not 0 <= self.port <= 65535:
            raise ValueError(
                f"http.port={self.port} is not a TCP port; use 1-65535 (0: any free port)"
            )


@dataclass
class AutoscalingConfig:
    """Replica autoscaling of the model deployment (``ray.serve.config.AutoscalingConfig``)."""

    min_replicas: int = 1
    """Replicas kept up even when idle."""
    max_replicas: int = 1
    """Upper bound the autoscaler may grow to."""
    target_ongoing_requests: float = 8.0
    """Requests in flight per replica the autoscaler aims for."""

    def __post_init__(self) -> None:
        if not 0 <= self.min_replicas <= self.max_replicas or self.max_replicas < 1:
            raise ValueError(
                "autoscaling: need 0 <= min_replicas <= max_replicas and max_replicas >= 1, "
                f"got {self.min_replicas}..{self.max_replicas}"
            )
        if self.target_ongoing_requests <= 0:
            raise ValueError("autoscaling.target_ongoing_requests must be > 0")


@dataclass
class BatchConfig:
    """Dynamic batching of requests (``@serve.batch``)."""

    max_batch_size: int = 16
    """Cells per forward pass at most."""
    batch_wait_timeout_s: float = 0.01
    """How long a replica waits to fill a batch before running it."""

    def __post_init__(self) -> None:
        if self.max_batch_size < 1 or self.batch_wait_timeout_s < 0:
            raise ValueError("batching: max_batch_size must be >= 1 and batch_wait_timeout_s >= 0")


@dataclass
class LimitsConfig:
    """Request validation limits (every violation is a 4xx with the reason)."""

    max_genes: int = 60_000
    """Genes per request cell at most (a whole transcriptome is ~60k Ensembl genes)."""
    min_genes: int = 7
    """Cells with fewer expressed genes that map to the vocabulary are rejected (the corpus
    QC keeps cells with >= 7 detected protein-coding genes)."""
    max_body_bytes: int = 4 * 1024**2
    """Largest request body accepted: refused (413) from its Content-Length before it is
    read, or as soon as a streamed body passes it."""
    max_perturbations: int = 64
    """Perturbations per /perturb request at most."""
    symbol_cache_size: int = 100_000
    """Gene symbols resolved to an Ensembl ID kept in the ingress's cache (least recently
    used evicted first; the shared gene table has ~70k symbols)."""
    unknown_symbol_cache_size: int = 4_096
    """Names that resolved to nothing kept in the cache: a small bound, so requests full of
    unknown names cannot grow the ingress's memory."""
    small_body_bytes: int = 256 * 1024
    """Bodies up to this size are parsed and tokenized in the small-request thread pool,
    larger ones in the large-request pool, so large requests never delay small ones."""
    small_request_threads: int = 4
    """Worker threads of the ingress for small bodies (parsing and tokenization run off the
    event loop)."""
    large_request_threads: int = 1
    """Worker threads of the ingress for large bodies; large requests queue for them."""

    def __post_init__(self) -> None:
        if self.max_genes < 1 or self.min_genes < 1 or self.max_body_bytes < 1024:
            raise ValueError("limits: max_genes and min_genes >= 1, max_body_bytes >= 1024")
        if self.symbol_cache_size < 0 or self.unknown_symbol_cache_size < 0:
            raise ValueError(
                "limits: symbol_cache_size and unknown_symbol_cache_size must be >= 0 (0: no cache)"
            )
        if (
            self.small_body_bytes < 0
            or self.small_request_threads < 1
            or self.large_request_threads < 1
        ):
            raise ValueError(
                "limits: small_body_bytes >= 0 and small_request_threads, large_request_threads >= 1"
            )


@dataclass
class ServeJobConfig:
    """Stage 5: a model behind an HTTP API (``/embed``, ``/classify``, ``/perturb``, ``/healthz``)."""

    model: str
    """A model directory (``BertForMaskedLM``; config.json, weights, token_dictionary.json),
    or the ``s3://`` / ``gs://`` URI of a ``model`` artifact: each replica then reads its
    node's cached copy (:func:`cellfoundry.artifacts.localize`)."""
    gene_medians: str | None = None
    """``gene_median_dictionary.json`` (Ensembl ID -> non-zero median) used to tokenize raw
    counts on the server; None: the file beside the model, else the corpus vocabulary the
    model was trained on (found through the model's manifest, local or on object storage).
    A local file: a single file on object storage is not read (leave this unset instead)."""
    gene_table: str | None = None
    """Gene table to map symbols to Ensembl IDs (None: the shared default table)."""
    classifiers: dict[str, str] = field(default_factory=dict)
    """name -> a fine-tuned classifier directory (full model or LoRA adapter with its base)
    or the URI of a ``finetuned`` artifact, chosen per request by ``"classifier": name`` on
    ``/classify`` (multiplexed); each replica reads its node's cached copy of a URI."""
    precision: Literal["auto", "fp32", "bf16", "int8"] = "auto"
    """Weights: int8 (bitsandbytes LLM.int8), bf16, fp32; auto = bf16 on a GPU, fp32 on CPU."""
    layer: int = -2
    """Encoder layer of the cell embedding (-1: last, -2: second-to-last as in the seeds, 0: first)."""
    pooling: Literal["mean", "cls"] = "mean"
    """Cell embedding: mean over gene tokens, or the <cls> token (V2 models)."""
    num_cpus: float = 1.0
    """CPUs per model replica."""
    num_gpus: float = 0.0
    """GPUs per model replica (0: CPU)."""
    auth_token_env: str | None = None
    """Name of an environment variable holding a bearer token; when set, every request but
    /healthz must send ``Authorization: Bearer <token>``. The token never sits in a config."""
    app_name: str = "cellfoundry"
    """Ray Serve application name."""
    route_prefix: str = "/"
    """URL prefix of the API."""
    http: HTTPOptions = field(default_factory=HTTPOptions)
    autoscaling: AutoscalingConfig = field(default_factory=AutoscalingConfig)
    batching: BatchConfig = field(default_factory=BatchConfig)
    limits: LimitsConfig = field(default_factory=LimitsConfig)
    ray: RayConfig = field(default_factory=RayConfig)

    def __post_init__(self) -> None:
        self.model = expand(self.model)
        if self.gene_medians is not None:
            self.gene_medians = expand(self.gene_medians)
        if self.gene_table is not None:
            self.gene_table = expand(self.gene_table)
        self.classifiers = {k: expand(v) for k, v in self.classifiers.items()}
        for key in ("gene_medians", "gene_table"):
            value = getattr(self, key)
            if value is not None and is_remote(value):
                raise ValueError(
                    f"{key}: {value} is on object storage; give a local or mounted file (or "
                    "leave gene_medians unset: the model's own vocabulary is then used, "
                    "wherever it is)"
                )
        if self.num_cpus < 0 or self.num_gpus < 0:
            raise ValueError("num_cpus and num_gpus must be >= 0")
