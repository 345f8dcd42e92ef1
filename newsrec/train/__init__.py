"""Training: ``fit`` (the ``newsrec train`` stage), batching, checkpoints, tracking, distributed."""
from newsrec.train.loop import FitResult, fit

__all__ = ["FitResult", "fit"]
