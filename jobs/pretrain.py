"""Stage 2 (pretraining) as a Ray job.

    ray job submit --working-dir . -- python jobs/pretrain.py --config jobs/configs/pretrain/smoke.yaml

Without a cluster (no ``RAY_ADDRESS``) the same command starts a local one. Running it
again with the same run name and storage path resumes from the latest checkpoint.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "platform"))  # a working-dir upload

from cellfoundry import runtime  # first: a local cluster then binds to 127.0.0.1 only
from cellfoundry.train import run_pretrain_job

if __name__ == "__main__":
    sys.exit(runtime.job_main(run_pretrain_job, __doc__))
