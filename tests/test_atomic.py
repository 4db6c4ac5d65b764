"""Crash safety of the simulator's outputs: each file is written atomically and ``summary.json`` last, so a
run that fails or is killed mid-write never leaves a folder that looks complete; rerunning it resumes
(completes the run), and a complete run of the same config is skipped by the CLI."""
from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pandas as pd
import pytest
from hydra import compose, initialize_config_dir

import specbatch.sim.profile
import specbatch.sim.run
from conftest import linear_step, write_formula_profile
from specbatch.sim.cli import completed_summary
from specbatch.sim.run import OUTPUT_FILES, run
from specbatch import conf_dir


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    d = tmp_path_factory.mktemp("atomic")
    profile = write_formula_profile(d / "profile", verify=linear_step(0.01, 0.0005, knee=16),
                                    draft=linear_step(0.001, 0.00002), batches=(1, 2, 4, 8), max_tokens=5,
                                    contexts=(128, 512), prompts=(16, 256, 1024))
    trace = d / "trace.csv"
    trace.write_text("arrival,prompt,output\n" + "".join(f"{i * 0.1},{30 + 11 * i},{3 + i % 9}\n" for i in range(40)))
    overrides = [f"profile={profile}", f"workload.path={trace}",
                 "workload.columns={arrival:arrival,prompt:prompt,output:output}", "workload.time_unit=s",
                 "workload.first_n=null", "workload.load=null", "workload.rate=5", "cluster.max_batch=8",
                 "max_gamma=4", "policy=fixed", "policy.gamma=2", "print_summary=false"]
    with initialize_config_dir(str(conf_dir()), version_base=None):
        cfg = compose("config", overrides=overrides)
        other = compose("config", overrides=overrides + ["policy.gamma=3"])
    return cfg, other, overrides


def assert_complete(out: Path, cfg) -> dict:
    for f in OUTPUT_FILES:
        assert (out / f).is_file(), f
    assert not list(out.glob(".*.tmp"))
    assert len(pd.read_parquet(out / "requests.parquet")) == 40
    summary = json.loads((out / "summary.json").read_text())
    assert summary["completed"] == 40
    assert completed_summary(cfg, str(out)) == summary
    return summary


def assert_incomplete(out: Path, cfg) -> None:
    assert not (out / "summary.json").exists()
    assert completed_summary(cfg, str(out)) is None


@pytest.mark.parametrize("fail_at", ["requests.parquet", "config.yaml", "summary.json"])
def test_failure_while_writing_leaves_no_summary_and_no_temporaries(setup, tmp_path, monkeypatch, fail_at):
    cfg, other, _ = setup
    out = tmp_path / "run"
    run(other, out)  # a complete earlier run (different config) in the same folder
    assert_complete(out, other)

    def failing_replace(src, dst, _real=specbatch.sim.run.os.replace):
        if Path(dst).name == fail_at:
            raise OSError(28, "No space left on device")
        return _real(src, dst)

    monkeypatch.setattr(specbatch.sim.run.os, "replace", failing_replace)
    monkeypatch.setattr(specbatch.sim.profile.os, "replace", failing_replace)
    with pytest.raises(OSError, match="No space left"):
        run(cfg, out)
    # Neither the old run nor the new one may look complete, and no temporary file is left behind.
    assert_incomplete(out, cfg)
    assert completed_summary(other, str(out)) is None
    assert not list(out.glob(".*.tmp"))
    monkeypatch.undo()
    run(cfg, out)  # the rerun resumes: complete outputs of the new config
    assert_complete(out, cfg)


def test_unserialisable_summary_fails_before_anything_is_renamed(setup, tmp_path, monkeypatch):
    cfg, _, _ = setup
    out = tmp_path / "run"
    real = specbatch.sim.run._json

    def bad_json(obj):
        if "throughput_tok_s" in obj:
            raise TypeError("not JSON serialisable: <class 'object'>")
        return real(obj)

    monkeypatch.setattr(specbatch.sim.run, "_json", bad_json)
    with pytest.raises(TypeError):
        run(cfg, out)
    assert_incomplete(out, cfg)


KILLER = textwrap.dedent("""
    import os, signal, sys
    import specbatch.sim.profile, specbatch.sim.run
    kill_at = sys.argv[1]
    real = os.replace

    def replace(src, dst):
        if os.path.basename(dst) == kill_at:  # the temporary is written; die before the rename
            os.kill(os.getpid(), signal.SIGKILL)
        return real(src, dst)

    specbatch.sim.run.os.replace = replace  # the same os module object: patches every atomic write
    from specbatch.sim.cli import main
    sys.argv = ["specbatch-sim", *sys.argv[2:]]
    main()
""")


def test_killed_run_leaves_no_summary_and_the_rerun_resumes(setup, tmp_path):
    """SIGKILL a real `specbatch-sim` process in the middle of writing its outputs."""
    cfg, _, overrides = setup
    out = tmp_path / "killed"
    p = subprocess.run([sys.executable, "-c", KILLER, "summary.json", *overrides, f"hydra.run.dir={out}"],
                       cwd=tmp_path, capture_output=True, text=True, timeout=180)
    assert p.returncode == -9, p.stderr  # killed by SIGKILL
    assert (out / "requests.parquet").is_file() and (out / "config.yaml").is_file()
    assert list(out.glob(".summary.json.*.tmp"))  # the half-done write is only a hidden temporary
    assert_incomplete(out, cfg)  # ... which nobody takes for a complete run
    run(cfg, out)  # rerun in the same folder: completes and removes the stale temporary
    assert_complete(out, cfg)


def test_cli_skips_a_complete_run_and_redoes_an_incomplete_one(setup, tmp_path):
    cfg, _, overrides = setup
    out = tmp_path / "cli"
    args = [sys.executable, "-m", "specbatch.sim.cli", *overrides, f"hydra.run.dir={out}"]
    run(cfg, out)
    before = (out / "requests.parquet").stat().st_mtime_ns
    p = subprocess.run(args, cwd=tmp_path, capture_output=True, text=True, timeout=180)
    assert p.returncode == 0, p.stderr
    assert "complete, same config: skipped" in p.stdout
    assert (out / "requests.parquet").stat().st_mtime_ns == before
    (out / "summary.json").unlink()  # as if killed before the summary landed
    p = subprocess.run(args, cwd=tmp_path, capture_output=True, text=True, timeout=180)
    assert p.returncode == 0, p.stderr
    assert "skipped" not in p.stdout
    assert_complete(out, cfg)


# --- permissions (issue #26, item 12) ------------------------------------------------------------------------


@pytest.mark.parametrize("umask,mode", [(0o022, 0o644), (0o077, 0o600), (0o002, 0o664)])
def test_outputs_honour_the_umask(setup, tmp_path, umask, mode):
    """Every output file gets 0666 & ~umask, as open() would give it (mkstemp alone makes 0600): a run's
    outputs, a profile's files and specbatch-tune's exports."""
    import os

    from specbatch.sim import tune
    from specbatch.sim.profile import atomic_write_text, write_steps

    cfg, _, _ = setup
    old = os.umask(umask)
    try:
        run(cfg, tmp_path / "run")
        write_steps(tmp_path / "profile", [])
        assert tune.main(["--profile", str(cfg.profile), "--max-batch", "8", "--max-gamma", "4",
                          "--out", str(tmp_path / "tune")]) == 0
    finally:
        os.umask(old)
    files = [p for p in tmp_path.rglob("*") if p.is_file()]
    assert len(files) == len(OUTPUT_FILES) + 1 + 3
    for p in files:
        assert p.stat().st_mode & 0o7777 == mode, (p, oct(p.stat().st_mode))
    # rewriting an existing file keeps its mode, as open() would
    target = tmp_path / "run" / "summary.json"
    target.chmod(0o640)
    atomic_write_text(target, "{}\n")
    assert target.stat().st_mode & 0o7777 == 0o640
