"""Search flows: the ANN index of a store (`xmodal build-index`). The search service itself
(`xmodal serve-search`) is no flow: it lives in projection/search/ and imports neither prefect nor mlflow."""
