"""Where results are kept: the two stores' addresses, MLflow's runs, the Model Registry and its
champion, and a folder of results that moved."""
