"""The `demo` pipeline: `python -m pipelines.demo` or `newsrec pipeline run configs/demo.yaml`."""
from pathlib import Path

from pipelines.run import main

CONFIG = Path(__file__).resolve().parents[1] / "configs" / "demo.yaml"

if __name__ == "__main__":
    main(CONFIG)
