"""The built-in run configs, one YAML file per run; they install as ``unraveled.configs``."""
