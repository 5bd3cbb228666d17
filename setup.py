"""didr_jax: reinforcement-learning post-training of text-to-image diffusion models in JAX/Flax."""

from setuptools import find_packages, setup

setup(
    name="didr_jax",
    version="0.1.0",
    description=("DDPO, CRD, DIDR and TDM-R1 as pure, jit-compiled, mesh-sharded JAX losses with "
                 "SDXL and Z-Image backbones in Flax NNX"),
    packages=find_packages(include=["didr_jax", "didr_jax.*"]),
    package_data={"didr_jax": ["toy/assets/*", "toy/assets/**/*"]},
    python_requires=">=3.11",
    install_requires=[
        "jax>=0.10",
        "flax>=0.12.8",
        "optax>=0.2.5",
        "orbax-checkpoint>=0.11",
        "ml_collections>=1.0",
        "clu>=0.0.12",
        # clu's metric writers import these without declaring them.
        "tensorflow-cpu>=2.18",
        "tensorboard>=2.18",
        "absl-py",
        "numpy",
        "ml_dtypes",
        "pillow",
        "matplotlib",
        "safetensors",
        # configs, tokenizers and checkpoint layouts (their PyTorch models are used only in tests).
        "transformers>=5.0",
        "diffusers>=0.36",
    ],
    extras_require={
        # PyTorch for conversion parity and the benchmarks' peers; 2.13.0 is the CPU wheel.
        "torch": ["torch==2.13.0"],
        "test": ["torch==2.13.0", "pytest>=8", "pytest-xdist>=3", "peft>=0.17"],  # peft: diffusers' LoRA loading
    },
)
