"""mg-affinity, mg-fold, mg-expand, mg-tune: the offline router-conversion tools (Hydra).

    mg-affinity grouter=G data.prefix=P out=outputs/aff          → outputs/aff.npz + .json
    mg-fold grouter=G affinity=outputs/aff num_experts=32 out=G32 [strategy=affinity|balance|random]
    mg-expand grouter=G data.prefix=P num_experts=160 out=G160
    mg-tune grouter=G data.prefix=P out=Gt [mode=weights|bias] [target_max_vio=0.2 max_tokens=...]
    torchrun --nproc-per-node 2 -m megatron_grouter.offline.convert_cli tune ...   (data parallel;
    also `affinity`). Each writes a new Grouter checkpoint whose provenance history records the step.

The dataset must be tokenised with the Grouter's tokenizer: its meta fingerprint is compared with
the Grouter's (and with `data.tokenizer`, when given). Each `run_*` function is the job behind a
tool and returns a summary dict (used by tests and the benchmark).
"""

from __future__ import annotations

import json
import logging
import os
import sys
from pathlib import Path

import hydra
import numpy as np
import torch
import torch.distributed as dist
from omegaconf import DictConfig

from megatron_grouter.atomic_files import write_json_atomic
from megatron_grouter.app import CONF_DIR, run_app
from megatron_grouter.errors import UserError

log = logging.getLogger("megatron_grouter")


# ------------------------------------------------------------------ shared
def open_grouter(path: str, data_cfg: DictConfig | None = None):
    """Load the Grouter at `path`; with data, refuse a dataset made with another tokenizer."""
    from megatron_grouter.data.indexed import check_dataset_tokenizer, read_dataset_meta
    from megatron_grouter.data.tokenizer import load_tokenizer
    from megatron_grouter.grouter.checkpoint import load_grouter, read_grouter_header

    expected = None
    if data_cfg is not None:
        if data_cfg.get("tokenizer"):
            tokenizer = load_tokenizer(data_cfg.tokenizer)
            check_dataset_tokenizer(data_cfg.prefix, tokenizer)
            expected = tokenizer.fingerprint()
        else:
            expected = dict(read_dataset_meta(data_cfg.prefix)["tokenizer"])
        stored = read_grouter_header(path).get("tokenizer") or {}
        if {key: stored.get(key) for key in ("vocab_size", "sha256")} != \
                {key: expected.get(key) for key in ("vocab_size", "sha256")}:
            raise UserError(f"dataset {data_cfg.prefix} was tokenised with another tokenizer (sha "
                            f"{str(expected.get('sha256'))[:12]}) than the Grouter at {path} (sha "
                            f"{str(stored.get('sha256'))[:12]}); preprocess the data with the Grouter's tokenizer")
    return load_grouter(path, expected_tokenizer=expected)


def window_batches(grouter, prefix: str, batch_size: int, seed: int, split: str, rank: int = 0,
                   world_size: int = 1, lm_split: str | None = None):
    from megatron_grouter.offline.window_data import WindowBatches

    return WindowBatches(prefix, grouter.config.max_seq_length, batch_size, seed, split,
                         rank=rank, world_size=world_size, lm_split=lm_split)


def _maybe_init_distributed() -> tuple[int, int, torch.device, bool]:
    """torch.distributed only under torchrun (WORLD_SIZE > 1); returns rank, world, device, started."""
    cuda = torch.cuda.is_available()
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = torch.device("cuda", local_rank) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not dist.is_initialized():
        from megatron_grouter.runtime.distributed import start_process_group

        start_process_group()
        return dist.get_rank(), dist.get_world_size(), device, True
    if dist.is_initialized():
        return dist.get_rank(), dist.get_world_size(), device, False
    return 0, 1, device, False


def _save(model, out: str, provenance: dict, tokenizer: dict) -> Path:
    from megatron_grouter.grouter.checkpoint import save_grouter

    return save_grouter(model.cpu(), out, provenance=provenance, tokenizer_fingerprint=tokenizer)


def _check_num_experts(value) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
        raise UserError(f"num_experts={value!r} must be a positive integer (the target expert count)")
    return value


# ------------------------------------------------------------------ affinity
def run_affinity(cfg: DictConfig) -> dict:
    from megatron_grouter.grouter.checkpoint import grouter_fingerprint
    from megatron_grouter.offline.affinity import compute_affinity, save_affinity

    rank, world_size, device, started = _maybe_init_distributed()
    try:
        grouter, _ = open_grouter(cfg.grouter, cfg.data)
        batches = window_batches(grouter, cfg.data.prefix, 1, 0, cfg.split)
        affinity = compute_affinity(grouter, batches, batch_size=cfg.batch_size, max_tokens=cfg.max_tokens,
                                    device=device, progress=cfg.progress,
                                    grouter_fingerprint=grouter_fingerprint(cfg.grouter))
        affinity.meta = {"dataset": str(cfg.data.prefix), "split": cfg.split, "grouter": str(cfg.grouter)}
        path = save_affinity(affinity, cfg.out) if rank == 0 else None
        log.info("affinity over %d tokens (%.0f tokens/s, %d processes) saved to %s",
                 affinity.tokens, affinity.tokens_per_s, world_size, path)
        return {"path": str(path), "tokens": affinity.tokens, "tokens_per_s": affinity.tokens_per_s}
    finally:
        if started:
            dist.destroy_process_group()


# ------------------------------------------------------------------ fold
def run_fold(cfg: DictConfig) -> dict:
    from megatron_grouter.grouter.checkpoint import grouter_fingerprint, with_history_step
    from megatron_grouter.offline.affinity import load_affinity
    from megatron_grouter.offline.folding import (check_fold_sizes, fold_groups, fold_grouter,
                                                  mapping_matrix, within_group_mass)

    num_target = _check_num_experts(cfg.num_experts)
    grouter, info = open_grouter(cfg.grouter)
    num_source = grouter.config.num_experts
    check_fold_sizes(num_source, num_target)
    fingerprint = grouter_fingerprint(cfg.grouter)
    affinity = None
    if cfg.affinity:
        affinity = load_affinity(cfg.affinity, expected_fingerprint=fingerprint)
        if affinity.matrix.shape[0] != num_source:
            raise UserError(f"affinity {cfg.affinity} has {affinity.matrix.shape[0]} experts but the Grouter "
                            f"{num_source}; recompute it with mg-affinity on this Grouter")
    if cfg.mapping:
        groups = read_mapping(cfg.mapping, fingerprint, num_source, num_target)
    elif affinity is None and cfg.strategy != "random":
        raise UserError(f"fold strategy {cfg.strategy!r} needs an affinity; pass affinity=<mg-affinity output> "
                        "or strategy=random")
    else:
        matrix = affinity.matrix if affinity is not None else np.zeros((num_source, num_source), np.int64)
        groups = fold_groups(matrix, num_target, cfg.strategy, cfg.seed)
    mapping = mapping_matrix(groups, num_source)
    folded = fold_grouter(grouter, mapping)
    mass = within_group_mass(affinity.matrix, groups) if affinity is not None else None
    step = {"step": "fold", "strategy": "mapping" if cfg.mapping else cfg.strategy,
            "source_experts": num_source, "target_experts": num_target, "groups": groups,
            "mapping": mapping.tolist(), "source_grouter_fingerprint": fingerprint,
            "affinity": str(cfg.affinity) if cfg.affinity else None,
            "within_group_coactivation": mass}
    out = _save(folded, cfg.out, with_history_step(info.provenance, step), info.tokenizer)
    if cfg.mapping_out:
        write_mapping(cfg.mapping_out, groups, fingerprint, cfg.strategy)
    log.info("folded %d → %d experts (%s); within-group co-activation %s; saved to %s", num_source,
             num_target, step["strategy"], "n/a" if mass is None else f"{mass:.3f}", out)
    return {"grouter": str(out), "groups": groups, "within_group_coactivation": mass}


def write_mapping(path: str, groups: list[list[int]], grouter_fingerprint: str, strategy: str) -> None:
    write_json_atomic(path, {"format": "megatron-grouter/fold-mapping", "grouter_fingerprint": grouter_fingerprint,
                             "strategy": strategy, "groups": groups})


def read_mapping(path: str, grouter_fingerprint: str, num_source: int, num_target: int) -> list[list[int]]:
    try:
        record = json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError) as error:
        raise UserError(f"fold mapping {path} is unreadable ({error}); write it with mg-fold mapping_out=...") from None
    if record.get("grouter_fingerprint") != grouter_fingerprint:
        raise UserError(f"fold mapping {path} was built for another Grouter (fingerprint "
                        f"{str(record.get('grouter_fingerprint'))[:12]}, this one {grouter_fingerprint[:12]}); "
                        "rebuild it on this Grouter")
    groups = record.get("groups")
    if not isinstance(groups, list) or len(groups) != num_target:
        raise UserError(f"fold mapping {path} has {len(groups) if isinstance(groups, list) else 0} groups, "
                        f"not num_experts={num_target}; rebuild it or set num_experts accordingly")
    try:
        groups = [[int(expert) for expert in group] for group in groups]
    except (TypeError, ValueError):
        raise UserError(f"fold mapping {path} has non-integer groups; rebuild it with mg-fold mapping_out=...") from None
    if sorted(expert for group in groups for expert in group) != list(range(num_source)):
        raise UserError(f"fold mapping {path} does not place each of the {num_source} experts in exactly one group; "
                        "rebuild it on this Grouter")
    return groups


# ------------------------------------------------------------------ expand
def run_expand(cfg: DictConfig) -> dict:
    from megatron_grouter.grouter.checkpoint import grouter_fingerprint, with_history_step
    from megatron_grouter.offline.expanding import children_per_parent, collect_routing, expand_grouter

    num_target = _check_num_experts(cfg.num_experts)
    grouter, info = open_grouter(cfg.grouter, cfg.data)
    children_per_parent(np.zeros(grouter.config.num_experts), num_target)  # size check before any work
    _, _, device, _ = _maybe_init_distributed()
    batches = window_batches(grouter, cfg.data.prefix, 1, 0, cfg.split)
    hidden_TH, logits_TE = collect_routing(grouter, batches, cfg.batch_size, cfg.max_tokens, device)
    result = expand_grouter(grouter.cpu(), hidden_TH, logits_TE, num_target, cfg.seed)
    step = {"step": "expand", "source_experts": grouter.config.num_experts, "target_experts": num_target,
            "children": {str(parent): children for parent, children in result.parents.items()},
            "alpha": {str(parent): alpha for parent, alpha in result.alpha.items()},
            "violation_rate": result.violation_rate,
            "tokens": result.tokens, "source_grouter_fingerprint": grouter_fingerprint(cfg.grouter)}
    out = _save(result.grouter, cfg.out, with_history_step(info.provenance, step), info.tokenizer)
    log.info("expanded %d → %d experts (split %s); routing violations on %d tokens: %.4f; saved to %s",
             grouter.config.num_experts, num_target, sorted(result.parents), result.tokens,
             result.violation_rate, out)
    return {"grouter": str(out), "parents": result.parents, "violation_rate": result.violation_rate}


# ------------------------------------------------------------------ tune
def tune_settings(cfg: DictConfig):
    from megatron_grouter.offline.tuning import TuneSettings

    return TuneSettings(mode=cfg.mode, lr=cfg.lr, bias_rate=cfg.bias_rate, batch_size=cfg.batch_size,
                        max_tokens=cfg.max_tokens, target_max_vio=cfg.target_max_vio,
                        check_interval=cfg.check_interval, eval_tokens=cfg.eval_tokens, seed=cfg.seed,
                        kl_weight=cfg.kl_weight, stop_tokens=cfg.stop_tokens, patience=cfg.patience)


def run_tune(cfg: DictConfig) -> dict:
    from megatron_grouter.grouter.checkpoint import grouter_fingerprint, with_history_step
    from megatron_grouter.offline.tuning import tune_grouter, tuning_record

    settings = tune_settings(cfg)
    rank, world_size, device, started = _maybe_init_distributed()
    try:
        grouter, info = open_grouter(cfg.grouter, cfg.data)
        torch.manual_seed(settings.seed)
        lm_split = cfg.data.get("lm_split")  # only the LM's train documents (data/lm_split.py)
        train = window_batches(grouter, cfg.data.prefix, settings.batch_size, settings.seed, "train",
                               rank, world_size, lm_split)
        held_out = window_batches(grouter, cfg.data.prefix, world_size, settings.seed, "eval", lm_split=lm_split)
        result = tune_grouter(grouter, train, held_out, settings, device, progress=cfg.progress)
        record = {**tuning_record(result, settings), "dataset": str(cfg.data.prefix),
                  "source_grouter_fingerprint": grouter_fingerprint(cfg.grouter)}
        out = _save(result.grouter, cfg.out, with_history_step(info.provenance, record),
                    info.tokenizer) if rank == 0 else None
        log.info("tuned (%s) on %d tokens, %.0f tokens/s, stopped by %s: held-out MaxVioGlobal %.3f → %.3f, "
                 "top-k agreement with the untuned Grouter %.3f; saved to %s", settings.objective, result.tokens,
                 result.tokens_per_s, result.stopped_by, result.before["max_vio_global"],
                 result.after["max_vio_global"], result.after["topk_agreement"], out)
        return {"grouter": str(out), "objective": settings.objective, "tokens": result.tokens,
                "tokens_per_s": result.tokens_per_s, "stopped_by": result.stopped_by,
                "stop_max_vio": result.stop_max_vio, "before": result.before, "after": result.after}
    finally:
        if started:
            dist.destroy_process_group()


# ------------------------------------------------------------------ entry points
def _run(job, cfg: DictConfig):
    from megatron_grouter.training.loggers import setup_console_logging

    setup_console_logging(int(os.environ.get("RANK", "0")) == 0)
    return run_app(job, cfg)


@hydra.main(config_path=str(CONF_DIR / "tool"), config_name="affinity", version_base="1.3")
def affinity_main(cfg: DictConfig) -> None:
    _run(run_affinity, cfg)


@hydra.main(config_path=str(CONF_DIR / "tool"), config_name="fold", version_base="1.3")
def fold_main(cfg: DictConfig) -> None:
    _run(run_fold, cfg)


@hydra.main(config_path=str(CONF_DIR / "tool"), config_name="expand", version_base="1.3")
def expand_main(cfg: DictConfig) -> None:
    _run(run_expand, cfg)


@hydra.main(config_path=str(CONF_DIR / "tool"), config_name="tune", version_base="1.3")
def tune_main(cfg: DictConfig) -> None:
    _run(run_tune, cfg)


TOOLS = {"affinity": affinity_main, "fold": fold_main, "expand": expand_main, "tune": tune_main}


def main() -> None:
    """`python -m megatron_grouter.offline.convert_cli <tool> overrides...` (tool: affinity|fold|expand|tune)."""
    if len(sys.argv) < 2 or sys.argv[1] not in TOOLS:
        print(f"usage: {sys.argv[0]} {{{'|'.join(TOOLS)}}} key=value ...", file=sys.stderr)
        sys.exit(2)
    tool = TOOLS[sys.argv.pop(1)]
    tool()


if __name__ == "__main__":
    main()
