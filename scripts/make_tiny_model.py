#!/usr/bin/env python
"""Build the tiny UI-TARS-shaped model: ``python -m agentenv.tiny_model`` (kept here for habit)."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from agentenv.tiny_model import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
