"""One run's training: Lightning's Trainer, tracked in MLflow (TrackedRun); the adapter that keeps a small
network's step near a plain loop's; and each epoch's state kept, for a trial cut short."""
