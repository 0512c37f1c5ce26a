"""Entry point for `python -m bench`.

The guard matters: load-generator workers are spawned, and spawn re-imports the
parent's main module (as `__mp_main__`) in every worker.
"""

import sys

from bench.cli import main

if __name__ == "__main__":
    sys.exit(main())
