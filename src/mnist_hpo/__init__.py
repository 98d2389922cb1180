"""Train, tune and track a PyTorch Lightning MNIST classifier with Optuna and MLflow."""
