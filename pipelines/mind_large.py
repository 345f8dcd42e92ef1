"""The `mind_large` pipeline: `python -m pipelines.mind_large` or `newsrec pipeline run configs/mind_large.yaml`."""
from pathlib import Path

from pipelines.run import main

CONFIG = Path(__file__).resolve().parents[1] / "configs" / "mind_large.yaml"

if __name__ == "__main__":
    main(CONFIG)
