"""specbatch: profile speculative-decoding step costs once, then simulate serving clusters with them.

This package holds the project's data (``specbatch.conf`` is the repository's ``conf/`` folder and
``specbatch.traces`` its ``traces/`` folder, mapped in ``pyproject.toml``) and the helpers that find it,
whether specbatch runs from a checkout or from a plain ``pip install .``.
"""
from __future__ import annotations

from importlib import resources
from pathlib import Path

__version__ = "0.1.0"


def conf_dir() -> Path:
    """Folder of the shipped hydra configs."""
    return Path(str(resources.files("specbatch.conf")))


def traces_dir() -> Path:
    """Folder of the shipped traces and cost profiles."""
    return Path(str(resources.files("specbatch.traces")))


def profiles_dir() -> Path:
    """Folder of the shipped cost profiles (``traces/profiles``)."""
    return traces_dir() / "profiles"
