"""The base model a run starts from (--pretrained-checkpoint) or saves (full training): its
description beside the dist-checkpoint, the check that it fits this run, and loading it."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

from ..description import CHECKPOINT_FIELDS, ModelDescription
from .errors import TrainingError
from .rundir import MODEL_DESCRIPTION
from ..safe_pickle import check_dist_checkpoint
from ..untrusted import loads_json



def model_checkpoint_dir(path) -> Optional[Path]:
    """The dist-checkpoint at ``path`` or in its model/ folder (pretrain_gpt.py's --save)."""
    path = Path(path)
    for candidate in (path / "model", path):
        if (candidate / "metadata.json").is_file():
            return candidate
    return None


def describe_model(experiment) -> dict:
    """model_description.json of a full-training save (megatron_lora.description)."""
    return ModelDescription.from_experiment(experiment).for_checkpoint()


def read_model_description(path: Path) -> dict:
    try:
        saved = loads_json(path.read_text(), path, ValueError)
        if not isinstance(saved, dict):
            raise ValueError("not a JSON object")
    except (ValueError, UnicodeDecodeError) as error:
        raise TrainingError(f"--pretrained-checkpoint: {path} is damaged ({error})") from None
    return saved


def check_base_fits(experiment, settings) -> None:
    """The model of --pretrained-checkpoint (its model_description.json, written by
    pretrain_gpt.py) against this run's, before any model is built. A longer --seq-length than
    the base was trained with is refused unless --allow-longer-sequences: positions it never
    saw (RoPE) give a model that runs but is not the one the user meant. A Hugging Face base's
    shape was taken from its config.json; its max_position_embeddings bounds --seq-length."""
    if experiment.hf_path:
        from ..errors import MegatronLoraError
        from ..hf import check_hf_checkpoint, read_hf_config

        try:
            check_hf_checkpoint(experiment.hf_path, experiment)
        except MegatronLoraError as error:
            raise TrainingError(f"--pretrained-checkpoint: {error}") from None
        trained = read_hf_config(experiment.hf_path).get("max_position_embeddings")
        asked = experiment.seq_length
        if isinstance(trained, int) and asked > trained and not settings.allow_longer_sequences:
            raise TrainingError(f"--seq-length {asked} is longer than the base's "
                                f"max_position_embeddings ({trained}); pass "
                                f"--allow-longer-sequences to run positions it never saw")
        return
    check_dist_checkpoint(model_checkpoint_dir(settings.pretrained_checkpoint))  # before any write
    path = model_checkpoint_dir(settings.pretrained_checkpoint) / MODEL_DESCRIPTION
    if not path.is_file():
        return  # a checkpoint from elsewhere: its shapes are checked when it is loaded
    saved = read_model_description(path)
    ours = describe_model(experiment)
    differing = [f"{key}: checkpoint {theirs!r}, this run {mine!r}" for key, theirs, mine in
                 ModelDescription.from_json(saved).differences(
                     ModelDescription.from_json(ours), CHECKPOINT_FIELDS)]
    if differing:
        raise TrainingError(f"--pretrained-checkpoint {settings.pretrained_checkpoint} holds "
                            f"another model ({'; '.join(differing)}); {path}")
    trained, asked = saved.get("seq_length"), ours["seq_length"]
    if isinstance(trained, int) and asked > trained:
        if ours["position_embedding_type"] == "learned_absolute":
            raise TrainingError(f"--seq-length {asked} is longer than the {trained} positions "
                                f"the base's learned position embeddings have")
        if not settings.allow_longer_sequences:
            raise TrainingError(f"--seq-length {asked} is longer than the base was trained with "
                                f"({trained}, {path}); pass --allow-longer-sequences to run "
                                f"positions the base never saw")


def load_base_weights(model, path) -> None:
    """Base weights from a megatron dist-checkpoint (pretrain_gpt.py's --save, or its model/),
    at any TP/PP layout. Collective."""
    # megatron's checkpointing is heavy to import and only needed here
    from megatron.core import dist_checkpointing
    from megatron.core.dist_checkpointing.core import CheckpointingException
    from torch.distributed.checkpoint.api import CheckpointException

    directory = model_checkpoint_dir(path)
    if directory is None:
        raise TrainingError(f"{path} holds no megatron dist-checkpoint (no metadata.json)")
    check_dist_checkpoint(directory)  # its pickles hold checkpoint data only, or it is refused
    try:
        model.load_state_dict(dist_checkpointing.load(model.sharded_state_dict(), str(directory)))
    except (CheckpointingException, CheckpointException) as error:
        # a key or shape this model does not have; torch's exception carries megatron's as
        # the last line of each failed rank's traceback
        lines = [line.strip() for line in str(error).splitlines() if line.strip()]
        cause = next((line.split("Exception: ", 1)[1] for line in reversed(lines)
                      if "CheckpointingException: " in line), lines[0] if lines else "")
        raise TrainingError(f"{directory} does not fit this model: {cause[:300]}") from None
