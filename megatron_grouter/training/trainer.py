"""The training loop: megatron-core's step machinery, validation, metrics, checkpoints.

One step = one global batch: megatron's pipeline schedule runs this rank's micro-batches
forward and backward through megatron's DistributedDataParallel chunks (training/step.py) and
then calls `finalize_model_grads` (data/expert-parallel grad reduction, sequence-parallel norm
and router grads over TP, tied-embedding grads over PP, the aux-loss-free expert-bias update);
megatron's optimizer (mixed precision with fp32 main params, optionally distributed) clips by
its global norm and steps with our warmup+cosine learning rate.
"""

from __future__ import annotations

import contextlib
import logging
import math
import time
from dataclasses import asdict
from pathlib import Path

import torch
import torch.distributed as dist
from megatron.core import parallel_state
from megatron.core.distributed import (DistributedDataParallel, DistributedDataParallelConfig,
                                       finalize_model_grads)
from megatron.core.transformer.module import Float16Module

from megatron_grouter.errors import UserError
from megatron_grouter.routing.context import RoutingContext
from megatron_grouter.runtime.host_syncs import host_data
from megatron_grouter.runtime.distributed import ParallelLayout
from megatron_grouter.training import checkpoint as ckpt
from megatron_grouter.training.batches import SequentialSchedule, micro_batches
from megatron_grouter.training.config import RootConfig
from megatron_grouter.training.init import layout_invariant_init
from megatron_grouter.training.loggers import MetricsLogger
from megatron_grouter.training.lr_schedule import learning_rate
from megatron_grouter.training.model import build_model_chunks, moe_layer_pattern, moe_layers
from megatron_grouter.training.device_batches import BatchUploader
from megatron_grouter.training.moe_metrics import (aux_loss_sums, drain_meters, entropy_sums,
                                                   expert_bias_sums, expert_biases, layer_load_sums,
                                                   metric_device, summarise_aux_losses,
                                                   summarise_entropy, summarise_expert_bias,
                                                   summarise_loads, tracked_aux_loss_names)
from megatron_grouter.training.step_statistics import StepStatistics
from megatron_grouter.training.optimizer import (apply_schedule, build_optimizer,
                                                 optimizer_state_bytes)
from megatron_grouter.training.step import ForwardStep, forward_backward

log = logging.getLogger("megatron_grouter")


class NonFiniteLoss(UserError):
    pass


def wrap_for_training(chunks: list, config: RootConfig) -> list[DistributedDataParallel]:
    """bf16: megatron's Float16Module (casts inputs/outputs around the bf16 chunk); then one
    DistributedDataParallel per chunk, gradients reduced in fp32 into `main_grad`."""
    parallel = config.parallel
    ddp_config = DistributedDataParallelConfig(
        grad_reduce_in_fp32=True, overlap_grad_reduce=parallel.overlap_grad_reduce,
        use_distributed_optimizer=parallel.distributed_optimizer,
        overlap_param_gather=parallel.overlap_param_gather,
        # Megatron-LM's default: the schedule dispatches each chunk's param all-gather
        # (param_sync_func) so pipeline stages gather in step with their first forward
        align_param_gather=parallel.overlap_param_gather)
    wrapped = []
    for index, chunk in enumerate(chunks):
        module = Float16Module(chunk.config, chunk) if config.train.bf16 else chunk
        wrapped.append(DistributedDataParallel(config=chunk.config, ddp_config=ddp_config,
                                               module=module, disable_bucketing=index > 0))
    return wrapped


def connect_schedule(chunks: list[DistributedDataParallel], optimizer, parallel) -> None:
    """What megatron's schedules call back into: grad finalisation, loss scaling, and (with
    overlap) the grad-sync controls of every chunk."""
    for chunk in chunks:
        config = chunk.config
        config.finalize_model_grads_func = finalize_model_grads
        config.grad_scale_func = optimizer.scale_loss
        if parallel.overlap_grad_reduce:
            no_sync = [model.no_sync for model in chunks]
            config.no_sync_func = no_sync[0] if len(chunks) == 1 else no_sync
            grad_sync = [model.start_grad_sync for model in chunks]
            config.grad_sync_func = grad_sync[0] if len(chunks) == 1 else grad_sync
        if parallel.overlap_param_gather:
            param_sync = [model.start_param_sync for model in chunks]
            config.param_sync_func = param_sync[0] if len(chunks) == 1 else param_sync


def log_moe_layers(layers: list) -> None:
    """Which classes megatron built for this rank's MoE layers (the seams, as the user sees them)."""
    from megatron_grouter.megatron_compat import installed_version

    kinds = sorted({f"{type(layer).__name__}(router={type(layer.router).__name__}, "
                    f"dispatcher={type(layer.token_dispatcher).__name__})" for layer in layers})
    log.info("model: %d MoE layers on this rank, %s, megatron-core %s", len(layers), ", ".join(kinds) or "none",
             installed_version())


class Trainer:
    def __init__(self, config: RootConfig, layout: ParallelLayout, train_dataset, valid_dataset,
                 vocab_size: int, run_hooks: list | None = None,
                 slot_of_expert: torch.Tensor | None = None, schedule=None):
        """`slot_of_expert`: the placement plan's slot of each Grouter expert (None: identity);
        `routing_provider` (set by the caller after construction) routes preemptive micro-batches."""
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
        self.routing_provider = None  # routing.provider.PreemptiveRouting for preemptive routers
        chunks = build_model_chunks(config.model, config.router, config.parallel, vocab_size,
                                    bf16=train.bf16, context=self.routing_context,
                                    recompute=train.recompute)
        for chunk in chunks:
            chunk.to(layout.device)
            # A permuted layout starts each Grouter expert from the same weights as the identity
            # one, and any TP/EP/PP layout from the same weights as one process.
            layout_invariant_init(chunk, train.seed, config.model.init_method_std,
                                  config.model.num_layers, config.model.num_experts,
                                  expert_of_slot=None if slot_of_expert is None
                                  else torch.argsort(slot_of_expert).tolist())
        self.raw_chunks = chunks  # unwrapped (no Float16Module / DDP): what checkpoints hold
        self.model_chunks = wrap_for_training(chunks, config)
        self.optimizer = build_optimizer(self.model_chunks, train, config.parallel)
        connect_schedule(self.model_chunks, self.optimizer, config.parallel)
        self.moe_layers = moe_layers(chunks)
        log_moe_layers(self.moe_layers)
        self.moe_pattern = moe_layer_pattern(config.model)
        self.forward_step = ForwardStep(self.routing_context, layout.device, train.seq_length)
        self.uploader = BatchUploader(layout.device)
        self.prefetched: tuple[int, list] | None = None  # (step, its micro-batches on the device)
        self.last_step = train.steps  # of this invocation (run() sets it)
        self.statistics = StepStatistics(self.summarise_step, metric_device(),
                                         parallel_state.get_tensor_model_parallel_rank())
        self.aux_loss_names: list[str] | None = None  # what megatron's tracker holds, fixed per run
        self._training = False
        self.step = 0
        self.tokens_seen = 0
        self.metrics = MetricsLogger(config.logger, self.out_dir, layout.is_main,
                                     run_config=asdict(config))

    @property
    def training(self) -> bool:
        """True inside a training step, False during evaluation (hooks ask this)."""
        return self._training

    def set_mode(self, training: bool) -> None:
        self._training = training
        for chunk in self.model_chunks:
            chunk.train(training)

    # ----------------------------------------------------------------- forward/backward
    def train_step(self) -> None:
        """One optimizer step. Its statistics wait on the device in `self.statistics` until the
        next flush: no host sync of ours in a step (megatron's optimizer returns the gradient
        norm on the host)."""
        train = self.config.train
        self.set_mode(True)
        for chunk in self.model_chunks:
            chunk.zero_grad_buffer()
        self.optimizer.zero_grad()
        batches = self.step_batches(self.step)
        if self.routing_provider is not None:
            self.routing_provider.observe(batches, training=True)
        biases_before = expert_biases(self.moe_layers)
        loss_sum = forward_backward(self.forward_step, self.model_chunks, batches,
                                    train.seq_length, train.micro_batch_size, forward_only=False)
        if self.step + 1 < self.last_step:  # host work for the next step while the GPU runs this one
            self.prefetched = (self.step + 1, self.prepare_batches(self.step + 1))
        lr = learning_rate(self.step, train.lr, train.min_lr, train.warmup_steps, train.steps)
        apply_schedule(self.optimizer, lr, train.weight_decay)
        _, grad_norm, _ = self.optimizer.step()
        grad_norm = float(grad_norm or 0.0)
        if not math.isfinite(grad_norm):
            self.flush_statistics()  # names the step whose loss went non-finite, if it did
            raise self.non_finite("gradient norm", grad_norm, self.step + 1)
        if self.aux_loss_names is None:
            self.aux_loss_names = tracked_aux_loss_names()
        sums = {"loss": loss_sum.detach().reshape(1),
                "loads": layer_load_sums(self.moe_layers, self.moe_pattern, self.config.model.num_experts),
                "aux_losses": aux_loss_sums(self.aux_loss_names, self.config.model.num_layers),
                "entropy": entropy_sums(self.moe_layers, self.moe_pattern),
                "expert_bias": expert_bias_sums(biases_before, self.moe_layers)}
        copies = ["loss", "expert_bias"]  # the same on every tensor-parallel rank
        host = {"lr": lr, "grad_norm": grad_norm,
                "tokens": self.tokens_seen + train.global_batch_size * train.seq_length}
        if self.step == 0:  # Adam state exists after the first update; its size never changes
            host["optimizer/state_bytes_rank0"] = optimizer_state_bytes(self.optimizer)
        for hook in self.hooks:
            if hasattr(hook, "step_sums"):
                sums.update(hook.step_sums())
                copies += hook.tensor_parallel_copies
            if hasattr(hook, "step_metrics"):
                host.update(hook.step_metrics(self) or {})
        if self.routing_provider is not None:
            host.update(self.routing_provider.step_metrics(self))
        self.statistics.add(self.step + 1, host, sums, tuple(copies))

    def summarise_step(self, sums: dict[str, torch.Tensor]) -> dict:
        """A step's metrics from its sums over all ranks (StepStatistics calls it at a flush)."""
        train = self.config.train
        metrics = {"loss": float(sums["loss"][0]) / (self.num_microbatches * self.dp_size)}
        metrics.update(summarise_loads(sums["loads"], train.global_batch_size * train.seq_length))
        metrics.update(summarise_aux_losses(self.aux_loss_names, sums["aux_losses"], self.dp_size,
                                            self.num_microbatches))
        entropy_name = self.moe_layers[0].router.load_meter.entropy_metric if self.moe_layers else "subset_entropy"
        metrics.update(summarise_entropy(entropy_name, sums["entropy"]))
        metrics.update(summarise_expert_bias(sums["expert_bias"]))
        for hook in self.hooks:
            if hasattr(hook, "summarise_sums"):
                metrics.update(hook.summarise_sums(sums))
        return metrics

    def non_finite(self, what: str, value: float, step: int) -> NonFiniteLoss:
        last = ckpt.find_latest(self.checkpoint_root)
        return NonFiniteLoss(f"{what} became {value} at step {step}; last good checkpoint: "
                             f"{last or 'none'}; lower train.lr or resume from it")

    def flush_statistics(self, window: tuple[float, int] | None = None) -> dict:
        """Write every kept step's metrics (one all-reduce, one device→host copy); the last
        step's metrics, or {} when none were kept. `window` (start time, tokens trained since):
        the last step also gets the window's tokens/s, timed after the flush waited for the
        device. Refuses a non-finite loss, naming its step."""
        records = self.statistics.flush()
        tokens_per_s = None if window is None else window[1] / max(time.perf_counter() - window[0], 1e-9)
        for step, metrics in records:
            if not math.isfinite(metrics["loss"]):
                raise self.non_finite("loss", metrics["loss"], step)
            if tokens_per_s is not None and step == records[-1][0]:
                metrics["tokens_per_s"] = tokens_per_s
            self.metrics.log(step, metrics)
        return records[-1][1] if records else {}

    def micro_batches(self, dataset, sample_ids: list[int], training: bool, step: int | None = None) -> list:
        """This rank's micro-batches of `sample_ids` (for training step `step`, default the current
        one) on the device, each carrying its routing (preemptive routers)."""
        with host_data():  # token ids from the dataset
            batches = micro_batches(dataset, sample_ids, self.config.train.micro_batch_size)
        if self.routing_provider is not None:
            with host_data() if self.routing_provider.routes_on_host else contextlib.nullcontext():
                self.routing_provider.attach(batches, self.step if step is None else step, training)
        return self.uploader.upload(batches)

    def prepare_batches(self, step: int) -> list:
        return self.micro_batches(self.train_dataset, self.schedule.rank_sample_ids(step, self.dp_rank),
                                  training=True, step=step)

    def step_batches(self, step: int) -> list:
        """The micro-batches of `step`: prefetched during the previous step, or made now."""
        prefetched, self.prefetched = self.prefetched, None
        if prefetched is not None and prefetched[0] == step:
            return prefetched[1]
        return self.prepare_batches(step)

    def global_mean(self, loss_sum: torch.Tensor, num_batches: int) -> float:
        """Mean micro-batch loss over the global batch: the last pipeline stage holds the sum
        (others hold zero), data-parallel ranks hold their share."""
        total = loss_sum.detach().double().clone()
        if dist.is_initialized():
            if parallel_state.get_pipeline_model_parallel_world_size() > 1:
                dist.all_reduce(total, group=parallel_state.get_pipeline_model_parallel_group())
            dist.all_reduce(total, group=parallel_state.get_data_parallel_group())
        return float(total) / (num_batches * self.dp_size)

    @torch.no_grad()
    def evaluate(self) -> float:
        train = self.config.train
        self.set_mode(False)
        total = torch.zeros((), dtype=torch.float64, device=self.layout.device)
        for index in range(train.eval_iters):
            batches = self.micro_batches(self.valid_dataset,
                                         self.valid_schedule.rank_sample_ids(index, self.dp_rank),
                                         training=False)
            if self.routing_provider is not None:
                self.routing_provider.observe(batches, training=False)
            total += forward_backward(self.forward_step, self.model_chunks, batches,
                                      train.seq_length, train.micro_batch_size,
                                      forward_only=True).double()
        drain_meters(self.moe_layers)  # evaluation traffic is not training load
        return self.global_mean(total, train.eval_iters * self.num_microbatches)

    # ----------------------------------------------------------------- checkpoints
    def train_state(self) -> dict:
        return {"tokens_seen": self.tokens_seen, "world_size": self.layout.world_size,
                "config": asdict(self.config), "vocab_size": self.vocab_size,
                "expert_parallel": self.layout.expert_parallel,
                "tensor_parallel": self.layout.tensor_parallel,
                "pipeline_parallel": self.layout.pipeline_parallel,
                **{key: value for hook in self.hooks if hasattr(hook, "train_state")
                   for key, value in hook.train_state().items()}}

    def save(self) -> None:
        self.sync_params()
        path = ckpt.save_checkpoint(self.checkpoint_root, self.step, self.raw_chunks,
                                    self.optimizer, self.train_state())
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
        state = ckpt.load_checkpoint(path, self.raw_chunks, self.optimizer, expected=self.train_state())
        for hook in (hook for hook in self.hooks if hasattr(hook, "check_resume")):
            hook.check_resume(state)
        self.step = int(state["step"])
        self.tokens_seen = int(state["tokens_seen"])
        log.info("resumed from %s at step %d", path, self.step)

    def sync_params(self) -> None:
        """With overlap_param_gather the optimizer's updated shards reach the model only at
        the next forward; gather them now (before a checkpoint or an evaluation)."""
        if self.config.parallel.overlap_param_gather:
            for chunk in self.model_chunks:
                chunk.start_param_sync(force_sync=True)

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
        # Preemption (SIGTERM/SIGUSR1): checkpoint at the next step boundary, then stop. The
        # ranks agree over a gloo group, so the check never waits for the GPU.
        from megatron_grouter.runtime.host_groups import host_twin
        from megatron_grouter.training.preemption import PreemptionWatch
        preemption = PreemptionWatch(self.layout.device, group=host_twin())
        preemption.install()
        self.last_step = last_step
        while self.step < last_step:
            self.train_step()
            self.step += 1
            self.tokens_seen += tokens_per_step
            window_tokens += tokens_per_step
            evaluate_now = train.eval_interval > 0 and (self.step % train.eval_interval == 0
                                                        or self.step == train.steps)
            save_now = train.save_interval > 0 and self.step % train.save_interval == 0
            stop = self.step < last_step and preemption.should_stop()  # all ranks agree (MAX)
            if (self.step % train.log_interval == 0 or self.step == last_step or evaluate_now
                    or save_now or stop):
                # the one sync of the window; its time is the window's device time too
                stats = self.flush_statistics((window_start, window_tokens))
                summary.update(loss=stats["loss"])
                self.log_progress(stats, last_step)
                window_start, window_tokens = time.perf_counter(), 0
            if evaluate_now:
                self.sync_params()
                summary["val_loss"] = self.evaluate()
                self.log_eval(summary["val_loss"])
            if save_now:
                self.save()
            if stop:
                if not save_now:
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
