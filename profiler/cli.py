"""``specbatch-profile``: the hydra app that writes cost profiles (see ``conf/profile.yaml``).

Modes: ``profile`` (measure the step grid; also acceptance when prompts are set, and mixed forwards with
``mixed.measure=true``), ``acceptance`` (only the per-position acceptance rates), ``mixed`` (only the mixed
forwards of chunked prefill, added to an existing profile), ``roofline`` (analytical profile for a GPU not at hand).
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import hydra
from omegaconf import DictConfig, OmegaConf


PROFILE_EXTRA = ("torch", "transformers")  # what `pip install 'specbatch[profile]'` adds to the core install


def missing_extra(prog: str, e: BaseException) -> str | None:
    """The one-line error for ``e`` when it is the core install lacking a ``profile`` extra module (torch,
    transformers), else ``None`` (any other missing module is a defect, not the user's setup)."""
    name = getattr(e, "name", None) or ""
    if isinstance(e, ModuleNotFoundError) and name.split(".")[0] in PROFILE_EXTRA:
        return (f"{prog}: error: this command needs {name.split('.')[0]}, which is not installed (the core install "
                "only simulates); install the profiling extra: pip install 'specbatch[profile]'")
    return None


def require_profile_extra(prog: str) -> None:
    """Exit with status 2 and :func:`missing_extra`'s line unless torch and transformers import."""
    try:
        import torch  # noqa: F401
        import transformers  # noqa: F401
    except ModuleNotFoundError as e:
        msg = missing_extra(prog, e)
        if msg is None:
            raise
        print(msg, file=sys.stderr)
        sys.exit(2)


def _conf_dir() -> Path:
    """The shipped ``conf/``: package ``specbatch.conf`` when installed, else the checkout's folder."""
    try:
        from specbatch import conf_dir

        return conf_dir()
    except ModuleNotFoundError:
        return Path(__file__).resolve().parents[1] / "conf"


def _config_path() -> str:
    try:
        import specbatch.conf  # noqa: F401

        return "pkg://specbatch.conf"
    except ModuleNotFoundError:  # a checkout without `pip install`
        return str(_conf_dir())


def grid_of(cfg: DictConfig, device: str):
    """The grid config, resolving ``grid=auto`` to ``grid/gpu.yaml`` or ``grid/cpu.yaml``."""
    from specbatch.profiler.sweep import Grid

    g = cfg.grid
    if g.get("auto"):
        name = "gpu" if device.startswith("cuda") else "cpu"
        path = _conf_dir() / "grid" / f"{name}.yaml"
        return Grid.from_cfg(OmegaConf.load(path), where=str(path))
    return Grid.from_cfg(g, where="grid")


def profile_folder(cfg: DictConfig, device: str, dtype_name: str) -> Path:
    name = cfg.name or f"{cfg.pair.draft}__{cfg.pair.target}-{device.split(':')[0]}-{dtype_name}"
    name = str(name).replace("/", "_")
    return Path(str(cfg.out_dir)) / name


def run_acceptance(cfg: DictConfig, out: Path, device: str, dtype) -> dict:
    """Measure per-position acceptance of the pair and write ``acceptance.csv`` (+ meta.acceptance)."""
    from specbatch.profiler.acceptance import encode, load_tokenizer, measure_acceptance, read_prompts
    from specbatch.profiler.models import load_model
    from specbatch.sim.profile import atomic_write_text, write_acceptance

    a = cfg.acceptance
    prompts = read_prompts(a.prompts, a.prompts_file)
    target, _ = load_model(str(cfg.pair.target), dtype, device, seed=int(cfg.seed))
    draft, _ = load_model(str(cfg.pair.draft), dtype, device, seed=int(cfg.seed) + 1)
    tok = load_tokenizer(str(cfg.pair.target))
    vocab = min(target.config.vocab_size, draft.config.vocab_size)
    ids = [encode(p, tok, vocab) for p in prompts]
    temps = [float(t) for t in a.temperatures]
    if not temps:
        raise ValueError("acceptance.temperatures is empty; expected e.g. [0.0, 1.0]")
    results = []
    for i, temp in enumerate(temps):
        alphas, samples = measure_acceptance(target, draft, ids, int(a.gamma), temp, int(a.max_new_tokens),
                                             seed=int(cfg.seed))
        folder = out if i == 0 else out / "acceptance" / f"T{temp:g}"
        write_acceptance(folder, alphas, samples)
        results.append({"temperature": temp, "file": str((folder / "acceptance.csv").relative_to(out)),
                        "alpha": [round(x, 4) for x in alphas]})
    info = {"dataset": a.dataset or (str(a.prompts_file) if a.prompts_file else "inline prompts"),
            "prompts": len(prompts), "gamma": int(a.gamma), "max_new_tokens": int(a.max_new_tokens),
            "temperature": temps[0], "tokenizer": "checkpoint" if tok is not None else "utf-8 bytes mod vocab",
            "method": "real speculative decoding, per-position conditional acceptance", "runs": results}
    meta_path = out / "meta.json"
    if meta_path.is_file():
        from specbatch.sim.profile import write_profile_meta

        meta = json.loads(meta_path.read_text())
        meta.pop("schema_version", None)
        meta["acceptance"] = info
        write_profile_meta(out, meta)
    else:
        atomic_write_text(out / "acceptance.json", json.dumps(info, indent=2) + "\n")
    return info


def run_roofline(cfg: DictConfig) -> Path:
    from specbatch.profiler.presets import PRESETS, make_config
    from specbatch.profiler.roofline import GPU_SPECS, calibrate, write_analytical_profile

    r = cfg.roofline
    if r.gpu not in GPU_SPECS:
        raise ValueError(f"roofline.gpu={r.gpu!r}; expected one of {sorted(GPU_SPECS)}")
    for role in ("target", "draft"):
        if cfg.pair[role] not in PRESETS:
            raise ValueError(f"pair.{role}={cfg.pair[role]!r}: the roofline needs a preset ({sorted(PRESETS)})")
    grid = grid_of(cfg, "cuda")
    peak, bw, _, aliases = GPU_SPECS[r.gpu]
    dbytes = {"float32": 4, "bfloat16": 2, "float16": 2}[str(r.dtype)]
    calibration = None
    if r.calibrate_on:
        meas = json.loads((Path(str(r.calibrate_on)) / "meta.json").read_text())
        devname = str(meas.get("device", {}).get("name", ""))
        if not any(a.lower() in devname.lower() for a in aliases) and not r.force_calibration:
            raise ValueError(f"roofline.calibrate_on={r.calibrate_on}: measured on {devname!r}, not a {r.gpu} "
                             f"(expected a name containing {aliases}); set roofline.force_calibration=true to use it")
        calibration = calibrate(str(r.calibrate_on), peak_flops=peak, bandwidth=bw, dtype_bytes=dbytes)
        print(f"calibrated on {r.calibrate_on}: eff_compute={calibration['eff_compute']:.3f} "
              f"eff_memory={calibration['eff_memory']:.3f} overhead={calibration['overhead_s'] * 1e3:.2f} ms; "
              f"fit error median {calibration['fit_median_rel_error']:.1%}, max {calibration['fit_max_rel_error']:.1%}")
    name = cfg.name or f"{cfg.pair.draft}__{cfg.pair.target}-{r.gpu}-roofline"
    out = Path(str(cfg.out_dir)) / name
    return write_analytical_profile(out, gpu=str(r.gpu), target_cfg=make_config(cfg.pair.target),
                                    draft_cfg=make_config(cfg.pair.draft), target_name=str(cfg.pair.target),
                                    draft_name=str(cfg.pair.draft), grid=grid, eff_compute=float(r.eff_compute),
                                    eff_memory=float(r.eff_memory), overhead_s=float(r.overhead_s),
                                    dtype=str(r.dtype), memory_reserve_fraction=float(r.memory_reserve_fraction),
                                    calibration=calibration)


def print_sanity(out: Path) -> None:
    """Print the profile's attention, graphs and roofline-ratio block (meta.json) after a sweep."""
    from specbatch.profiler.roofline import format_ratios, launch_bound_warnings

    meta = json.loads((Path(out) / "meta.json").read_text())
    t = meta.get("timing", {})
    att = t.get("attention") or {}
    print(f"attention {att.get('implementation')}, SDPA backends {json.dumps(att.get('backend'))}; "
          f"CUDA graphs {t.get('graphs')}")
    print(format_ratios(meta.get("roofline_ratio") or {}))
    for line in launch_bound_warnings(meta.get("roofline_ratio") or {}):
        print(line, file=sys.stderr)


def run_mixed_mode(cfg: DictConfig, out: Path, device: str) -> None:
    """Time the mixed forwards (``cfg.mixed``, :mod:`specbatch.profiler.mixed`) into the profile ``out``."""
    from specbatch.profiler.mixed import MixedGrid, run_mixed

    if not (out / "steps.csv").is_file():
        raise FileNotFoundError(f"{out}: no profile there (steps.csv); mode=mixed adds mixed forwards to an existing "
                                "profile: set out_dir and name to its folder")
    m = cfg.get("mixed")
    grid = grid_of(cfg, device)
    mgrid = MixedGrid.from_cfg(m, grid)
    passes = int((m.get("passes") if m is not None else None) or cfg.timing.get("passes") or 1)
    anchors = bool(m.get("anchors")) if m is not None else False
    print(f"timing {len(mgrid.points())} mixed points x {passes} passes into {out}/mixed.csv"
          + (" (and the steps the rule reads, alongside)" if anchors else ""), flush=True)
    run_mixed(cfg, out, mgrid, passes, progress=bool(cfg.progress), anchors_of=grid if anchors else None)
    print(f"wrote {out}/mixed.csv; the mixed-iteration rule's error on it: python -m specbatch.fidelity.mixed {out}")


def run(cfg: DictConfig) -> Path:
    """Run the mode ``cfg.mode``; return the profile folder written."""
    if cfg.mode == "roofline":
        out = run_roofline(cfg)
        print(f"wrote analytical profile {out}")
        return out
    if cfg.mode not in ("profile", "acceptance", "mixed"):
        raise ValueError(f"mode={cfg.mode!r}; expected profile, acceptance, mixed or roofline")
    from specbatch.profiler.sweep import resolve_device, resolve_dtype, run_passes

    device = resolve_device(str(cfg.device))
    dtype = resolve_dtype(str(cfg.dtype), device)
    out = profile_folder(cfg, device, str(dtype).replace("torch.", ""))
    if cfg.mode == "profile":
        run_passes(cfg, out_dir=out, grid=grid_of(cfg, device), passes=int(cfg.timing.get("passes") or 1),
                   max_passes=cfg.timing.get("max_passes"), repairs=int(cfg.timing.get("repairs", 3)),
                   progress=bool(cfg.progress))
        print(f"wrote profile {out}")
        print_sanity(out)
    if cfg.mode == "mixed" or (cfg.mode == "profile" and (cfg.get("mixed") or {}).get("measure")):
        run_mixed_mode(cfg, out, device)
    if cfg.mode == "acceptance" or cfg.acceptance.prompts or cfg.acceptance.prompts_file:
        out.mkdir(parents=True, exist_ok=True)
        info = run_acceptance(cfg, out, device, dtype)
        print(f"wrote acceptance to {out}: " + "; ".join(f"T={r['temperature']:g}: {r['alpha']}" for r in info["runs"]))
    return out


@hydra.main(config_path=_config_path(), config_name="profile", version_base=None)
def _main(cfg: DictConfig) -> None:
    try:
        run(cfg)
    except (ValueError, FileNotFoundError, KeyError) as e:
        print(f"specbatch-profile: error: {e}", file=sys.stderr)
        sys.exit(2)
    except ModuleNotFoundError as e:  # the core install (no torch) asked to measure
        msg = missing_extra("specbatch-profile", e)
        if msg is None:
            raise
        print(msg, file=sys.stderr)
        sys.exit(2)


def main() -> None:
    _main()


if __name__ == "__main__":
    main()
