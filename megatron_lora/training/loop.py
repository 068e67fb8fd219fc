"""The Trainer: the model, its data and the optimiser; ``train_step`` makes one optimiser step,
``train`` runs the iterations around it (evaluation, progress, logging, saving).

megatron-core runs the forward-backward schedule (micro-batches, 1F1B under PP); the optimiser
is plain ``torch.optim.AdamW`` over the trainable parameters: with LoRA the trainable state is
tiny, so megatron's distributed optimiser buys nothing, and a plain optimiser's state is simple
to checkpoint bit-exactly. What happens to gradients between backward and the step lives in one
place, ``grad_sync.finalize_gradients``.
"""

from __future__ import annotations

import contextlib
import json
import math
import sys
import time
from pathlib import Path
from typing import Optional, Tuple

import torch
import torch.distributed as dist
from megatron.core.pipeline_parallel import get_forward_backward_func

from ..atomic import write_file_atomically
from ..checkpoint import load_adapter, save_adapter
from ..dist_checkpoint import save_dist_checkpoint
from ..cpu import cuda_arguments_to_cpu
from ..data import FORMATS, micro_batches
from ..data.instructions import packed_attention_mask
from ..hf import is_hf_directory, load_hf_weights
from ..positions import RestartedPositions
from ..tokenizers import build_tokenizer
from ..gpt import build_gpt_model, initialize_model_parallel
from ..grad_sync import finalize_gradients
from ..model import apply_lora
from ..topology import Topology
from .base import describe_model, load_base_weights
from .errors import TrainingError
from .metrics import MetricsLog, print_on_rank0
from .rundir import MODEL_DESCRIPTION
from .settings import TrainingSettings, global_batch_size
from .state import capture_rng, restore_rng, run_record, save_checkpoint


def learning_rate(settings: TrainingSettings, iteration: int) -> float:
    """Linear warm-up to --lr, then decay to --min-lr by --train-iters (Megatron's styles)."""
    if settings.lr_warmup_iters and iteration < settings.lr_warmup_iters:
        return settings.lr * (iteration + 1) / settings.lr_warmup_iters
    if settings.lr_decay_style == "constant":
        return settings.lr
    span = max(1, settings.train_iters - settings.lr_warmup_iters)
    progress = min(1.0, (iteration - settings.lr_warmup_iters) / span)
    if settings.lr_decay_style == "linear":
        factor = 1.0 - progress
    else:
        factor = 0.5 * (1.0 + math.cos(math.pi * progress))
    return settings.min_lr + (settings.lr - settings.min_lr) * factor


# --- the forward-backward schedule ----------------------------------------------------------------


def _loss_from(batch, scale: float):
    # the loss of the global batch is the mean over every counted token of it, across
    # micro-batches and data-parallel ranks (docs/sft.md): each micro-batch returns its sum
    # times `scale` = micro-batches x DP / global count, which the schedule's 1 / micro-batches
    # and the DP average of the gradients turn into sum / global count
    def loss_func(per_token_loss):
        mask = batch["loss_mask"].to(per_token_loss.device).float()
        total = (per_token_loss.float() * mask).sum()
        # a copy: the schedule scales the returned loss in place, and a detached view would
        # carry that into the reported value
        return total * scale, {"loss_sum": total.detach().clone()}

    return loss_func


def _forward_step_with(scale: float, positions: Optional[RestartedPositions]):
    def forward_step(data_iterator, model):
        batch = next(data_iterator)
        device = next(model.parameters()).device
        position_ids = batch["position_ids"].to(device)
        mask = None
        if "segment_ids" in batch:  # packed conversations: each attends to itself only
            mask = packed_attention_mask(batch["segment_ids"].to(device))
        with (positions.restarted(position_ids) if positions is not None and mask is not None
              else contextlib.nullcontext()):
            output = model(batch["tokens"].to(device), position_ids, mask,
                           labels=batch["labels"].to(device))
        return output, _loss_from(batch, scale)

    return forward_step


def _device():
    return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() \
        else torch.device("cpu")


def run_micro_batches(model, batches, settings: TrainingSettings, exp, forward_only: bool,
                      positions: Optional[RestartedPositions] = None) -> Tuple[float, float]:
    """megatron-core's forward-backward schedule over ``batches`` (this DP rank's share of a
    global batch). Returns (the sum of the per-token losses over every counted token of the
    global batch, their count), the same on every rank; with ``forward_only=False`` the
    gradients are those of sum / count."""
    place = Topology.current()
    counted = torch.tensor(sum(float(b["loss_mask"].sum()) for b in batches),
                           dtype=torch.float64, device=_device())
    dist.all_reduce(counted, group=Topology.dp_group())
    tokens = float(counted)
    scale = len(batches) * place.dp_size / max(tokens, 1.0)
    context = cuda_arguments_to_cpu() if not torch.cuda.is_available() else contextlib.nullcontext()
    with context:
        outputs = get_forward_backward_func()(
            forward_step_func=_forward_step_with(scale, positions), data_iterator=iter(batches),
            model=[model], num_microbatches=len(batches), seq_length=exp.seq_length,
            micro_batch_size=settings.micro_batch_size, forward_only=forward_only)
    value = torch.zeros((), dtype=torch.float64, device=_device())
    if place.pp_rank == place.pp_size - 1 and outputs:  # the last stage has the loss
        value += sum(o["loss_sum"].double().to(value.device) for o in outputs)
    dist.all_reduce(value, group=Topology.pp_group())
    dist.all_reduce(value, group=Topology.dp_group())
    return float(value), tokens


def _stop_if_not_finite(iteration: int, loss: float, norm: float) -> None:
    """A NaN or inf loss or gradient norm ends the run before the optimiser step would write it
    into the weights (and a later save onto disk). Both values are all-reduced over the world,
    so every rank decides alike and raises together."""
    if not (math.isfinite(loss) and math.isfinite(norm)):
        raise TrainingError(f"iteration {iteration}: the loss is {loss} and the gradient norm "
                            f"{norm}; stopped before the optimizer step, the last checkpoint "
                            f"in --save stays the latest (lower --lr, or check the data)")


def _progress_bar(settings: TrainingSettings, start: int):
    # a bar on a terminal; plain log lines in files (SLURM logs, CI), where a bar is noise
    if not settings.progress_bar or dist.get_rank() != 0 or not sys.stdout.isatty():
        return None
    from tqdm import tqdm  # only for a terminal

    return tqdm(total=settings.train_iters, initial=start, unit="it", dynamic_ncols=True,
                file=sys.stdout)


class Trainer:
    """One run's model, data and optimiser, and the counters an exact resume restores."""

    def __init__(self, experiment, settings: TrainingSettings, lora, args):
        self.experiment, self.settings, self.lora, self.args = experiment, settings, lora, args
        initialize_model_parallel(experiment)
        self.tokenizer = build_tokenizer(settings.tokenizer_type or settings.tokenizer,
                                         settings.tokenizer_model)
        if experiment.vocab_size < self.tokenizer.vocab_size:
            raise TrainingError(f"vocab_size {experiment.vocab_size} is smaller than the "
                                f"tokenizer's {self.tokenizer.vocab_size} ({self.tokenizer!r})")
        place = Topology.current()
        self.dp_size, self.dp_rank = place.dp_size, place.dp_rank
        self.global_batch = global_batch_size(settings, self.dp_size)
        self.num_micro_batches = self.global_batch // (settings.micro_batch_size * self.dp_size)
        # what a resume of this run must match (saved with every checkpoint)
        self.run_record = run_record(settings, experiment, lora, self.global_batch)
        self.model = self._build_model()
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(self.params, lr=settings.lr,
                                           betas=(settings.adam_beta1, settings.adam_beta2),
                                           eps=settings.adam_eps,
                                           weight_decay=settings.weight_decay)
        self.train_data, self.valid_data = self._build_datasets()
        # packed conversations restart their rotary positions (docs/sft.md)
        self.positions = RestartedPositions.install(self.model) \
            if settings.sft and settings.sft_sequence_packing else None
        self.iteration, self.consumed_samples = 0, 0

    def _build_model(self):
        base = self.settings.pretrained_checkpoint
        # a base about to be loaded is not drawn first (minutes and a full tensor per rank
        # for a large model)
        model = build_gpt_model(self.experiment, initialize=not base)
        if base and is_hf_directory(base):
            load_hf_weights(model, base, self.experiment)
        elif base:
            load_base_weights(model, base)
        if self.lora is not None:
            apply_lora(model, self.lora)
            if getattr(self.args, "lora_load", None):
                load_adapter(model, self.args.lora_load)
        return model

    def _build_datasets(self):
        settings, experiment = self.settings, self.experiment
        return FORMATS[settings.data_format](
            settings, seq_length=experiment.seq_length, seed=experiment.seed,
            num_samples=(max(1, settings.train_iters) * self.global_batch,
                         settings.eval_iters * self.global_batch),
            tokenizer=self.tokenizer, log=print_on_rank0)

    @property
    def trains_lora(self) -> bool:
        return self.lora is not None

    # state for an exact resume (the weights are saved on their own, below) -------------------
    def state_dict(self) -> dict:
        """Counters, this process's RNG states and the optimiser state (CPU tensors, keyed
        ``INDEX.NAME`` by the trainable parameter's position)."""
        optimizer = {f"{index}.{key}": value.detach().cpu().contiguous()
                     for index, param in enumerate(self.params)
                     for key, value in self.optimizer.state.get(param, {}).items()}
        return {"iteration": self.iteration, "consumed_samples": self.consumed_samples,
                "lora": self.trains_lora, "rng": capture_rng(), "optimizer": optimizer}

    def load_state_dict(self, state: dict) -> None:
        restore_rng(state["rng"])
        for index, param in enumerate(self.params):
            entries = {key.split(".", 1)[1]: value for key, value in state["optimizer"].items()
                       if key.startswith(f"{index}.")}
            if entries:
                self.optimizer.state[param] = {k: v.to(param.device) if k != "step" else v
                                               for k, v in entries.items()}
        self.iteration = state["iteration"]
        self.consumed_samples = state["consumed_samples"]

    # weights: the adapter (LoRA) or the whole model (full training) --------------------------
    def save_weights(self, directory: Path) -> None:
        if self.lora is not None:
            save_adapter(self.model, directory / "adapter")
            return
        (directory / "model").mkdir(parents=True, exist_ok=True)
        dist.barrier()
        save_dist_checkpoint(self.model.sharded_state_dict(), directory / "model")
        if dist.get_rank() == 0:
            write_file_atomically(directory / "model" / MODEL_DESCRIPTION,
                                  json.dumps(describe_model(self.experiment), indent=2))
        dist.barrier()

    def load_weights(self, directory: Path) -> None:
        if self.lora is not None:
            load_adapter(self.model, directory / "adapter")
        else:
            load_base_weights(self.model, directory / "model")

    # data and evaluation ----------------------------------------------------------------------
    def _batches(self, dataset, start_sample: int, count: int):
        stream = micro_batches(dataset, micro_batch_size=self.settings.micro_batch_size,
                               start_sample=start_sample, data_parallel_rank=self.dp_rank,
                               data_parallel_size=self.dp_size)
        return [next(stream) for _ in range(count)]

    def evaluate(self) -> Optional[float]:
        if self.valid_data is None:
            return None
        self.model.eval()
        total = tokens = 0.0
        with torch.no_grad():
            for i in range(self.settings.eval_iters):
                loss_sum, counted = run_micro_batches(
                    self.model, self._batches(self.valid_data, i * self.global_batch,
                                              self.num_micro_batches),
                    self.settings, self.experiment, forward_only=True, positions=self.positions)
                total, tokens = total + loss_sum, tokens + counted
        self.model.train()
        # the mean over every counted held-out token, as in training
        return total / max(tokens, 1.0)

    # the loop -------------------------------------------------------------------------------
    def train_step(self) -> dict:
        """One optimiser step over a global batch: its record (loss, lr, grad norm, speed)."""
        started = time.perf_counter()
        lr = learning_rate(self.settings, self.iteration)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        for param in self.params:
            param.grad = None
        batches = self._batches(self.train_data, self.consumed_samples, self.num_micro_batches)
        loss_sum, counted = run_micro_batches(self.model, batches, self.settings,
                                              self.experiment, forward_only=False,
                                              positions=self.positions)
        loss = loss_sum / max(counted, 1.0)
        norm = finalize_gradients(self.model, self.params, self.lora is not None,
                                  self.settings.clip_grad)
        _stop_if_not_finite(self.iteration + 1, loss, norm)
        self.optimizer.step()
        self.iteration += 1
        self.consumed_samples += self.global_batch
        elapsed = time.perf_counter() - started
        tokens = self.global_batch * self.experiment.seq_length
        return {"iteration": self.iteration, "loss": loss, "lr": lr, "grad_norm": norm,
                "tokens_per_s": tokens / elapsed, "loss_tokens": int(counted)}

    def train(self) -> dict:
        """Iterate to --train-iters: evaluate before and after, log, save at --save-interval
        and at the end. A summary of the run."""
        settings = self.settings
        metrics = MetricsLog(settings.save, resumed_at=self.iteration)
        before = self.evaluate() if self.iteration == 0 else None
        if before is not None:
            print_on_rank0(f"held-out loss before training: {before:.4f}")
            metrics.log({"iteration": 0, "valid_loss": before})
        progress = _progress_bar(settings, self.iteration)
        last_loss, saved_at = None, None
        while self.iteration < settings.train_iters:
            try:
                record = self.train_step()
            except TrainingError:  # a non-finite step: the log and curve up to the last good one
                metrics.close()
                raise
            last_loss = record["loss"]
            if settings.eval_interval and self.iteration % settings.eval_interval == 0:
                record["valid_loss"] = self.evaluate()
            metrics.log(record)
            self._report(record, progress)
            if settings.save and settings.save_interval and \
                    self.iteration % settings.save_interval == 0:
                save_checkpoint(self, settings.save)
                saved_at = self.iteration
        if progress is not None:
            progress.close()
        after = self.evaluate()
        if after is not None:
            print_on_rank0(f"held-out loss after training: {after:.4f}")
            metrics.log({"iteration": self.iteration, "valid_loss": after})
        if settings.save:
            self._save_result(saved_at)
        metrics.close()
        return {"loss": last_loss, "valid_loss_before": before, "valid_loss_after": after,
                "iteration": self.iteration}

    def _report(self, record: dict, progress) -> None:
        if progress is not None:
            progress.set_postfix(loss=f"{record['loss']:.4f}", lr=f"{record['lr']:.2e}",
                                 tok_s=f"{record['tokens_per_s']:.0f}")
            progress.update(1)
        elif self.iteration % self.settings.log_interval == 0:
            print_on_rank0(f"iteration {self.iteration}/{self.settings.train_iters} | "
                           f"loss {record['loss']:.4f} | lr {record['lr']:.3e} | grad norm "
                           f"{record['grad_norm']:.3f} | {record['tokens_per_s']:.0f} tokens/s")

    def _save_result(self, saved_at: Optional[int]) -> None:
        save = Path(self.settings.save)
        # decided from the loop's own state, the same on every rank (a file-system check
        # could differ between ranks and leave them in different collectives)
        if saved_at != self.iteration:
            save_checkpoint(self, save)
        self.save_weights(save)
        what = "adapter" if self.lora else "model"
        print_on_rank0(f"saved {what} to {save / what}")
