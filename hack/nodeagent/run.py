#!/usr/bin/env python3
"""Script entry point for the dev node agent (DEV/TEST ONLY): `hack/nodeagent/run.py start`.

Same as `python -m hack.nodeagent`, runnable from any working directory.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from hack.nodeagent.cli import main

raise SystemExit(main())
