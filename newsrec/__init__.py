"""newsrec: Fastformer news recommendation on MIND — ingest, train, evaluate, submit, score, serve."""

__version__ = "0.1.0"
