"""Stage 3 (finetune) as a Ray job.

    ray job submit --working-dir . -- python jobs/finetune.py --config jobs/configs/finetune/smoke.yaml

Without a cluster (no ``RAY_ADDRESS``) the same command starts a local one. The run is one
Ray task with ``scaling.resources_per_worker``; a rerun with the same config and inputs
reuses the finished artifact.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "platform"))  # a working-dir upload

from cellfoundry import runtime  # first: a local cluster then binds to 127.0.0.1 only
from cellfoundry.tune import run_finetune_job

if __name__ == "__main__":
    sys.exit(runtime.job_main(run_finetune_job, __doc__))
