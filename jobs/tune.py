"""Stage 3 (tune) as a Ray job.

    ray job submit --working-dir . -- python jobs/tune.py --config jobs/configs/tune/smoke.yaml

Without a cluster (no ``RAY_ADDRESS``) the same command starts a local one. Trials that do
not fit wait, and an autoscaling cluster grows for them. Running it again with the same
run name and storage path resumes an interrupted search (``Tuner.restore``).
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "platform"))  # a working-dir upload

from cellfoundry import runtime  # first: a local cluster then binds to 127.0.0.1 only
from cellfoundry.tune import run_tune_job

if __name__ == "__main__":
    sys.exit(runtime.job_main(run_tune_job, __doc__))
