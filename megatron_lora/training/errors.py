"""The training scripts' own error class."""

from ..errors import MegatronLoraError


class TrainingError(MegatronLoraError):
    """Bad flags, config or files: reported as one line, exit code 2, nothing written."""
