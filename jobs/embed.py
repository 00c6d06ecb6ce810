"""Stage 4a (cell and gene embeddings) as a Ray job.

    ray job submit --working-dir . -- python jobs/embed.py --config jobs/configs/embed/smoke.yaml

Without a cluster (no ``RAY_ADDRESS``) the same command starts a local one. A rerun with the
same model, input and config reuses the finished embeddings.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "platform"))  # a working-dir upload

import cellfoundry.runtime  # noqa: F401  (first: a local cluster then binds to 127.0.0.1 only)
from cellfoundry.infer.embed_job import run_embed_job
from cellfoundry.logs import setup_logging


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--config", required=True)
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    args = parser.parse_args()
    setup_logging()
    print(json.dumps(run_embed_job(args.config, args.set), indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
