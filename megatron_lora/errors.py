"""The base of every error a user can fix from its message alone.

The scripts and the CLI print such an error as one line and exit with code 2; any other
exception is a bug and keeps its traceback. Subclasses live with the code that raises them
(TrainingError, ExperimentConfigError, AdapterCheckpointError, ...).
"""


class MegatronLoraError(ValueError):
    """Bad input (flags, config, files, a request the model cannot take), named in the message.

    A ValueError, so callers that caught ValueError before keep working."""


class AdapterError(MegatronLoraError):
    """An adapter request this model cannot take: targets that match no layer, a rank larger
    than a layer allows, an adapter name that is invalid or already in use."""


class DataError(MegatronLoraError):
    """A dataset, corpus or tokenizer that cannot be used, with the file or value named.

    Here rather than in ``megatron_lora.data``: the tokenizers raise it too, and the data
    package imports the tokenizers."""
