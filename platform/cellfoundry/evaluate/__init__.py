"""Evaluation: masked-gene accuracy vs the rank baseline, linear probes, batch-robustness metrics.

Submodules are imported lazily by the CLI and jobs so that importing this package stays
cheap and one evaluation does not pull in the others' dependencies:

- :mod:`.masked`: ``run_masked(MaskedEvalConfig) -> MaskedEvalResult`` and
  ``run_masked_job(config, overrides) -> dict`` (``cellfoundry evaluate masked``); building
  blocks in :mod:`.masking` (held-out cells, masks, :class:`~.masking.RankBaseline`) and
  :mod:`.predict` (:class:`~.predict.MaskedPredictor`).
- :mod:`.batch`: ``run_batch(BatchEvalConfig) -> BatchEvalResult`` and ``run_batch_job``
  (``cellfoundry evaluate batch``); array-level metrics in :mod:`.batch_metrics`
  (``cell_metrics``, ``gene_metrics``, ``separability_index``) and :mod:`.pairs`.
- :mod:`.probe`: ``run_probe`` (``cellfoundry evaluate probe``).
"""
