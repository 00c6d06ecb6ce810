"""Stage 1 as a Ray job.

    ray job submit --working-dir . -- python jobs/corpus.py --config jobs/configs/corpus/smoke.yaml

Without a cluster (no ``RAY_ADDRESS``) the same command starts a local one.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "platform"))  # a working-dir upload

from cellfoundry import runtime  # first: a local cluster then binds to 127.0.0.1 only
from cellfoundry.corpus.pipeline import run_corpus_job


def run(config: str, overrides: list[str]) -> dict:
    result = run_corpus_job(config, overrides)
    return {"artifacts": result.paths(), "counts": result.counts}


if __name__ == "__main__":
    sys.exit(runtime.job_main(run, __doc__))
