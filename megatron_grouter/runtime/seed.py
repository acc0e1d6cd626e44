"""Seeding: python, numpy, torch and megatron's model-parallel RNG streams."""

from __future__ import annotations

import random

import numpy as np
import torch


def set_seed(seed: int) -> None:
    from megatron.core import tensor_parallel

    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    tensor_parallel.model_parallel_cuda_manual_seed(seed)
