"""Evaluation: masked-gene accuracy vs the rank baseline, linear probes, batch-robustness metrics.

Submodules are imported lazily by the CLI and jobs (``cellfoundry.evaluate.masked``,
``cellfoundry.evaluate.batch``, ``cellfoundry.evaluate.probe``) so that importing this package
stays cheap and one evaluation does not pull in the others' dependencies.
"""
