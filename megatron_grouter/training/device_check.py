"""A GPU job refuses to start without a GPU instead of training on CPU over gloo.

train.device=cuda (the GPU presets train=gpu and parallel=ep8_gpu set it) needs a CUDA device
visible to the process: a Slurm job submitted without --gpus-per-node, or a container started
without GPU support, sees none and would otherwise train on CPU, slowly and silently.
train.device=auto (the default) takes CUDA when present, else the CPU.

mg-train checks this on every rank. Launchers also run it once, before starting any rank, so the
refusal is one line rather than one per rank plus torchrun's failure report:

    python -m megatron_grouter.training.device_check [hydra overrides...]   # exit 2: refused
"""

from __future__ import annotations

import os
import sys

from megatron_grouter.errors import UserError

DEVICES = ("auto", "cuda")


def gpu_visibility() -> str:
    """Why this process may see no GPU, in words, for the refusal."""
    import torch

    if torch.version.cuda is None:
        return f"torch {torch.__version__} is a CPU-only build"
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is None:
        return "no CUDA device found, CUDA_VISIBLE_DEVICES unset"
    return f"CUDA_VISIBLE_DEVICES={visible!r}"


def check_device(device: str) -> None:
    """Raise a one-line UserError when `device` (train.device) cannot be honoured here."""
    if device not in DEVICES:
        raise UserError(f"train.device={device!r} is unknown; choose one of {', '.join(DEVICES)}")
    if device == "cuda":
        import torch

        if not torch.cuda.is_available():
            raise UserError(f"train.device=cuda but this process sees no GPU ({gpu_visibility()}); "
                            "request GPUs (sbatch --gpus-per-node=N, apptainer --nv), or train on "
                            "CPU with train.device=auto")


# Hydra's command-line flags that take a value (`--cfg job`); none of them is a config override.
_FLAGS_WITH_VALUE = ("--cfg", "-c", "--package", "-p", "--config-path", "-cp", "--config-name", "-cn",
                     "--config-dir", "-cd", "--experimental-rerun")


def _launch_overrides(arguments: list[str]) -> list[str]:
    """The config overrides among mg-train's arguments (Hydra's own flags and hydra.* settings do
    not change the run's config)."""
    overrides, skip_value = [], False
    for argument in arguments:
        if skip_value:
            skip_value = False
        elif argument.startswith("-"):
            skip_value = argument in _FLAGS_WITH_VALUE
        elif not argument.lstrip("+~").startswith(("hydra.", "hydra/")):
            overrides.append(argument)
    return overrides


def main(arguments: list[str] | None = None) -> int:
    from hydra import compose, initialize_config_dir
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    from megatron_grouter.app import CONF_DIR
    from megatron_grouter.training.config import register_schema, to_train_config

    overrides = _launch_overrides(sys.argv[1:] if arguments is None else arguments)
    try:
        register_schema()
        try:
            with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
                config = compose(config_name="config", overrides=overrides)
        except (HydraException, OmegaConfBaseException) as error:
            raise UserError(f"invalid overrides: {str(error).splitlines()[0]}") from None
        check_device(to_train_config(config).train.device)
    except UserError as error:
        print(f"error: {error}", file=sys.stderr, flush=True)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
