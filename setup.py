"""megatron-grouter: preemptive and probabilistic MoE routing for NVIDIA Megatron-Core."""

from pathlib import Path

from setuptools import find_packages, setup

README = Path(__file__).resolve().parent / "README.md"

CONSOLE_SCRIPTS = [
    "mg-train=megatron_grouter.train:main",
    "mg-preprocess=megatron_grouter.offline.preprocess:main",
    "mg-predispatch=megatron_grouter.offline.predispatch:main",
    "mg-plan-ep=megatron_grouter.offline.plan_ep:main",
    "mg-distill=megatron_grouter.offline.distill:main",
    "mg-affinity=megatron_grouter.offline.convert_cli:affinity_main",
    "mg-fold=megatron_grouter.offline.convert_cli:fold_main",
    "mg-expand=megatron_grouter.offline.convert_cli:expand_main",
    "mg-tune=megatron_grouter.offline.convert_cli:tune_main",
    "mg-reproduce=megatron_grouter.reproduce.cli:main",
    "mg-export=megatron_grouter.offline.export_hf:main",
    "mg-import-grouter=megatron_grouter.offline.import_grouter:main",
]

setup(
    name="megatron-grouter",
    version="0.1.0",
    description="Preemptive (Grouter) and probabilistic (ProbMoE) routing for Megatron-Core MoE",
    long_description=README.read_text(encoding="utf-8") if README.is_file() else "",
    long_description_content_type="text/markdown",
    license="Apache-2.0",
    python_requires=">=3.11",
    packages=find_packages(include=["megatron_grouter", "megatron_grouter.*"]),
    # The Hydra configs (every app's config dir, see megatron_grouter/app.py) and the C source of the
    # routing kernel (compiled at first use) are package data. `**` is a recursive glob (setuptools
    # >= 62.3, pyproject.toml's build-system): it also matches conf/config.yaml itself.
    package_data={"megatron_grouter": ["conf/**/*.yaml", "routing/*.c"]},
    install_requires=[
        # Ranges, never pins: a library must not replace the torch / megatron-core a user (or
        # NVIDIA's container) already has. torch>=2.6 is megatron-core 0.16.1's own floor; no upper
        # bound on torch. megatron-core: tested with 0.16.1 (Python 3.11) and 0.19.2 (Python 3.12).
        "torch>=2.6",
        "megatron-core>=0.16.1,<0.20",
        "hydra-core>=1.3,<1.4",
        "omegaconf>=2.3",
        "numpy",
        "tokenizers>=0.20",
        "pyarrow",  # corpora: parquet, Arrow and datasets directories
        "zstandard",  # corpora: .zst
        "transformers>=4.56",
        "safetensors>=0.4",
        "tqdm",
        "psutil",
        "tensorboard",
        "wandb",
        "scipy",
        "scikit-learn",
        "matplotlib",
    ],
    extras_require={
        # Optional: Transformer Engine (and NVIDIA apex) come with NVIDIA's PyTorch container (see
        # Dockerfile); installing TE from PyPI needs CUDA and a compiler. NVIDIA apex is not on
        # PyPI (the PyPI package named "apex" is unrelated): build it from github.com/NVIDIA/apex.
        "gpu": ["transformer-engine[pytorch]"],
        "test": ["pytest>=8", "datasets"],  # datasets: writes real save_to_disk directories
    },
    entry_points={"console_scripts": CONSOLE_SCRIPTS},
)
