"""Stage 1 as a Ray job.

    ray job submit --working-dir . -- python jobs/corpus.py --config jobs/configs/corpus/smoke.yaml

Without a cluster (no ``RAY_ADDRESS``) the same command starts a local one.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "platform"))  # a working-dir upload

import cellfoundry.runtime  # noqa: F401  (first: a local cluster then binds to 127.0.0.1 only)
from cellfoundry.corpus.pipeline import run_corpus_job
from cellfoundry.logs import setup_logging


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--config", required=True)
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    args = parser.parse_args()
    setup_logging()
    result = run_corpus_job(args.config, args.set)
    print(json.dumps({"artifacts": result.paths(), "counts": result.counts}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
