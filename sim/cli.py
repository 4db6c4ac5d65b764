"""``specbatch-sim``: the hydra app over ``conf/config.yaml``. Writes a run's outputs into hydra's
output folder and prints the summary table."""
from __future__ import annotations

import sys

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from .metrics import format_summary
from .profile import ProfileError
from .run import ConfigError, run
from .workload import WorkloadError


@hydra.main(config_path="pkg://specbatch.conf", config_name="config", version_base=None)
def main(cfg: DictConfig) -> float:
    out = HydraConfig.get().runtime.output_dir
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
