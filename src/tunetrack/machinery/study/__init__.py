"""A study: its Optuna storage and records, how it searches (samplers, pruners, the space), its
workers and their trials, its results and figures, and a run's settings read back to train again."""
