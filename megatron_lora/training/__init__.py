"""What the pretrain / finetune scripts share: flags and YAML, the model, data, the optimiser
over the trainable parameters, the step, evaluation, checkpoint and exact resume, logging.

    settings  flags, the YAML training: section, their checks, the layout gate
    rundir    what a --save directory holds, and the checks that protect it
    base      the base model: its description, the fit check, loading its weights
    state     checkpoints for an exact resume (the trainer's state_dict on disk)
    loop      the Trainer: train_step (one optimiser step) and train (the iterations)
    metrics   printed lines, metrics.jsonl, TensorBoard, the loss curve
    launch    main: check the inputs, start workers or the process group, train

Checkpoints (``--save DIR``):

    DIR/latest_checkpointed_iteration.txt      written last, atomically
    DIR/iter_0000100/adapter/                  LoRA: the consolidated adapter (any layout)
    DIR/iter_0000100/model/                    full training: megatron dist-checkpoint
    DIR/iter_0000100/rank_00000.safetensors    optimiser state and RNG states of each rank
    DIR/iter_0000100/trainer_state.json        iteration, consumed samples, layout
    DIR/adapter/ or DIR/model/                 the final result
    DIR/metrics.jsonl, DIR/tensorboard/, DIR/loss_curve.png
    DIR/run.lock                               flock-ed by the run writing DIR (rundir.RunLock)
"""

from .base import check_base_fits, describe_model, load_base_weights
from .errors import TrainingError
from .launch import initialize_distributed, launch_workers, main
from .loop import Trainer, learning_rate, run_micro_batches
from .metrics import MetricsLog
from .rundir import check_save_directory, clear_previous_run
from .settings import (
    LR_DECAY_STYLES,
    TrainingSettings,
    build_parser,
    check_layout_is_proven,
    parse_arguments,
)
from .state import load_checkpoint, save_checkpoint

__all__ = [
    "LR_DECAY_STYLES", "MetricsLog", "Trainer", "TrainingError", "TrainingSettings",
    "build_parser", "check_base_fits", "check_layout_is_proven", "check_save_directory",
    "clear_previous_run", "describe_model", "initialize_distributed", "launch_workers",
    "learning_rate", "load_base_weights", "load_checkpoint", "main", "parse_arguments",
    "run_micro_batches", "save_checkpoint",
]
