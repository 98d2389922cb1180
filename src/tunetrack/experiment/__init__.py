"""The experiment: what is trained and what a study searches. This folder is yours to edit.

- settings.py  every setting of one run, with its default (each is a flag of the scripts)
- data.py      the data: MNISTDataModule and its kin, and DATASETS, the names --dataset takes
- networks.py  the networks, and NETWORKS, the names --model takes
- model.py     LitClassifier: any of those networks, trained with AdamW under Lightning
- search.py    build() a run's model and data; the search space; one trial's objective
- trainer.py   what the Trainer does around the model: callbacks, clipping (yours to change)

The machinery (src/tunetrack/machinery) never imports this folder: the scripts hand it search.EXPERIMENT.
This file imports nothing, so that the scripts can read the settings before torch starts.
"""
