"""The one path from artifacts to scores: history truncation and padding (``histories``), news and
user encoding and candidate scoring (``scoring``), the re-ranker's feature rows (``features``) and
its runtime with two-stage scoring (``rerank``), model artifacts (``model_io``) and the MLflow model
(``pyfunc``)."""
