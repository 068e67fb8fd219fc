"""Imported first by the scripts here: the repository on sys.path (they run from a checkout
without installation too) and the known, harmless warnings filtered.

megatron-core announces its fallbacks (no TransformerEngine / Apex) on every import and gloo
its deprecations on every call; expected here, they would bury the progress output.
"""

import logging
import sys
import warnings
from pathlib import Path

# torch's CUDA build logs "No CUDA runtime is found" when megatron-core imports it on a machine
# without a GPU: set before torch is imported, so a bad input's one line stays the only line
logging.getLogger("torch.utils.cpp_extension").setLevel(logging.ERROR)
# megatron-core 0.19 logs a deprecation of GPTModel (in favour of its HybridModel) each time one
# is built, the launcher's weightless check included: the class is ours to choose, not the
# user's, and the notice would stand before a bad input's one line
logging.getLogger("megatron.core.models.gpt.gpt_model").setLevel(logging.ERROR)

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def filter_known_warnings() -> None:
    """The scripts' warning filters (the bad-input tests run the scripts' main under them)."""
    warnings.filterwarnings("ignore", category=UserWarning, module="megatron")
    warnings.filterwarnings("ignore", message=".*Transformer Engine and Apex are not installed")
    warnings.filterwarnings("ignore", category=FutureWarning, module="torch.distributed")
    # torch's deprecations of the checkpoint API megatron calls, reported at megatron's line
    warnings.filterwarnings("ignore", category=FutureWarning,
                            module=r"megatron\.core\.dist_checkpointing")
    warnings.filterwarnings("ignore", message=".*CUDA_DEVICE_MAX_CONNECTIONS")


filter_known_warnings()
