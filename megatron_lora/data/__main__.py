"""python -m megatron_lora.data: preprocess JSONL, or write the demo data."""

import sys

from .cli import main

sys.exit(main())
