"""The training loop: micro-batches with gradient accumulation, validation, metrics, checkpoints.

One step = one global batch. Each data-parallel rank runs its micro-batches forward and backward
through megatron's DistributedDataParallel (gradients land in `main_grad` and are all-reduced at
the end of the step), then AdamW steps with the warmup+cosine learning rate.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import asdict
from pathlib import Path

import torch
import torch.distributed as dist
from megatron.core import parallel_state
from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
from megatron.core.transformer.moe.moe_utils import (MoEAuxLossAutoScaler,
                                                     get_moe_layer_wise_logging_tracker)

from megatron_grouter.dispatch.context import DispatchContext
from megatron_grouter.errors import UserError
from megatron_grouter.routing.context import RoutingContext
from megatron_grouter.runtime.distributed import ParallelLayout, all_reduce_host
from megatron_grouter.training import checkpoint as ckpt
from megatron_grouter.training.batches import MicroBatch, SequentialSchedule, micro_batches
from megatron_grouter.training.config import RootConfig
from megatron_grouter.training.init import layout_invariant_init
from megatron_grouter.training.loggers import MetricsLogger
from megatron_grouter.training.lr_schedule import learning_rate
from megatron_grouter.training.model import build_gpt_model, moe_layers
from megatron_grouter.training.moe_metrics import (collect_aux_losses, collect_layer_loads,
                                                   collect_routing_entropy, summarise_loads)
from megatron_grouter.training.optimizer import build_adamw, optimizer_step

log = logging.getLogger("megatron_grouter")


class NonFiniteLoss(UserError):
    pass


def causal_mask(seq_length: int, device: torch.device) -> torch.Tensor:
    """[1, 1, s, s], True where attention is masked (megatron's convention)."""
    return torch.triu(torch.ones(seq_length, seq_length, dtype=torch.bool, device=device), 1)[None, None]


class Trainer:
    def __init__(self, config: RootConfig, layout: ParallelLayout, train_dataset, valid_dataset,
                 vocab_size: int, run_hooks: list | None = None,
                 slot_of_expert: torch.Tensor | None = None, schedule=None):
        self.config = config
        self.layout = layout
        self.train_dataset = train_dataset
        self.valid_dataset = valid_dataset
        self.hooks = run_hooks or []
        self.vocab_size = vocab_size
        train = config.train
        self.out_dir = Path(train.out_dir)
        self.checkpoint_root = self.out_dir / "checkpoints"
        self.dp_rank = parallel_state.get_data_parallel_rank()
        self.dp_size = parallel_state.get_data_parallel_world_size()
        self.num_microbatches = train.global_batch_size // (train.micro_batch_size * self.dp_size)
        self.schedule = schedule or SequentialSchedule(train.global_batch_size, self.dp_size,
                                                       len(train_dataset))
        self.valid_schedule = SequentialSchedule(train.global_batch_size, self.dp_size,
                                                 len(valid_dataset))

        self.routing_context = RoutingContext(sequence_parallel=config.parallel.sequence_parallel)
        self.dispatch_context = DispatchContext(verify=config.parallel.verify_dispatch_plan)
        model = build_gpt_model(config.model, config.router, config.parallel, vocab_size,
                                bf16=train.bf16, context=self.routing_context,
                                slot_of_expert=slot_of_expert,
                                dispatch_context=self.dispatch_context).to(layout.device)
        # A permuted layout starts each Grouter expert from the same weights as the identity one.
        layout_invariant_init(model, train.seed, config.model.init_method_std,
                              config.model.num_layers, config.model.num_experts,
                              expert_of_slot=None if slot_of_expert is None
                              else torch.argsort(slot_of_expert).tolist())
        self.model = model
        self.ddp = DistributedDataParallel(
            config=model.config,
            ddp_config=DistributedDataParallelConfig(grad_reduce_in_fp32=True,
                                                     overlap_grad_reduce=False,
                                                     use_distributed_optimizer=False),
            module=model)
        self.optimizer = build_adamw(model, train)
        self.moe_layers = moe_layers(model)
        # megatron's aux-loss tracker is process-global; a new model starts with an empty one.
        get_moe_layer_wise_logging_tracker().clear()
        self.mask = causal_mask(train.seq_length, layout.device)
        self.step = 0
        self.tokens_seen = 0
        self.metrics = MetricsLogger(config.logger, self.out_dir, layout.is_main,
                                     run_config=asdict(config))

    @property
    def training(self) -> bool:
        """True inside a training step, False during evaluation (hooks ask this)."""
        return self.ddp.training

    # ----------------------------------------------------------------- forward/backward
    def micro_batch_loss(self, batch: MicroBatch) -> torch.Tensor:
        for hook in self.hooks:
            hook.before_forward(self, batch)
        token_loss_BS = self.ddp(batch.tokens_BS, batch.position_ids_BS, self.mask,
                                 labels=batch.labels_BS)
        for hook in self.hooks:
            hook.after_forward(self, batch)
        return (token_loss_BS.float() * batch.loss_mask_BS).sum() / batch.loss_mask_BS.sum()

    def train_step(self) -> dict:
        train = self.config.train
        self.ddp.train()
        self.ddp.zero_grad_buffer()
        scale = 1.0 / self.num_microbatches
        MoEAuxLossAutoScaler.set_loss_scale(torch.tensor(scale, device=self.layout.device))
        batches = micro_batches(self.train_dataset,
                                self.schedule.rank_sample_ids(self.step, self.dp_rank),
                                train.micro_batch_size)
        loss_sum = torch.zeros((), dtype=torch.float64)
        for batch in batches:
            loss = self.micro_batch_loss(batch.to(self.layout.device))
            (loss * scale).backward()
            loss_sum += loss.detach().double().cpu()
        self.ddp.finish_grad_sync()
        loss_value = self.data_parallel_mean(loss_sum / len(batches))
        if not math.isfinite(loss_value):
            last = ckpt.find_latest(self.checkpoint_root)
            raise NonFiniteLoss(f"loss became {loss_value} at step {self.step + 1}; last good "
                                f"checkpoint: {last or 'none'}; lower train.lr or resume from it")
        lr = learning_rate(self.step, train.lr, train.min_lr, train.warmup_steps, train.steps)
        grad_norm = optimizer_step(self.optimizer, lr, train.clip_grad)
        loads_LE = collect_layer_loads(self.moe_layers)
        stats = {"loss": loss_value, "lr": lr, "grad_norm": grad_norm,
                 **summarise_loads(loads_LE, train.global_batch_size * train.seq_length), **{f"moe/{name}": value for name, value
                                                 in collect_aux_losses(self.num_microbatches).items()}}
        stats.update(collect_routing_entropy(self.moe_layers))
        for hook in self.hooks:
            stats.update(hook.step_metrics(self) or {})
        return stats

    def data_parallel_mean(self, value: torch.Tensor) -> float:
        value = all_reduce_host(value.clone().double(), group=parallel_state.get_data_parallel_group())
        return float(value) / self.dp_size

    @torch.no_grad()
    def evaluate(self) -> float:
        train = self.config.train
        self.ddp.eval()
        total = torch.zeros((), dtype=torch.float64)
        for index in range(train.eval_iters):
            for batch in micro_batches(self.valid_dataset,
                                       self.valid_schedule.rank_sample_ids(index, self.dp_rank),
                                       train.micro_batch_size):
                total += self.micro_batch_loss(batch.to(self.layout.device)).double().cpu()
        for layer in self.moe_layers:  # evaluation traffic is not training load
            layer.router.load_meter.take()
            layer.router.load_meter.take_entropy()
        collect_aux_losses(1)
        return self.data_parallel_mean(total / (train.eval_iters * self.num_microbatches))

    # ----------------------------------------------------------------- checkpoints
    def train_state(self) -> dict:
        return {"tokens_seen": self.tokens_seen, "world_size": self.layout.world_size,
                "config": asdict(self.config), "vocab_size": self.vocab_size,
                "expert_parallel": self.layout.expert_parallel,
                "tensor_parallel": self.layout.tensor_parallel,
                **{k: v for hook in self.hooks if hasattr(hook, "train_state") for k, v in hook.train_state().items()}}

    def save(self) -> None:
        path = ckpt.save_checkpoint(self.checkpoint_root, self.step, self.model, self.optimizer,
                                    self.train_state())
        log.info("saved checkpoint %s", path)

    def maybe_resume(self) -> None:
        resume = self.config.train.resume
        if resume == "none":
            return
        path = ckpt.find_latest(self.checkpoint_root) if resume == "auto" else Path(resume)
        if path is None:
            return
        if not path.exists():
            raise UserError(f"train.resume={resume} does not exist; use train.resume=auto or none")
        state = ckpt.load_checkpoint(path, self.model, self.optimizer)
        for hook in (hook for hook in self.hooks if hasattr(hook, "check_resume")):
            hook.check_resume(state)
        self.step = int(state["step"])
        self.tokens_seen = int(state["tokens_seen"])
        log.info("resumed from %s at step %d", path, self.step)

    # ----------------------------------------------------------------- loop
    def run(self) -> dict:
        train = self.config.train
        self.maybe_resume()
        tokens_per_step = train.global_batch_size * train.seq_length
        last_step = train.steps if train.max_steps_this_run is None else min(
            train.steps, self.step + train.max_steps_this_run)
        summary: dict = {}
        if self.step == 0 and train.eval_interval > 0:
            summary["val_loss"] = self.evaluate()
            self.log_eval(summary["val_loss"])
        window_start, window_tokens = time.perf_counter(), 0
        # Preemption (SIGTERM/SIGUSR1): checkpoint at the next step boundary, then stop.
        from megatron_grouter.training.preemption import PreemptionWatch
        preemption = PreemptionWatch(self.layout.device)
        preemption.install()
        while self.step < last_step:
            stats = self.train_step()
            self.step += 1
            self.tokens_seen += tokens_per_step
            window_tokens += tokens_per_step
            elapsed = time.perf_counter() - window_start
            stats["tokens_per_s"] = window_tokens / max(elapsed, 1e-9)
            stats["tokens"] = self.tokens_seen
            self.metrics.log(self.step, stats)
            if self.step % train.log_interval == 0 or self.step == last_step:
                self.log_progress(stats, last_step)
                window_start, window_tokens = time.perf_counter(), 0
            if train.eval_interval > 0 and (self.step % train.eval_interval == 0
                                            or self.step == train.steps):
                summary["val_loss"] = self.evaluate()
                self.log_eval(summary["val_loss"])
            if train.save_interval > 0 and self.step % train.save_interval == 0:
                self.save()
            summary.update(loss=stats["loss"])
            if self.step < last_step and preemption.should_stop():  # all ranks agree (MAX)
                if not (train.save_interval > 0 and self.step % train.save_interval == 0):
                    self.save()
                log.info("preempted: checkpointed step %d, stopping for a requeue", self.step)
                summary["preempted"] = True
                break
        preemption.uninstall()
        if not summary.get("preempted") and train.save_interval >= 0 and (
                train.save_interval == 0 or self.step % train.save_interval):
            self.save()
        self.metrics.close()
        summary["step"] = self.step
        return summary

    def log_progress(self, stats: dict, last_step: int) -> None:
        aux = " ".join(f"{key.removeprefix('moe/')}={value:.4f}" for key, value in stats.items()
                       if key.startswith("moe/") and not key.startswith("moe/max_vio"))
        log.info("step %d/%d | loss %.4f | lr %.2e | grad_norm %.3f | max_vio %.3f | %s%.0f tok/s",
                 self.step, last_step, stats["loss"], stats["lr"], stats["grad_norm"],
                 stats["moe/max_vio"], aux + " | " if aux else "", stats["tokens_per_s"])

    def log_eval(self, val_loss: float) -> None:
        self.metrics.log(self.step, {"val_loss": val_loss, "tokens": self.tokens_seen})
        log.info("eval at step %d | val_loss %.4f | tokens %d", self.step, val_loss, self.tokens_seen)
