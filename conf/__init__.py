"""The shipped hydra configs (``specbatch.conf``). Importing this package registers the structured-config
schemas (:mod:`specbatch.sim.config`) in hydra's ConfigStore, which ``config.yaml`` and the workload presets
name in their defaults lists: composing through ``pkg://specbatch.conf`` imports it first."""
from specbatch.sim import config as _config  # noqa: F401  (registers the schemas)
