"""Imported at start-up by the Python processes the tests launch (tests/ puts this folder on
PYTHONPATH): the tiny synthetic data sets' MD5s replace the official ones as soon as
experiment.data is imported, so the real verification code runs on them unchanged, and no
process imports torch any earlier than it would."""

import importlib.abc
import importlib.machinery
import json
import os
import sys

FILES = json.loads(os.environ.get("EXPERIMENT_TEST_FILES", "{}"))


class _PatchAfterImport(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name != "experiment.data":
            return None
        spec = importlib.machinery.PathFinder.find_spec(name, path)
        run = spec.loader.exec_module

        def exec_module(module):
            run(module)
            for dataset, files in FILES.items():
                module.DATASETS[dataset].files = files

        spec.loader.exec_module = exec_module
        return spec


if FILES:
    sys.meta_path.insert(0, _PatchAfterImport())
