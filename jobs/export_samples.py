"""`lightreasoner export-samples` as a Ray job: ``ray job submit -- python jobs/export_samples.py --config C [key=value ...]``."""

import sys

from lightreasoner_ray.cli import job_main

if __name__ == "__main__":
    sys.exit(job_main("export-samples"))
