"""ddjax: Distilled Decoding for image autoregressive models, in JAX/Flax."""

from setuptools import find_packages, setup

INSTALL_REQUIRES = [
    "jax>=0.10.2,<0.11",
    "jaxlib>=0.10.2,<0.11",
    "flax>=0.12.8,<0.13",
    "optax>=0.2.8,<0.3",
    "orbax-checkpoint>=0.12.8,<0.13",
    "chex>=0.1.92,<0.2",
    "ml-collections>=1.1.0,<2",
    "tensorflow-datasets>=4.9.10,<5",
    "clu>=0.0.12,<0.1",
    "numpy>=2.0,<3",
    "scipy>=1.10",
    "scikit-learn>=1.4",
    "matplotlib>=3.8",
    "tensorboardX>=2.6",
    "absl-py>=2.1",
    "safetensors>=0.4",
    "pillow>=10",
]

EXTRAS_REQUIRE = {
    "test": ["pytest>=8", "pytest-xdist>=3.5", "ruff>=0.6", "nbclient>=0.10", "nbformat>=5.9",
             "ipykernel>=6.29"],
    # Reading `.pt` pickles, exporting `.pt` files and the parity tests against PyTorch.
    "torch": ["torch>=2.1"],
    # benchmarks/profile_step.py's per-op table (it writes the trace without it).
    "bench": ["xprof>=2.20"],
}

setup(
    name="ddjax",
    version="0.1.0",
    description="Distilled Decoding (one/two-step sampling of image AR models) in JAX/Flax",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    packages=find_packages(include=["ddjax", "ddjax.*"]),
    package_data={"ddjax": ["assets/*", "assets/**/*"]},
    python_requires=">=3.10",
    install_requires=INSTALL_REQUIRES,
    extras_require=EXTRAS_REQUIRE,
)
