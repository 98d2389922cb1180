"""The repository's own tools for measuring and picturing it: not needed to train, tune or use
the model. The benchmark behind scripts/benchmark.py, and `mlflow ui` in a real browser for
scripts/screenshots.py and the browser tests."""
