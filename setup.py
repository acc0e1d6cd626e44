"""megatron-grouter: preemptive and probabilistic MoE routing for NVIDIA Megatron-Core."""

from setuptools import find_packages, setup

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
    long_description=open("README.md", encoding="utf-8").read() if __import__("os").path.exists("README.md") else "",
    long_description_content_type="text/markdown",
    license="Apache-2.0",
    python_requires=">=3.10",
    packages=find_packages(include=["megatron_grouter", "megatron_grouter.*"]),
    package_data={"megatron_grouter": ["conf/**/*.yaml", "conf/*.yaml", "routing/*.c"]},
    include_package_data=True,
    install_requires=[
        "torch==2.13.0",
        "megatron-core==0.16.1",
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
        # GPU images: Transformer Engine and apex come with NVIDIA's PyTorch container
        # (see Dockerfile); installing them from PyPI needs CUDA and a compiler.
        "gpu": ["transformer-engine[pytorch]", "apex"],
        "test": ["pytest>=8", "datasets"],  # datasets: writes real save_to_disk directories
    },
    entry_points={"console_scripts": CONSOLE_SCRIPTS},
)
