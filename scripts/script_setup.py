"""Imported first by the scripts here: the repository on sys.path (they run from a checkout
without installation too) and the known, harmless warnings filtered.

megatron-core announces its fallbacks (no TransformerEngine / Apex) on every import and gloo
its deprecations on every call; expected here, they would bury the progress output.
"""

import sys
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
warnings.filterwarnings("ignore", category=UserWarning, module="megatron")
warnings.filterwarnings("ignore", message=".*Transformer Engine and Apex are not installed")
warnings.filterwarnings("ignore", category=FutureWarning, module="torch.distributed")
warnings.filterwarnings("ignore", message=".*CUDA_DEVICE_MAX_CONNECTIONS")
