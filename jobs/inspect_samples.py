"""`lightreasoner inspect` as a Ray job: ``ray job submit -- python jobs/inspect_samples.py --config C [key=value ...]``.

Not jobs/inspect.py: a script's directory comes first on sys.path, and that name would
shadow the standard library's ``inspect`` module for everything the job imports.
"""

import sys

from lightreasoner_ray.cli import job_main

if __name__ == "__main__":
    sys.exit(job_main("inspect"))
