"""python -m megatron_lora: the megatron-lora command line."""

import sys

from .cli import main

sys.exit(main())
