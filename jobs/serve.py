"""Stage 5 (serving) as a Ray job: deploy the HTTP API and keep it up until stopped.

    ray job submit --working-dir . -- python jobs/serve.py --config jobs/configs/serve/smoke.yaml

Without a cluster (no ``RAY_ADDRESS``) the same command starts a local one. The API binds
127.0.0.1 unless ``http.host`` says otherwise (then set ``auth_token_env``).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "platform"))  # a working-dir upload

import cellfoundry.runtime  # noqa: F401  (first: a local cluster then binds to 127.0.0.1 only)
from cellfoundry.logs import setup_logging
from cellfoundry.serve import run_serve_job


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--config", required=True)
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--no-block", action="store_true", help="deploy, print the URL and exit")
    args = parser.parse_args()
    setup_logging()
    handle = run_serve_job(args.config, args.set, blocking=not args.no_block)
    print(handle.url)
    return 0


if __name__ == "__main__":
    sys.exit(main())
