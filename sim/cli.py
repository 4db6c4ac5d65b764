"""``specbatch-sim``: the hydra app over ``conf/config.yaml``. Writes a run's outputs into hydra's
output folder and prints the summary table."""
from __future__ import annotations

import io
import json
import os
import re
import sys
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf

from .config import ConfigError, one_line
from .metrics import format_summary
from .profile import ProfileError
from .run import run
from .workload import WorkloadError


def completed_summary(cfg: DictConfig, out: str) -> dict | None:
    """The summary of a finished run in ``out`` whose ``config.yaml`` equals this resolved config, else None.

    ``summary.json`` is written last (:mod:`specbatch.sim.run`), so its presence marks complete outputs; rerunning an
    interrupted sweep with the same ``hydra.sweep.dir`` skips such runs. ``SPECBATCH_RERUN=1`` redoes them."""
    if os.environ.get("SPECBATCH_RERUN", "") not in ("", "0"):
        return None
    summary, config = Path(out) / "summary.json", Path(out) / "config.yaml"
    try:
        if config.read_text() != OmegaConf.to_yaml(cfg, resolve=True):  # a composed config is already on the schema
            return None
        return json.loads(summary.read_text())
    except (OSError, ValueError):
        return None


class _Held(io.StringIO):
    """Standard error while hydra composes the config: its composition errors (several lines, hydra's own
    words) are held here and replaced by one line (:func:`main`); anything else is passed on once composed."""

    def __init__(self, real):
        super().__init__()
        self.real = real


def _release() -> None:
    if isinstance(sys.stderr, _Held):
        held, sys.stderr = sys.stderr, sys.stderr.real
        sys.stderr.write(held.getvalue())


class ComposedCallback(Callback):
    """Named in ``conf/config.yaml`` (``hydra.callbacks``): the config composed, standard error goes back."""

    def on_run_start(self, config, **kwargs) -> None:
        _release()

    def on_multirun_start(self, config, **kwargs) -> None:
        _release()


def hydra_error(text: str) -> str:
    """Hydra's message for a bad override or config, as one line naming the key."""
    key = re.search(r"full_key: (\S+)", text)
    struct = re.search(r"Key '([^']+)' (?:is not in struct|not in '\w+')", text)
    if struct and key:
        return (f"{key.group(1)} is not a config key (a typo? `specbatch-sim --cfg job` lists the keys; "
                f"+{key.group(1)}=... adds one)")
    return one_line(text)


def main() -> None:
    """``specbatch-sim``: the hydra app, with hydra's composition errors (an unknown key, a group option that
    does not exist, a malformed override) as one line on standard error and exit status 2."""
    held = _Held(sys.stderr)
    sys.stderr = held
    try:
        _main()
    except SystemExit as e:
        if sys.stderr is held:
            sys.stderr = held.real
            text = held.getvalue()
            if e.code not in (0, None) and text.strip():
                print(f"specbatch-sim: error: {hydra_error(text)}", file=sys.stderr)
                sys.exit(2)
            sys.stderr.write(text)
        raise
    finally:
        _release()


@hydra.main(config_path="pkg://specbatch.conf", config_name="config", version_base=None)
def _main(cfg: DictConfig) -> float:
    _release()
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
    for note in r.workload.notes:
        if note.startswith("time_unit="):  # what time_unit=auto (or a Parquet timestamp column) decided
            print(f"specbatch-sim: {note}", file=sys.stderr)
    if cfg.print_summary:
        s = r.summary
        print(f"policy={s['policy']}  profile={s['profile']}  workload={s['workload']}  "
              f"rate={s['arrival_rate_req_s']:.4g} req/s  replicas={cfg.cluster.replicas}")
        print(format_summary(s))
        print(f"outputs: {out}")
    return r.summary["throughput_tok_s"]


if __name__ == "__main__":
    main()
