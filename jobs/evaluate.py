"""Evaluation (masked-gene accuracy, batch robustness) as a Ray job.

    ray job submit --working-dir . -- python jobs/evaluate.py masked --config jobs/configs/evaluate/masked-smoke.yaml
    ray job submit --working-dir . -- python jobs/evaluate.py batch --config jobs/configs/evaluate/batch-pbmc.yaml

Both run in the job's driver process (no Ray workers needed): masked streams the token
shards through the model in length-sorted batches, on a GPU when the driver has one. A rerun
with the same inputs and config reuses the finished report.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "platform"))  # a working-dir upload

import cellfoundry.runtime  # noqa: F401  (first, as in every job: Ray binds to 127.0.0.1 only)
from cellfoundry.logs import setup_logging


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("evaluation", choices=["masked", "batch"])
    parser.add_argument("--config", required=True)
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    args = parser.parse_args()
    setup_logging()
    if args.evaluation == "masked":
        from cellfoundry.evaluate.masked import run_masked_job as run
    else:
        from cellfoundry.evaluate.batch import run_batch_job as run
    print(json.dumps(run(args.config, args.set), indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
