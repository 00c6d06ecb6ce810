"""Stage 4b (in-silico perturbation screen) as a Ray job.

    ray job submit --working-dir . -- python jobs/perturb.py --config jobs/configs/perturb/smoke.yaml

Without a cluster (no ``RAY_ADDRESS``) the same command starts a local one. A rerun with the
same config skips the shards already finished (and reuses a finished screen).
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "platform"))  # a working-dir upload

from cellfoundry import runtime  # first: a local cluster then binds to 127.0.0.1 only
from cellfoundry.infer.perturb_job import run_perturb_job

if __name__ == "__main__":
    sys.exit(runtime.job_main(run_perturb_job, __doc__))
