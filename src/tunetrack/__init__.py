"""Train, tune and track a PyTorch Lightning model: tunetrack.experiment is what is trained and
searched (yours to edit), tunetrack.machinery runs it (studies, workers, stores, tracking, the
registry) for any experiment that keeps to machinery.contract."""
