"""Stage 3 (finetune) as a Ray job.

    ray job submit --working-dir . -- python jobs/finetune.py --config jobs/configs/finetune/smoke.yaml

Without a cluster (no ``RAY_ADDRESS``) the same command starts a local one. The run is one
Ray task with ``scaling.resources_per_worker``; a rerun with the same config and inputs
reuses the finished artifact.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "platform"))  # a working-dir upload

import cellfoundry.runtime  # noqa: F401  (first: a local cluster then binds to 127.0.0.1 only)
from cellfoundry.logs import setup_logging
from cellfoundry.tune import run_finetune_job


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--config", required=True)
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    args = parser.parse_args()
    setup_logging()
    print(json.dumps(run_finetune_job(args.config, args.set), indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
