"""The `mind_small` pipeline: `python -m pipelines.mind_small` or `newsrec pipeline run configs/mind_small.yaml`."""
from pathlib import Path

from pipelines.run import main

CONFIG = Path(__file__).resolve().parents[1] / "configs" / "mind_small.yaml"

if __name__ == "__main__":
    main(CONFIG)
