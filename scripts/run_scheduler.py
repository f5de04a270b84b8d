#!/usr/bin/env python
"""The scheduler script: the same code as `agentenv run` (see agentenv/run.py).

    python scripts/run_scheduler.py --config configs/default.yaml --set scheduler.rollout_n=4
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from agentenv.run import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
