"""GPT-MoE on DeepSpeed: launcher, model, data tooling."""
from setuptools import find_packages, setup

setup(
    name="gptmoe-toolkit",
    version="0.1.0",
    description="Train GPT Mixture-of-Experts language models on DeepSpeed from positional launch scripts",
    python_requires=">=3.11",
    packages=find_packages(include=["launcher", "launcher.*", "model", "model.*"]),
    install_requires=[
        # Ranges below the next major version, for installing into your own environment; `make setup` installs
        # the versions the suite passed with (constraints.txt). torch is installed first and pinned by
        # `make setup` where none is present; a range here keeps an existing CUDA build on cluster images.
        "torch>=2.1,<3",
        "deepspeed>=0.14,<1",
        "transformers>=4.40,<6",
        "datasets>=2.18,<6",
        "tokenizers>=0.15,<1",
        "safetensors>=0.4,<1",
        "jieba>=0.42,<1",
        # jieba-rs (Rust) for jiebabpe word splitting, ~10x faster; jieba stays the reference and the fallback.
        "rjieba>=0.2.2,<0.3",
        "pyyaml>=6.0,<7",
        "numpy>=1.24,<3",
        "tqdm>=4.60,<5",
        "tensorboard>=2.14,<3",
        # `python -m launcher.serve`: the HTTP service (ASGI app + server).
        "fastapi>=0.110,<1",
        "uvicorn>=0.29,<1",
        # python -m launcher.plot_router and examples/compare.py write PNG figures.
        "matplotlib>=3.7,<4",
    ],
    extras_require={
        "test": ["pytest>=7,<10", "pytest-xdist>=3,<4", "hypothesis>=6,<7"],
        # lm-evaluation-harness and its HF model class (accelerate, peft): scikit-learn, scipy, nltk, sacrebleu
        # and more, so optional; `make setup` installs it, `python -m launcher.evaluate` needs it only for
        # --lm-eval. Its torch range is open: install torch first (as `make setup` does) to keep a CPU build.
        "eval": ["lm-eval[hf]>=0.4.13,<0.5"],
    },
)
