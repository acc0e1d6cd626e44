# GPU image: NVIDIA's PyTorch container already ships CUDA, NCCL, torch, Transformer Engine and apex.
# Build:  docker build -t megatron-grouter .
# Run:    docker run --gpus all --ipc=host -v $PWD/data:/workspace/megatron-grouter/data \
#           megatron-grouter launch/torchrun.sh model=tiny_qwen3 parallel=ep8_gpu train=gpu
#
# 26.06 is the base image megatron-core's release branch core_r0.19.0 (0.19.x) is tested on:
# docker/.ngc_version.dev and .gitlab/stages/01.build.yml of NVIDIA/Megatron-LM (commit 64bee49,
# "Update base image to nvcr.io/nvidia/pytorch:26.06-py3"). It has Python 3.12, torch 2.13.0a0 (NVIDIA
# build), Transformer Engine 2.16 and apex, and no megatron-core (docker/ngc-pytorch-26.06-constraints.txt).
FROM nvcr.io/nvidia/pytorch:26.06-py3

ARG MCORE_VERSION=0.19.2
ENV WANDB_MODE=offline

WORKDIR /workspace/megatron-grouter
COPY . .

# The container's torch, TE, apex (and the CUDA libraries, NCCL, numpy, ... they were built with) must
# stay exactly as NVIDIA tested them; a pip resolver that "upgrades" torch would pull a generic wheel
# over them. So everything already installed is frozen into a constraints file taken from the image
# itself (name==version, so the exact NVIDIA local versions, nothing guessed here), on top of the
# image's own /etc/pip/constraint.txt. pip can then only add what is missing (megatron-core, hydra,
# transformers, ...) and stops with a resolution error instead of ever replacing a container package.
# megatron-core is not in the image: it is pinned here (within setup.py's range) for a reproducible
# image; with a base that already has it, the frozen constraint keeps that one (or the build fails
# if it is outside our range). --no-build-isolation: the container's setuptools builds our wheel, so
# no build dependency is downloaded either. Not editable: configs come from the installed package.
RUN python -m pip list --format=freeze > /tmp/container-constraints.txt \
 && python -m pip install --no-cache-dir --no-build-isolation \
      -c /etc/pip/constraint.txt -c /tmp/container-constraints.txt \
      "megatron-core==${MCORE_VERSION}" . \
 && python -c "import megatron.core, megatron_grouter.app as app; assert app.CONF_DIR.is_dir(), app.CONF_DIR" \
 && rm -f /tmp/container-constraints.txt

CMD ["launch/torchrun.sh"]
