"""The machinery: flags, stores, tracking, studies, workers, the model registry, speed and
reports, for any experiment that keeps to machinery.contract. It never imports an experiment;
the scripts hand it one."""
