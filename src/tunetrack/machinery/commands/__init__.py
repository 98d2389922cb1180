"""The commands behind scripts/train.py, tune.py and predict.py, each handed its experiment (its
settings' class, and where its Experiment is) by the script: the scripts stay a few lines."""
