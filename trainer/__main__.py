"""`python -m lora_trainer`: the same entry point as the `lora-trainer` console script."""

import sys

from lora_trainer.cli import main

sys.exit(main())
