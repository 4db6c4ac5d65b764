"""The shipped launcher configs (conf/hydra/launcher) compose with their plugins."""
from __future__ import annotations

import importlib.util
import os

import pytest


def _need(module: str, extra: str):
    if importlib.util.find_spec(module) is None:
        msg = f"{module} is not installed (pip install 'specbatch[{extra}]')"
        if os.environ.get("CI") == "true":
            pytest.fail(msg)
        pytest.skip(msg)


def launcher_cfg(name: str) -> dict:
    from hydra import compose, initialize_config_module
    from omegaconf import OmegaConf

    with initialize_config_module("specbatch.conf", version_base=None):
        cfg = compose("config", overrides=[f"hydra/launcher={name}"], return_hydra_config=True)
    return OmegaConf.to_container(cfg.hydra.launcher, resolve=False)


def test_local_joblib_config():
    c = launcher_cfg("local")
    assert c["_target_"].endswith("JoblibLauncher") and c["n_jobs"] == -1


def test_slurm_config():
    _need("hydra_plugins.hydra_submitit_launcher", "slurm")
    c = launcher_cfg("slurm")
    assert c["_target_"].endswith("SlurmLauncher")
    assert c["cpus_per_task"] == 1 and c["timeout_min"] == 60


@pytest.mark.parametrize("name", ["ray_local", "ray_cluster"])
def test_ray_configs(name):
    _need("hydra_plugins.hydra_ray_launcher", "ray")
    c = launcher_cfg(name)
    assert c["_target_"].endswith("RayLauncher")
    assert c["ray"]["remote"]["num_cpus"] == 1
    assert c["ray"]["init"]["address"] == ("local" if name == "ray_local" else "${oc.env:RAY_ADDRESS,auto}")
