"""The tests' own experiment: what the machinery's tests train, tune, track and register.

It keeps to the machinery's contract (src/tunetrack/machinery/contract.py) as src/tunetrack/experiment does, and
shares nothing with it, so that a user who makes src/tunetrack/experiment theirs, as docs/make-it-yours.md
says, keeps the machinery's tests as they were. scripts/ holds its train.py, tune.py and
predict.py, as thin as the repository's own.
"""
