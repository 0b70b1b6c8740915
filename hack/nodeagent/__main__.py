"""`python -m hack.nodeagent [run|start|stop|status]` (dev/test infrastructure only)."""

from hack.nodeagent.cli import main

raise SystemExit(main())
