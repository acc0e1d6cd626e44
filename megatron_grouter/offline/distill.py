"""mg-distill: structure extraction — a Grouter learns a trained MoE's first-layer routing.

Loss per token: KL(softmax(teacher logits) ‖ softmax(student logits)), no temperature (the
paper: the logits' magnitudes matter, not only their ranking). The teacher runs on the fly on the
same document windows as the student: caching its logits would cost 4·E bytes per token (512 B
for 128 experts; 1.3 TB for the paper's 2.6B tokens) while its truncated forward (layers up to
the router only) is cheap next to that I/O. Data-parallel under torchrun; resumable; reports
held-out KL, top-k overlap |topk(s) ∩ topk(t)|/k and exact top-k set match.

The student is causal by default (grouter.causal=true: token t's routing reads tokens <= t of its
window), though the teacher's router sees a causal LM's hidden state, so nothing is lost by it;
grouter.causal=false distils the paper's bidirectional encoder (mg-train then needs
router.grouter.allow_future_context=true).
"""

from __future__ import annotations

import json
import logging
import sys
import time
from pathlib import Path

import hydra
import torch
import torch.nn.functional as F
from omegaconf import DictConfig

from megatron_grouter.atomic_files import atomic_path
from megatron_grouter.app import CONF_DIR, run_app
from megatron_grouter.errors import UserError
from megatron_grouter.runtime.distributed import all_reduce_host

log = logging.getLogger("megatron_grouter")


def kl_per_token(teacher_logits_TE: torch.Tensor, student_logits_TE: torch.Tensor) -> torch.Tensor:
    teacher_logp = F.log_softmax(teacher_logits_TE.float(), dim=-1)
    student_logp = F.log_softmax(student_logits_TE.float(), dim=-1)
    return (teacher_logp.exp() * (teacher_logp - student_logp)).sum(-1)


def topk_agreement(teacher_logits_TE: torch.Tensor, student_logits_TE: torch.Tensor,
                   topk: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per token: overlap |topk(s) ∩ topk(t)| / k and exact-set match (0/1)."""
    teacher_TE = torch.zeros_like(teacher_logits_TE, dtype=torch.bool).scatter(
        -1, teacher_logits_TE.topk(topk, dim=-1).indices, True)
    student_TE = torch.zeros(teacher_TE.shape, dtype=torch.bool, device=teacher_TE.device).scatter(
        -1, student_logits_TE.topk(topk, dim=-1).indices, True)
    overlap_T = (teacher_TE & student_TE).sum(-1).float() / topk
    return overlap_T, (overlap_T == 1).float()


def build_teacher(source, device: torch.device):
    if source.kind == "hf":
        from megatron_grouter.offline.sources import HFPartialSource

        return HFPartialSource(source.path, moe_layer=source.moe_layer, device=str(device),
                               routing_target=str(source.get("routing_target", "auto")))
    if source.kind == "megatron":
        from megatron_grouter.offline.sources.megatron_checkpoint import MegatronCheckpointSource

        return MegatronCheckpointSource(source.path, moe_layer=source.moe_layer, device=str(device))
    raise UserError(f"source.kind={source.kind!r}: choose hf or megatron")


def student_config(cfg: DictConfig, teacher):
    from megatron_grouter.grouter.config import GrouterConfig

    score = str(teacher.description.get("score_function", "softmax"))
    return GrouterConfig(vocab_size=teacher.vocab_size, num_experts=teacher.num_experts,
                         topk=teacher.topk, hidden_size=cfg.grouter.hidden_size,
                         num_layers=cfg.grouter.num_layers, num_heads=cfg.grouter.num_heads,
                         ffn_hidden_size=cfg.grouter.ffn_hidden_size, encoder=cfg.grouter.encoder,
                         causal=cfg.grouter.causal,
                         use_positions=cfg.grouter.use_positions, max_seq_length=cfg.grouter.window,
                         score_function="sigmoid" if score == "sigmoid" else "softmax",
                         scaling_factor=cfg.grouter.scaling_factor)


class Distiller:
    def __init__(self, cfg: DictConfig, device: torch.device, rank: int, world_size: int):
        from megatron_grouter.data.indexed import check_dataset_tokenizer
        from megatron_grouter.data.tokenizer import load_tokenizer
        from megatron_grouter.grouter.network import Grouter
        from megatron_grouter.offline.window_data import WindowBatches

        self.cfg, self.device, self.rank, self.world_size = cfg, device, rank, world_size
        self.teacher = build_teacher(cfg.source, device)
        tokenizer_path = cfg.data.tokenizer or self.teacher.tokenizer_dir
        if tokenizer_path is None:
            raise UserError("the source has no tokenizer; set data.tokenizer to the one the dataset used")
        self.tokenizer = load_tokenizer(tokenizer_path)
        check_dataset_tokenizer(cfg.data.prefix, self.tokenizer)
        torch.manual_seed(cfg.train.seed)
        self.student = Grouter(student_config(cfg, self.teacher)).to(device)
        self.model = (torch.nn.parallel.DistributedDataParallel(self.student) if world_size > 1
                      else self.student)
        train = cfg.train
        self.optimizer = torch.optim.AdamW(self.student.parameters(), lr=train.lr,
                                           weight_decay=train.weight_decay, betas=(0.9, 0.95))
        window = cfg.grouter.window
        # Only the LM's train documents (data.lm_split = the LM's data.split): the Grouter never
        # learns from the documents the target model is validated and tested on.
        lm_split = cfg.data.get("lm_split")
        self.train_batches = WindowBatches(cfg.data.prefix, window, train.batch_size, train.seed,
                                           "train", rank=rank, world_size=world_size, lm_split=lm_split)
        self.eval_batches = WindowBatches(cfg.data.prefix, window, train.batch_size, train.seed,
                                          "eval", rank=rank, world_size=world_size, lm_split=lm_split)
        self.out_dir = Path(cfg.out_dir)
        self.step = 0
        self.tokens_seen = 0

    # -------------------------------------------------------------- state
    @property
    def state_path(self) -> Path:
        return self.out_dir / "distill_state.pt"

    def save_state(self) -> None:
        if self.rank == 0:
            with atomic_path(self.state_path) as tmp:
                torch.save({"student": self.student.state_dict(), "optimizer": self.optimizer.state_dict(),
                            "step": self.step, "tokens_seen": self.tokens_seen}, tmp)

    def maybe_resume(self) -> None:
        if self.cfg.resume != "auto" or not self.state_path.is_file():
            return
        state = torch.load(self.state_path, map_location=self.device, weights_only=True)
        self.student.load_state_dict(state["student"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.step, self.tokens_seen = int(state["step"]), int(state["tokens_seen"])
        log.info("resumed distillation at step %d from %s", self.step, self.state_path)

    # -------------------------------------------------------------- loop
    def losses(self, tokens_BS: torch.Tensor, mask_BS: torch.Tensor):
        tokens_BS, mask_BS = tokens_BS.to(self.device), mask_BS.to(self.device)
        with torch.no_grad():
            teacher_BSE = self.teacher.router_logits(tokens_BS, mask_BS.long())
        student_BSE = self.model(tokens_BS, mask_BS)
        return teacher_BSE[mask_BS], student_BSE[mask_BS]

    def train_step(self) -> float:
        from megatron_grouter.training.lr_schedule import learning_rate

        train = self.cfg.train
        self.student.train()
        teacher_TE, student_TE = self.losses(*self.train_batches.batch(self.step))
        loss = kl_per_token(teacher_TE, student_TE).mean()
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.student.parameters(), train.clip_grad)
        for group in self.optimizer.param_groups:
            group["lr"] = learning_rate(self.step, train.lr, train.min_lr, train.warmup_steps, train.steps)
        self.optimizer.step()
        tokens = all_reduce_host(torch.tensor(float(teacher_TE.shape[0])))
        self.tokens_seen += int(tokens)
        return self.all_mean(loss.detach())

    def all_mean(self, value: torch.Tensor) -> float:
        value = all_reduce_host(value.detach().float().cpu().clone())
        return float(value) / self.world_size

    @torch.no_grad()
    def evaluate(self) -> dict:
        self.student.eval()
        sums = torch.zeros(4, dtype=torch.float64)
        for tokens_BS, mask_BS in self.eval_batches.eval_batches(self.cfg.train.eval_batches):
            teacher_TE, student_TE = self.losses(tokens_BS, mask_BS)
            overlap_T, exact_T = topk_agreement(teacher_TE, student_TE, self.teacher.topk)
            sums += torch.tensor([kl_per_token(teacher_TE, student_TE).sum().item(),
                                  overlap_T.sum().item(), exact_T.sum().item(), teacher_TE.shape[0]],
                                 dtype=torch.float64)
        sums = all_reduce_host(sums)
        count = max(float(sums[3]), 1.0)
        return {"eval_kl": float(sums[0]) / count, "eval_topk_overlap": float(sums[1]) / count,
                "eval_exact_match": float(sums[2]) / count,
                "chance_overlap": self.teacher.topk / self.teacher.num_experts}

    def run(self) -> dict:
        from tqdm import tqdm

        train = self.cfg.train
        self.maybe_resume()
        metrics_file = open(self.out_dir / "distill_metrics.jsonl", "a") if self.rank == 0 else None

        def record(payload: dict) -> None:
            if metrics_file is not None:
                metrics_file.write(json.dumps(payload) + "\n")
                metrics_file.flush()

        first_eval = self.evaluate() if self.step == 0 else None
        if first_eval:
            record({"step": 0, **first_eval})
            log.info("eval at step 0: %s", _fmt(first_eval))
        bar = tqdm(total=train.steps, initial=self.step, desc="distill", unit="step",
                   disable=self.rank != 0, mininterval=2.0)
        started, window_tokens = time.perf_counter(), 0
        last_eval = first_eval or {}
        while self.step < train.steps:
            loss = self.train_step()
            self.step += 1
            window_tokens += self.train_batches.tokens_per_batch
            bar.update(1)
            if self.step % train.log_interval == 0:
                rate = window_tokens / max(time.perf_counter() - started, 1e-9)
                bar.set_postfix(kl=f"{loss:.4f}", tok_s=f"{rate:.0f}")
                record({"step": self.step, "kl": loss, "tokens": self.tokens_seen, "tokens_per_s": rate})
                started, window_tokens = time.perf_counter(), 0
            if (train.eval_interval > 0 and self.step % train.eval_interval == 0) or self.step == train.steps:
                last_eval = self.evaluate()
                record({"step": self.step, **last_eval})
                log.info("eval at step %d: %s", self.step, _fmt(last_eval))
            if train.save_interval > 0 and self.step % train.save_interval == 0:
                self.save_state()
        bar.close()
        self.save_state()
        if metrics_file:
            metrics_file.close()
        return {"step": self.step, "tokens_seen": self.tokens_seen, **last_eval}

    def save_grouter(self, summary: dict) -> Path:
        from megatron_grouter.grouter.checkpoint import save_grouter

        directory = self.out_dir / "grouter"
        if self.rank == 0:
            provenance = {"source_model": self.teacher.description,
                          "source_layer": self.teacher.description.get("moe_layer"),
                          "tokens_seen": self.tokens_seen,
                          "distillation": {key: value for key, value in summary.items()},
                          "history": []}
            save_grouter(self.student, directory, provenance=provenance,
                         tokenizer_fingerprint=self.tokenizer.fingerprint())
        return directory


def _fmt(metrics: dict) -> str:
    return " | ".join(f"{key} {value:.4f}" for key, value in metrics.items())


def distill(cfg: DictConfig) -> dict:
    from megatron_grouter.runtime.distributed import init_distributed, shutdown_distributed
    from megatron_grouter.training.loggers import setup_console_logging

    layout = init_distributed()
    setup_console_logging(layout.is_main)
    try:
        distiller = Distiller(cfg, layout.device, layout.rank, layout.world_size)
        log.info("distill: teacher %s layer %s (E=%d, top-%d) -> %s Grouter %.1fM parameters, window %d, "
                 "%d train / %d held-out windows", cfg.source.path, distiller.teacher.description.get("moe_layer"),
                 distiller.teacher.num_experts, distiller.teacher.topk,
                 "bidirectional (sees future tokens)" if distiller.student.config.sees_future_tokens else "causal",
                 distiller.student.num_parameters() / 1e6, cfg.grouter.window,
                 len(distiller.train_batches), len(distiller.eval_batches))
        if layout.is_main:
            distiller.out_dir.mkdir(parents=True, exist_ok=True)
        summary = distiller.run()
        directory = distiller.save_grouter(summary)
        log.info("distilled Grouter saved to %s: %s", directory, _fmt(
            {key: value for key, value in summary.items() if isinstance(value, float)}))
        return {**summary, "grouter": str(directory)}
    finally:
        shutdown_distributed()


@hydra.main(config_path=str(CONF_DIR / "tool"), config_name="distill", version_base="1.3")
def hydra_main(cfg: DictConfig) -> None:
    run_app(distill, cfg)


def main() -> None:
    hydra_main()


if __name__ == "__main__":
    sys.exit(main())
