"""The machinery: it runs any experiment that keeps to contract.py, and never imports one; the
scripts hand it one. Grouped by concern, each group importing only those listed before it:

- contract.py, options.py  what it is handed, and how a command runs (every option, once)
- runtime/    the process and its machine: the garbage collector, signals, the console, memory,
              GPUs, and the files of --import
- data/       a data set's files, its formats, and batches from memory
- tracking/   the stores' addresses, MLflow's runs, the model registry, a folder that moved
- training/   one fit, its speed adapter, and the state kept at each epoch's end
- study/      a study: its storage, its search, its workers and trials, its results
- cli/        the command line: flags, and the checks made before any work starts
- commands/   train, tune and predict, as the scripts run them
"""
