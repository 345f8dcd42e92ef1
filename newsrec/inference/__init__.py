"""The one path from artifacts to scores: padding of histories and candidates, the re-ranker's
feature rows (``features``) and its runtime (``rerank``)."""
