"""The command line: flags made from settings' fields (flags.py), and every check made before
any work starts (checks.py), each error one line that names its flag."""
