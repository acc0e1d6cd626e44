"""mg-reproduce: run the pipeline of an `experiment=` preset, then write its report.

    mg-reproduce experiment=quick                 (python -m megatron_grouter.reproduce ...)
    mg-reproduce experiment=standard seeds=[1,2,3]
    mg-reproduce --cfg job experiment=paper       print the composed config
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

import hydra
from omegaconf import DictConfig, OmegaConf

from megatron_grouter.app import CONF_DIR, run_app


def reproduce(cfg: DictConfig) -> Path:
    """Run (or resume) every stage, then write report.md; returns its path."""
    import torch

    from megatron_grouter.reproduce.pipeline import Pipeline
    from megatron_grouter.reproduce.report import write_report
    from megatron_grouter.reproduce.stages import write_json_atomic

    os.environ.setdefault("OMP_NUM_THREADS", str(cfg.threads))
    torch.set_num_threads(int(cfg.threads))
    out_dir = Path(cfg.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    write_json_atomic(out_dir / "config.json", OmegaConf.to_container(cfg, resolve=True))
    started = time.perf_counter()
    preset = {"name": cfg.name, "note": cfg.get("note", ""), "notes": list(cfg.get("notes") or []),
              "seeds": list(cfg.seeds), "first_seed_only": list(cfg.first_seed_only),
              "headline": OmegaConf.to_container(cfg.headline, resolve=True) if cfg.get("headline") else {},
              "corpus": corpus_description(cfg.data)}
    if cfg.get("report_only"):
        return report_from_finished(cfg, out_dir, preset)
    print(f"== mg-reproduce experiment={cfg.name} → {out_dir} (launcher {cfg.launcher})", flush=True)
    results = Pipeline(cfg).run()
    preset["minutes"] = round((time.perf_counter() - started) / 60, 1)
    report = write_report(out_dir, {(run.router, run.seed): run.directory for run in results.runs},
                          results.summaries, results.stability_file, preset)
    print(f"== done in {preset['minutes']:.1f} min: {report}", flush=True)
    return report


def report_from_finished(cfg: DictConfig, out_dir: Path, preset: dict) -> Path:
    """report_only=true: the report of the stages already finished in out_dir (nothing is run); it
    names the preset's target runs that are missing."""
    from megatron_grouter.errors import UserError
    from megatron_grouter.reproduce.finished import finished_stages, missing_runs
    from megatron_grouter.reproduce.report import write_report

    summaries, runs = finished_stages(out_dir)
    routers, seeds = [str(router) for router in cfg.target.routers], [int(seed) for seed in cfg.seeds]
    runs = {key: path for key, path in runs.items() if key[0] in routers and key[1] in seeds}
    if not runs:
        raise UserError(f"{out_dir} has no finished target run of this preset; run mg-reproduce without "
                        "report_only first")
    preset["missing_runs"] = missing_runs(runs, routers, seeds)
    stability = summaries.get("stability", {}).get("file")
    report = write_report(out_dir, runs, summaries, Path(stability) if stability else None, preset)
    print(f"== report of the finished stages ({len(runs)} target runs, {len(preset['missing_runs'])} missing): "
          f"{report}", flush=True)
    return report


def corpus_description(data) -> str:
    """Which corpus the run used, for the report."""
    if data.get("prefix"):
        return f"the indexed dataset {data.prefix} (tokenizer {data.tokenizer})"
    if data.get("corpus"):
        return f"{data.corpus}, preprocessed into {data.out_dir}"
    limit = f", its first {data.max_documents} documents" if data.get("max_documents") else ""
    return f"the built-in corpus (this interpreter's Python standard library{limit}), preprocessed into {data.out_dir}"


@hydra.main(config_path=str(CONF_DIR / "reproduce"), config_name="config", version_base="1.3")
def hydra_main(cfg: DictConfig) -> None:
    run_app(reproduce, cfg)


def main() -> None:
    hydra_main()


if __name__ == "__main__":
    sys.exit(main())
