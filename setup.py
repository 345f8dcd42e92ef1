from pathlib import Path

from setuptools import find_packages, setup

setup(
    name="newsrec",
    version="0.1.0",
    description="Fastformer news recommendation on MIND: ingest, train, evaluate, submit, score, serve",
    long_description=Path(__file__).with_name("README.md").read_text(encoding="utf-8"),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=find_packages(include=["newsrec", "newsrec.*", "pipelines", "pipelines.*"]),
    package_data={"newsrec.serve": ["static/*.html"]},  # the page `newsrec serve` answers at GET /
    # torch is pinned by the install path (Makefile: torch==2.13.0, the CPU build); a range here
    # lets GPU users keep the CUDA build they already have.
    install_requires=[
        "torch>=2.3",
        "numpy>=1.24",
        "pandas>=2.0",
        "polars>=1.0",
        "pyarrow>=14",
        "scikit-learn>=1.3",
        "faiss-cpu>=1.8",
        "mlflow>=2.12",
        "click>=8.1",
        "pyyaml>=6",
        "tqdm>=4.66",
        "safetensors>=0.4",
    ],
    extras_require={
        "gpu": ["faiss-gpu-cu12>=1.8"],
        "serve": ["fastapi>=0.110", "uvicorn>=0.29", "httpx>=0.27", "prometheus-client>=0.20"],
        # model.text_encoder=plm: a pretrained language model's token states (newsrec.data.plm)
        "plm": ["transformers>=4.40"],
        # selenium drives the system's chromium + chromedriver in tests/test_web_page.py
        "dev": ["pytest>=8", "hypothesis>=6.100", "httpx>=0.27", "matplotlib>=3.8", "selenium>=4.20"],
    },
    entry_points={"console_scripts": ["newsrec=newsrec.cli:main"]},
)
