"""Stage 5: models behind an HTTP API on Ray Serve.

- :func:`run_serve` / :func:`run_serve_job`: deploy ``/embed``, ``/classify``, ``/perturb``,
  ``/healthz`` (see :mod:`cellfoundry.serve.app`) and wait until healthy.
- :func:`~cellfoundry.serve.app.build_app`: the application graph (also a RayService
  ``import_path``: ``cellfoundry.serve.app:build_app``).
- :class:`CellTokenizer`: server-side rank value encoding of ``{gene: raw count}``.
"""

from cellfoundry.serve.errors import RequestError
from cellfoundry.serve.runner import ServeHandle, run_serve, run_serve_job
from cellfoundry.serve.tokenizer import CellTokenizer

__all__ = ["CellTokenizer", "RequestError", "ServeHandle", "run_serve", "run_serve_job"]
