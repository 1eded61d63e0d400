"""Packaging for dinfill.

torch is a *range* on purpose: the CI machines install the CPU build of 2.13 first and the lent
GPU machines carry 2.11; a bare ``torch`` requirement would pull a multi-GB CUDA build instead.
"""

from setuptools import find_packages, setup

setup(
    name="dinfill",
    version="0.1.0",
    description="Fast code infilling with masked-diffusion and autoregressive FIM language models",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=find_packages(include=["dinfill", "dinfill.*"]),
    install_requires=[
        "torch>=2.4",
        "triton>=3.0; platform_system == 'Linux'",
        "transformers>=4.46",
        "safetensors>=0.4",
        "huggingface_hub>=0.24",
        "tqdm>=4.60",
        "numpy>=1.24",
        "pyarrow>=14",
        # the execution sandbox: libseccomp's filter compiler (ctypes; libseccomp2 ships with Debian and Ubuntu)
        # and Landlock for the weaker isolation; both pure Python
        "pyseccomp>=0.1.2; platform_system == 'Linux'",
        "landlockpy>=0.2; platform_system == 'Linux'",
    ],
    extras_require={
        "dev": ["pytest>=8", "pytest-benchmark>=4", "ruff>=0.6", "matplotlib>=3.7", "nvtx>=0.2"],
        "gpu": ["flash-attn>=2.5", "nvtx>=0.2"],
        "plot": ["matplotlib>=3.7"],
    },
    entry_points={"console_scripts": ["dinfill=dinfill.cli:main"]},
)
