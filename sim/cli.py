"""``specbatch-sim``: the hydra app over ``conf/config.yaml``. Writes a run's outputs into hydra's
output folder and prints the summary table."""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf

from .metrics import format_summary
from .profile import ProfileError
from .run import ConfigError, run
from .workload import WorkloadError


def completed_summary(cfg: DictConfig, out: str) -> dict | None:
    """The summary of a finished run in ``out`` whose ``config.yaml`` equals this resolved config, else None.

    ``summary.json`` is written last (:mod:`specbatch.sim.run`), so its presence marks complete outputs; rerunning an
    interrupted sweep with the same ``hydra.sweep.dir`` skips such runs. ``SPECBATCH_RERUN=1`` redoes them."""
    if os.environ.get("SPECBATCH_RERUN", "") not in ("", "0"):
        return None
    summary, config = Path(out) / "summary.json", Path(out) / "config.yaml"
    try:
        if config.read_text() != OmegaConf.to_yaml(cfg, resolve=True):
            return None
        return json.loads(summary.read_text())
    except (OSError, ValueError):
        return None


@hydra.main(config_path="pkg://specbatch.conf", config_name="config", version_base=None)
def main(cfg: DictConfig) -> float:
    out = HydraConfig.get().runtime.output_dir
    done = completed_summary(cfg, out)
    if done is not None:  # resuming an interrupted sweep: this run's outputs are complete
        print(f"outputs: {out} (complete, same config: skipped; set SPECBATCH_RERUN=1 to redo)")
        return done["throughput_tok_s"]
    try:
        r = run(cfg, out)
    except (ConfigError, ProfileError, WorkloadError) as e:
        print(f"specbatch-sim: error: {e}", file=sys.stderr)
        sys.exit(2)
    if cfg.print_summary:
        s = r.summary
        print(f"policy={s['policy']}  profile={s['profile']}  workload={s['workload']}  "
              f"rate={s['arrival_rate_req_s']:.4g} req/s  replicas={cfg.cluster.replicas}")
        print(format_summary(s))
        print(f"outputs: {out}")
    return r.summary["throughput_tok_s"]


if __name__ == "__main__":
    main()
