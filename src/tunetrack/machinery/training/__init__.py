"""One run's training: fit() under Lightning, tracked in MLflow; the adapter that keeps a small
network's step near a plain loop's; and each epoch's state kept, for a trial cut short."""
