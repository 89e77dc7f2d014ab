"""Pre-flight check as a Ray job: ``ray job submit -- python jobs/check.py --config C [key=value ...]``."""

import sys

from lightreasoner_ray.cli import job_main

if __name__ == "__main__":
    sys.exit(job_main("check"))
