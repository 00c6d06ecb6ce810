"""Stage 4: embeddings and in-silico perturbation screens.

In-process, Ray-free API (used by the Ray Data jobs, Ray Serve and the evaluation stage):

- :class:`Embedder`: a model loaded once (or passed in already loaded, e.g. 8-bit or bf16),
  the encoder run up to the chosen layer only; ``embed_cells`` (n, hidden) float32,
  ``embed_genes`` per-cell contextual gene embeddings, ``embed`` both from one pass.
- :class:`Perturbation`, :func:`perturb_cells` / :func:`iter_perturb_cells`: delete,
  overexpress, inhibit, activate, combinations, genome-wide; batched across cells and
  perturbations; results as a pyarrow table (:data:`RESULT_SCHEMA`).

Ray Data jobs (``cellfoundry.infer.embed_job.run_embed_job``,
``cellfoundry.infer.perturb_job.run_perturb_job``) and the statistics
(``cellfoundry.infer.stats``) are imported from their modules: they need Ray / polars.
"""

from cellfoundry.infer.embed import Embedder
from cellfoundry.infer.perturb import RESULT_SCHEMA, iter_perturb_cells, perturb_cells
from cellfoundry.infer.perturb_ops import KINDS, Perturbation, perturbation_from_genes

__all__ = [
    "KINDS",
    "RESULT_SCHEMA",
    "Embedder",
    "Perturbation",
    "iter_perturb_cells",
    "perturb_cells",
    "perturbation_from_genes",
]
