# GPU image: NVIDIA's PyTorch container already ships CUDA, NCCL, Transformer Engine and apex.
# Build:  docker build -t megatron-grouter .
# Run:    docker run --gpus all --ipc=host -v $PWD/data:/workspace/megatron-grouter/data \
#           megatron-grouter launch/torchrun.sh model=tiny_qwen3 parallel=ep8_gpu train=gpu
FROM nvcr.io/nvidia/pytorch:25.04-py3

WORKDIR /workspace/megatron-grouter
COPY . .
# The container's torch, TE and apex stay; only megatron-core and the light dependencies are added.
RUN pip install --no-cache-dir --no-deps megatron-core==0.16.1 \
 && pip install --no-cache-dir hydra-core omegaconf tokenizers transformers safetensors tqdm psutil \
      tensorboard wandb scipy scikit-learn matplotlib \
 && pip install --no-cache-dir --no-deps -e .

ENV WANDB_MODE=offline
CMD ["launch/torchrun.sh"]
