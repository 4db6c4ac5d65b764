"""Step-time predictor: turns a measured (or analytical) profile into step times in seconds.

Grid semantics
--------------
For each (model, phase) the profile's ``ok`` rows form a grid over (tokens, batch, context). Inside the
grid times are interpolated linearly in each axis (trilinear). Outside it:

* **batch or tokens above the largest measured value** and **context above the longest measured
  context**: linear extrapolation from the last two grid points of that axis, never below the value at
  the grid edge (so a noisy last segment cannot make a bigger step cheaper);
* **below the smallest measured value** (only context can be; batch and tokens start at 1): the edge
  value is used (flat), since shorter contexts are never slower in practice.

Extrapolation issues a single :class:`ExtrapolationWarning` per cost model, naming the axis and range.

A hole in the grid (a (tokens, batch, context) point with no ``ok`` row) is filled by linear interpolation
along an axis on which measured points lie on both sides of it. A hole at the edge of every axis (e.g.
target decode at the smallest batch and context) cannot be interpolated, and copying the nearest point
would be a guess (a γ = 0 decode copied from the γ = 1 verify costs twice too much): loading such a profile
is a :class:`ProfileError` naming the point. Points recorded as ``oom`` bound the grid: they are not
holes, they mark where the device ran out of memory (filled from their neighbours, flat beyond the last
measured point), and the simulator's KV-cache limit keeps it from going there.

Target step rows: ``phase=decode, tokens=1`` (γ = 0) and ``phase=verify, tokens=γ+1`` are one surface
(verify with γ+1 new tokens per sequence). Draft decode rows: ``phase=decode, tokens=1``.
Prefill rows: ``phase=prefill``, ``tokens`` = prompt length, ``context`` = 0; the batch-1 rows give the
per-request prefill time, and rows at two or more batch sizes a (batch, tokens) grid for prefilling several
prompts in one forward (:meth:`CostModel.prefill_batch`), interpolated and extrapolated like the step grids.
"""
from __future__ import annotations

import bisect
import copy
import warnings

import numpy as np
import pandas as pd
from scipy.interpolate import RegularGridInterpolator

from .drafters import DRAFT_MODEL, Drafter
from .profile import Profile, ProfileError, check_monotone


class ExtrapolationWarning(UserWarning):
    """A step time was asked for outside the measured grid (emitted once per cost model)."""


def _describe_point(what: str, axes: list[str], vals: list[int]) -> str:
    """A grid point as ``model=…, phase=…, batch=…, tokens=… (γ=…), context=…`` for an error message."""
    model, kind = what.split(" ", 1)
    d = dict(zip(axes, vals))
    phase = kind if kind != "verify" else ("decode" if d.get("tokens") == 1 else "verify")
    parts = [f"model={model}", f"phase={phase}"]
    for a in ("batch", "tokens", "context"):
        if a in d:
            parts.append(f"{a}={d[a]}" + (f" (γ={d[a] - 1})" if a == "tokens" and kind == "verify" else ""))
    return ", ".join(parts)


def _grid(df: pd.DataFrame, axes: list[str], what: str, path,
          others: pd.DataFrame | None = None) -> tuple[list[np.ndarray], np.ndarray]:
    """Arrange ``median_s`` of the ``ok`` rows ``df`` over the given axes as a dense array and fill its holes.

    A hole (a point of the grid with no ok row) must lie between measured points on at least one axis: it
    is then interpolated linearly along such an axis. A hole at the edge of every axis would have to be
    copied from one side (a guess that can be far off: a γ = 0 decode copied from the γ = 1 verify costs
    twice too much), so it is a :class:`ProfileError` naming the point — unless ``others`` (the same
    selection's non-ok rows) records it as ``oom``: such points bound the grid (the KV-cache limit keeps
    the simulator away from them) and are filled from their neighbours as before."""
    values = [np.sort(df[a].unique()) for a in axes]
    table = df.pivot_table(index=axes[:-1], columns=axes[-1], values="median_s", aggfunc="median")
    full_index = pd.MultiIndex.from_product(values[:-1], names=axes[:-1]) if len(axes) > 2 else pd.Index(values[0], name=axes[0])
    table = table.reindex(index=full_index, columns=values[-1])
    # np.array copies: to_numpy() may hand back a read-only view (pandas copy-on-write), and holes are filled in place.
    arr = np.array(table.to_numpy(dtype=float), dtype=float).reshape([len(v) for v in values])
    if not np.isnan(arr).any():
        return [v.astype(float) for v in values], arr
    status: dict[tuple, str] = {}
    if others is not None:
        for key, st in zip(others[axes].itertuples(index=False, name=None), others["status"]):
            if st == "oom" or key not in status:
                status[tuple(int(k) for k in key)] = st
    measured = ~np.isnan(arr)
    # A hole is bracketed along an axis when measured points lie on both sides of it on that axis.
    bracketed = []
    for ax in range(arr.ndim):
        before = np.maximum.accumulate(measured, axis=ax)
        after = np.flip(np.maximum.accumulate(np.flip(measured, ax), axis=ax), ax)
        bracketed.append(before & after & ~measured)
    inside = np.logical_or.reduce(bracketed)
    for h in np.argwhere(~measured & ~inside):
        point = [int(values[k][j]) for k, j in enumerate(h)]
        st = status.get(tuple(point))
        if st == "oom":
            continue
        recorded = f"recorded as status={st}" if st else "missing"
        raise ProfileError(f"{path}/steps.csv: {what} grid point {_describe_point(what, axes, point)} is {recorded} "
                           f"and has no measured neighbour on both sides of it along any axis ({', '.join(axes)}), so it "
                           "cannot be interpolated (copying the nearest point would be a guess); measure it, or "
                           "record it as status=oom if it ran out of memory")
    # Interior holes first, each interpolated along an axis with measured points on both sides of it.
    for ax in range(arr.ndim):
        moved = np.moveaxis(arr, ax, -1)
        todo = np.moveaxis(bracketed[ax] & np.isnan(arr), ax, -1)
        src = np.moveaxis(measured, ax, -1)
        x = values[ax].astype(float)
        for idx in zip(*np.nonzero(todo.any(axis=-1))):
            row, ok = moved[idx], src[idx]
            fill = todo[idx]
            row[fill] = np.interp(x[fill], x[ok], row[ok])
    if np.isnan(arr).any():
        # What is left are oom points at the grid's edge: filled from the same axis (flat beyond the last
        # measured point), as they bound the grid and are never reached.
        for ax in range(arr.ndim):
            moved = np.moveaxis(arr, ax, -1)
            flat = moved.reshape(-1, moved.shape[-1])
            x = values[ax].astype(float)
            for row in flat:
                ok = ~np.isnan(row)
                if ok.sum() >= 2 and not ok.all():
                    row[~ok] = np.interp(x[~ok], x[ok], row[ok])
            arr = np.moveaxis(flat.reshape(moved.shape), -1, ax)
        if np.isnan(arr).any():
            holes = np.argwhere(np.isnan(arr))
            shown = "; ".join(", ".join(f"{a}={int(values[k][j])}" for k, (a, j) in enumerate(zip(axes, h)))
                              for h in holes[:3])
            raise ProfileError(f"{path}/steps.csv: {what} grid over {axes} has {len(holes)} missing point(s) with no "
                               f"measured neighbour on any axis to fill from (e.g. {shown}); measure a complete grid")
    return [v.astype(float) for v in values], arr


class CostModel:
    """Step times (seconds) for draft decode, target verify and prefill, from a :class:`Profile`.

    ``max_batch`` and ``max_gamma`` size the precomputed tables used on the simulator's hot path;
    any (batch ≤ max_batch, γ ≤ max_gamma) costs one Python-level interpolation in context.

    ``draft_sync``: a γ = 0 iteration also runs one draft decode step (batch, context), as vLLM does to
    keep its drafter's KV cache in step when speculation is off for an iteration; ``False`` (default):
    γ = 0 is a plain target decode. See :meth:`with_draft_sync`.
    """

    def __init__(self, profile: Profile, max_batch: int = 256, max_gamma: int = 8, drafter: Drafter | None = None):
        self.profile = profile
        self.drafter = drafter = DRAFT_MODEL if drafter is None else drafter
        drafter.check_profile(profile)
        dm = drafter.rows  # the steps.csv model pricing the draft step and the draft prefill
        self.max_batch = int(max_batch)
        self.max_gamma = int(max_gamma)
        self.warned = False  # True once this model has issued its (single) extrapolation warning
        self.draft_sync = False
        steps = profile.ok_steps
        path = profile.path
        tgt = steps[(steps["model"] == "target") & steps["phase"].isin(["decode", "verify"])]
        tgt = tgt.drop_duplicates(["batch", "tokens", "context"], keep="last")
        drf = steps[(steps["model"] == dm) & (steps["phase"] == "decode") & (steps["tokens"] == 1)]
        if tgt.empty or (tgt["tokens"] == 1).sum() == 0:
            raise ProfileError(f"{path}/steps.csv: no ok target decode rows (model=target, phase=decode, tokens=1)")
        if drf.empty:
            raise ProfileError(f"{path}/steps.csv: no ok draft decode rows (model={dm}, phase=decode, tokens=1)")
        self._check_oom_only(profile)
        check_monotone(profile)
        bad = profile.steps[profile.steps["status"] != "ok"]
        self.verify_axes, self.verify_grid = _grid(
            tgt, ["tokens", "batch", "context"], "target verify", path,
            bad[(bad["model"] == "target") & bad["phase"].isin(["decode", "verify"])])
        self.draft_axes, draft_grid = _grid(
            drf, ["batch", "context"], f"{dm} decode", path,
            bad[(bad["model"] == dm) & (bad["phase"] == "decode") & (bad["tokens"] == 1)])
        self.draft_grid = draft_grid
        self.contexts = self.verify_axes[2]

        # Hot-path tables: [γ][b] -> times at the union of context grid points, then 1-D interpolation.
        ctx = np.union1d(self.verify_axes[2], self.draft_axes[1])
        self._ctx = ctx
        self._ctx_list = ctx.tolist()
        b = np.arange(1, self.max_batch + 1, dtype=float)
        toks = np.arange(1, self.max_gamma + 2, dtype=float)
        vt = self._eval3(self.verify_axes, self.verify_grid, toks, b, ctx)  # (γ+1, b, ctx)
        dt = self._eval2(self.draft_axes, self.draft_grid, b, ctx)  # (b, ctx)
        self._verify_tab = [[vt[g, i].tolist() for i in range(len(b))] for g in range(len(toks))]
        self._draft_tab = [dt[i].tolist() for i in range(len(b))]
        # Whole iterations, γ·T_draft + T_verify at each context grid point (interpolation is linear, so
        # interpolating the sum is the sum of the interpolations inside the grid).
        if drafter.per_token:
            self._iter_tab = [[(vt[g, i] + g * dt[i]).tolist() for i in range(len(b))] for g in range(len(toks))]
        else:
            self._iter_tab = self._proposer_iter_tab(vt, dt)
        # "draft" names the drafter's rows (model=draft, eagle; none for ngram, which prefills nothing)
        rows = {"target": "target", "draft": dm if drafter.prefill else None}
        self._prefill = {m: r and self._prefill_curve(steps, r) for m, r in rows.items()}
        self._prefill_grid = {m: r and self._prefill_surface(steps, r) for m, r in rows.items()}
        self._check_ranges()

    # -- drafters that propose once per iteration, possibly nothing (ngram; sim/drafters.py) ----------------

    def _proposer_iter_tab(self, vt: np.ndarray, dt: np.ndarray) -> list:
        """Expected iteration times [γ][b][context point] of a once-per-iteration, partial proposer: γ = 0 a
        target decode; γ ≥ 1 one proposer call T_d(b, c) plus T_verify at γ·match_rate draft tokens per
        sequence (linear between the verify rows at ⌊x⌋ and ⌈x⌉ draft tokens)."""
        p = self.drafter.match_rate
        out = [vt[0].tolist()]
        for g in range(1, vt.shape[0]):
            x = g * p
            i = int(np.floor(x))
            f = x - i
            v = vt[i] if f == 0.0 else vt[i] + (vt[i + 1] - vt[i]) * f
            out.append((v + dt).tolist())
        return out

    def iteration_matched(self, batch: int, gamma: int, matched: int, context: float) -> float:
        """Seconds of one iteration of a partial proposer (ngram) at γ ≥ 1 in which ``matched`` of the
        ``batch`` sequences proposed γ tokens and the others none: one proposer call T_d(b, c) plus
        T_verify(b, x, c) at x = γ·matched/batch draft tokens per sequence, linear in x between the verify rows
        at ⌊x⌋ and ⌈x⌉ draft tokens (sim/drafters.py). Used by the simulator for every such step."""
        self._check_query(batch, gamma)
        b = batch - 1
        x = gamma * matched / batch
        i = int(x)
        v = self._interp_ctx(self._verify_tab[i][b], context)
        if x != i:
            v = v + (self._interp_ctx(self._verify_tab[i + 1][b], context) - v) * (x - i)
        return self._interp_ctx(self._draft_tab[b], context) + v

    # -- construction helpers ---------------------------------------------------------------------------

    @staticmethod
    def _check_oom_only(profile: Profile) -> None:
        """A batch size with no ``ok`` row while a larger one has some is an inconsistent profile."""
        s = profile.steps[profile.steps["phase"] != "prefill"]
        for (model, phase), g in s.groupby(["model", "phase"]):
            ok_by_batch = g.groupby("batch")["status"].apply(lambda st: (st == "ok").any())
            bad = [b for b in ok_by_batch.index if not ok_by_batch[b] and ok_by_batch[ok_by_batch.index > b].any()]
            if bad:
                raise ProfileError(f"{profile.path}/steps.csv: model={model} phase={phase} has only oom/error rows "
                                   f"at batch {bad[0]} but ok rows at larger batches; remeasure that batch")

    def _prefill_curve(self, steps: pd.DataFrame, model: str) -> tuple | None:
        rows = steps[(steps["model"] == model) & (steps["phase"] == "prefill") & (steps["batch"] == 1)]
        if rows.empty:
            return None
        rows = rows.groupby("tokens")["median_s"].median().sort_index()
        x, y = rows.index.to_numpy(dtype=float), rows.to_numpy(dtype=float)
        return x, y, x.tolist(), y.tolist()

    def _prefill_surface(self, steps: pd.DataFrame, model: str) -> tuple | None:
        """(batches, lengths, seconds[batch][length]) as lists, from the prefill rows when they cover two or
        more batch sizes and prompt lengths; else None."""
        rows = steps[(steps["model"] == model) & (steps["phase"] == "prefill")]
        if rows["batch"].nunique() < 2 or rows["tokens"].nunique() < 2:
            return None
        bad = self.profile.steps[self.profile.steps["status"] != "ok"]
        axes, grid = _grid(rows, ["batch", "tokens"], f"{model} prefill", self.profile.path,
                           bad[(bad["model"] == model) & (bad["phase"] == "prefill")])
        return axes[0].tolist(), axes[1].tolist(), grid.tolist()

    def _check_ranges(self) -> None:
        notes = []
        if self.max_batch > self.verify_axes[1][-1] or self.max_batch > self.draft_axes[0][-1]:
            notes.append(f"batch up to {self.max_batch} (measured up to {int(min(self.verify_axes[1][-1], self.draft_axes[0][-1]))})")
        if self.max_gamma + 1 > self.verify_axes[0][-1]:
            notes.append(f"verify tokens up to {self.max_gamma + 1} (measured up to {int(self.verify_axes[0][-1])})")
        self._range_notes = notes

    def _warn(self, what: str, *args) -> None:
        """Warn once per cost model about extrapolating ``what % args`` (formatted only for that one warning:
        queries beyond the grid call this on the hot path)."""
        if not self.warned:
            self.warned = True
            what = what % args if args else what
            warnings.warn(f"profile {self.profile.name}: extrapolating beyond the measured grid ({what}); "
                          "see sim.cost_model for the rule", ExtrapolationWarning, stacklevel=3)

    @staticmethod
    def _edge_guard(axis_vals: np.ndarray, q: np.ndarray) -> np.ndarray:
        """Clamp queries below the grid to its first point (flat extrapolation downwards)."""
        return np.maximum(q, axis_vals[0])

    def _eval3(self, axes, grid, t, b, c) -> np.ndarray:
        f = RegularGridInterpolator(axes, grid, bounds_error=False, fill_value=None)
        T, B, C = np.meshgrid(t, b, c, indexing="ij")
        pts = np.stack([self._edge_guard(axes[0], T), self._edge_guard(axes[1], B), self._edge_guard(axes[2], C)], -1)
        out = f(pts.reshape(-1, 3)).reshape(T.shape)
        edge = f(np.stack([np.minimum(pts[..., i], axes[i][-1]) for i in range(3)], -1).reshape(-1, 3)).reshape(T.shape)
        return np.maximum(out, edge)

    def _eval2(self, axes, grid, b, c) -> np.ndarray:
        f = RegularGridInterpolator(axes, grid, bounds_error=False, fill_value=None)
        B, C = np.meshgrid(b, c, indexing="ij")
        pts = np.stack([self._edge_guard(axes[0], B), self._edge_guard(axes[1], C)], -1)
        out = f(pts.reshape(-1, 2)).reshape(B.shape)
        edge = f(np.stack([np.minimum(pts[..., i], axes[i][-1]) for i in range(2)], -1).reshape(-1, 2)).reshape(B.shape)
        return np.maximum(out, edge)

    # -- queries (hot path) -----------------------------------------------------------------------------

    @staticmethod
    def _lerp(ctx: list[float], row: list[float], m: int, x):
        """``row`` interpolated on the segment between context grid points m-1 and m at ``x`` (a float or an
        array; extended linearly beyond). The one formula every query uses, so the scalar and vectorised
        paths agree bit for bit."""
        c0, y0 = ctx[m - 1], row[m - 1]
        return y0 + (row[m] - y0) * (x - c0) / (ctx[m] - c0)

    def _one_segment(self, lo: float, hi: float) -> int:
        """``m`` when contexts ``lo`` ≤ … ≤ ``hi`` all lie in the grid segment (point m-1, point m], which
        :meth:`_interp_ctx` would pick for each of them; else 0."""
        ctx = self._ctx_list
        m = bisect.bisect_left(ctx, hi)
        return m if 0 < m < len(ctx) and lo > ctx[m - 1] else 0

    def _interp_ctx(self, row: list[float], context: float) -> float:
        ctx = self._ctx_list
        if context <= ctx[0]:
            return row[0]
        i = bisect.bisect_left(ctx, context)
        if i >= len(ctx):
            if len(ctx) == 1:
                return row[-1]
            self._warn("context %.0f > %.0f tokens", context, ctx[-1])
            return max(row[-1], self._lerp(ctx, row, len(ctx) - 1, context))
        return self._lerp(ctx, row, i, context)

    def _check_query(self, batch: int, gamma: int) -> None:
        if batch < 1 or batch > self.max_batch:
            raise ValueError(f"batch {batch} outside 1..{self.max_batch} (the cost model's max_batch)")
        if gamma < 0 or gamma > self.max_gamma:
            raise ValueError(f"gamma {gamma} outside 0..{self.max_gamma} (the cost model's max_gamma)")
        if self._range_notes and not self.warned:
            bmax = min(self.verify_axes[1][-1], self.draft_axes[0][-1])
            if batch > bmax or gamma + 1 > self.verify_axes[0][-1]:
                self._warn("; ".join(self._range_notes))

    def draft_decode(self, batch: int, context: float) -> float:
        """Seconds for one draft decode step: ``batch`` sequences, one new token each, ``context`` tokens of KV."""
        self._check_query(batch, 0)
        return self._interp_ctx(self._draft_tab[batch - 1], context)

    def target_verify(self, batch: int, gamma: int, context: float) -> float:
        """Seconds for one target step scoring γ+1 new tokens per sequence (γ = 0: plain decode)."""
        self._check_query(batch, gamma)
        return self._interp_ctx(self._verify_tab[gamma][batch - 1], context)

    def iteration(self, batch: int, gamma: int, context: float) -> float:
        """Seconds for one speculative iteration: γ draft decodes plus one target verify of γ+1 tokens
        (γ = 0: a target decode, plus one draft decode with ``draft_sync``). Beyond the longest measured
        context the total is extrapolated (never below its value at the edge)."""
        self._check_query(batch, gamma)
        return self._interp_ctx(self._iter_tab[gamma][batch - 1], context)

    def iteration_list(self, batch: int, gamma: int, contexts: list[float]) -> list[float]:
        """:meth:`iteration` for a short ascending list of mean contexts (tokens) at one (batch, γ), as a list
        equal to it bit for bit (one query check; one segment lookup when all lie inside one grid segment,
        the common case). A subclass that changes :meth:`iteration` must change this the same way."""
        self._check_query(batch, gamma)
        row, ctx, lerp = self._iter_tab[gamma][batch - 1], self._ctx_list, self._lerp
        m = self._one_segment(contexts[0], contexts[-1])
        if m:
            return [lerp(ctx, row, m, x) for x in contexts]
        interp = self._interp_ctx
        return [interp(row, x) for x in contexts]

    def iteration_many(self, batch: int, gamma: int, contexts: np.ndarray) -> np.ndarray:
        """:meth:`iteration` for an ascending array of mean contexts (tokens) at one (batch, γ), equal to it
        bit for bit (the simulator relies on it). A subclass that changes :meth:`iteration` must change
        this the same way."""
        self._check_query(batch, gamma)
        row, ctx = self._iter_tab[gamma][batch - 1], self._ctx_list
        if len(ctx) == 1:
            return np.full(len(contexts), row[0])
        m = self._one_segment(float(contexts[0]), float(contexts[-1]))
        if m:  # all inside one segment: the common case
            return self._lerp(ctx, row, m, contexts)
        out = np.empty(len(contexts))
        # cuts[m] = how many contexts are ≤ grid point m; segment m (between points m-1 and m) is one _lerp.
        cuts = np.searchsorted(contexts, self._ctx, side="right").tolist()
        out[:cuts[0]] = row[0]
        for m in range(1, len(ctx)):
            a, z = cuts[m - 1], cuts[m]
            if z > a:
                out[a:z] = self._lerp(ctx, row, m, contexts[a:z])
        a = cuts[-1]
        if a < len(contexts):
            self._warn("context %.0f > %.0f tokens", contexts[-1], ctx[-1])
            out[a:] = np.maximum(row[-1], self._lerp(ctx, row, len(ctx) - 1, contexts[a:]))
        return out

    def prefill(self, prompt_tokens: float, model: str = "target") -> float:
        """Seconds to prefill one prompt of ``prompt_tokens`` tokens on ``model`` (batch 1).

        Linear in prompt length between measured lengths and beyond the longest (last segment's slope);
        below the shortest measured prompt, the shortest's time (flat).
        """
        curve = self._prefill[model]
        if curve is None:
            raise ProfileError(f"{self.profile.path}/steps.csv: no ok prefill rows for model={model} at batch 1")
        x, y = curve[2], curve[3]  # Python lists: this runs once per admitted request
        if prompt_tokens <= x[0]:
            return y[0]
        if len(x) == 1:
            return y[0] * prompt_tokens / x[0]
        if prompt_tokens <= x[-1]:
            i = bisect.bisect_left(x, prompt_tokens)
            return y[i - 1] + (y[i] - y[i - 1]) * (prompt_tokens - x[i - 1]) / (x[i] - x[i - 1])
        self._warn("prefill of %.0f > %.0f tokens", prompt_tokens, x[-1])
        slope = (y[-1] - y[-2]) / (x[-1] - x[-2])
        return y[-1] + max(slope, 0.0) * (prompt_tokens - x[-1])

    def has_prefill_batches(self, model: str = "target") -> bool:
        """Whether the profile times prefill at two or more batch sizes (and prompt lengths) for ``model``."""
        return self._prefill_grid[model] is not None

    def prefill_batch(self, prompts, model: str = "target", attention: str = "paged") -> float:
        """Seconds to prefill ``prompts`` (their lengths, tokens) together, one forward of batch
        ``len(prompts)`` on ``model``: the profile's prefill at (that batch, one length per sequence) — the
        prompts' mean length under ``attention="paged"`` (each sequence attends over its own tokens), their
        longest under ``"padded"`` (every prompt padded to it). Bilinear in (batch, length) inside the grid;
        beyond the largest batch or length, linear from the last two points of that axis, never below the
        grid's edge; below the shortest length, flat. One prompt: :meth:`prefill`."""
        if len(prompts) == 1:
            return self.prefill(prompts[0], model)
        surface = self._prefill_grid[model]
        if surface is None:
            raise ProfileError(f"{self.profile.path}/steps.csv: prefill of several prompts in one forward needs "
                               f"ok prefill rows for model={model} at two or more batch sizes and prompt lengths "
                               "(grid.prefill_batches when profiling)")
        xs, ys, z = surface
        b = float(len(prompts))
        n = float(max(prompts)) if attention == "padded" else sum(prompts) / len(prompts)
        if b > xs[-1] or n > ys[-1]:
            self._warn("prefill of %d prompts of %.0f tokens (measured up to %d x %.0f)", int(b), n, xs[-1], ys[-1])

        def at(b: float, n: float) -> float:
            i = min(max(bisect.bisect_left(xs, b), 1), len(xs) - 1)
            j = min(max(bisect.bisect_left(ys, n), 1), len(ys) - 1)
            u = (b - xs[i - 1]) / (xs[i] - xs[i - 1])
            v = (max(n, ys[0]) - ys[j - 1]) / (ys[j] - ys[j - 1])
            lo = z[i - 1][j - 1] + (z[i - 1][j] - z[i - 1][j - 1]) * v
            hi = z[i][j - 1] + (z[i][j] - z[i][j - 1]) * v
            return lo + (hi - lo) * u

        return max(at(b, n), at(min(b, xs[-1]), min(n, ys[-1])))

    def with_draft_sync(self) -> "CostModel":
        """A copy whose γ = 0 iterations cost a target decode plus one draft decode (``draft_sync``); every
        other query is unchanged. Subclasses (extra terms) are copied with their terms."""
        if self.draft_sync:
            return self
        out = copy.copy(self)
        out.draft_sync = True
        out._iter_tab = list(self._iter_tab)
        out._iter_tab[0] = [[v + d for v, d in zip(vrow, drow)]
                            for vrow, drow in zip(self._verify_tab[0], self._draft_tab)]
        return out

    def has_prefill(self, model: str = "target") -> bool:
        return self._prefill[model] is not None

    # -- mixed iterations (cluster.prefill=chunked) ---------------------------------------------------------

    def mixed_rule(self, model: str = "target") -> dict:
        """The parameters of the mixed-iteration rule (:meth:`mixed_iteration`) for ``model``, from the
        profile's batch-1 prefill rows: ``fixed_s`` = F, the prefill curve's value at zero tokens — the
        straight line through the two shortest measured prompts, extended to 0 and clamped to
        [0, T_prefill(shortest)] — i.e. the part of a forward that does not grow with its tokens (weights
        streamed, launches); ``lengths``/``seconds``: the curve P(n) the rule reads, the point (0, F) and then
        the measured (prompt length, seconds) pairs. A profile with fewer than two prefill lengths for
        ``model`` is a :class:`ProfileError` naming the file and the rows missing."""
        rule = getattr(self, "_mixed", {}).get(model)
        if rule is not None:
            return rule
        curve = self._prefill[model]
        if curve is None or len(curve[2]) < 2:
            have = "none" if curve is None else f"only length {int(curve[2][0])}"
            raise ProfileError(f"{self.profile.path}/steps.csv: cluster.prefill=chunked prices a prompt chunk from "
                               f"the prefill curve and needs ok rows model={model}, phase=prefill, batch=1 at two or "
                               f"more prompt lengths ({have} measured); profile more prefill lengths, or use "
                               "cluster.prefill=sequential")
        x, y = curve[2], curve[3]
        fixed = y[0] - x[0] * (y[1] - y[0]) / (x[1] - x[0])
        fixed = min(max(fixed, 0.0), y[0])
        rule = {"model": model, "fixed_s": fixed, "lengths": [0.0] + list(x), "seconds": [fixed] + list(y)}
        if not hasattr(self, "_mixed"):
            self._mixed = {}
        self._mixed[model] = rule
        return rule

    def prefill_curve_at(self, tokens: float, model: str = "target") -> float:
        """P(n): the mixed rule's prefill curve (:meth:`mixed_rule`) at ``tokens`` ≥ 0, seconds: linear between
        its points, and beyond the longest measured prompt along the last segment (slope ≥ 0)."""
        rule = self.mixed_rule(model)
        x, y = rule["lengths"], rule["seconds"]
        if tokens <= x[-1]:
            i = max(bisect.bisect_left(x, tokens), 1)
            return y[i - 1] + (y[i] - y[i - 1]) * (tokens - x[i - 1]) / (x[i] - x[i - 1])
        self._warn("prefill of %.0f > %.0f tokens", tokens, x[-1])
        return y[-1] + max((y[-1] - y[-2]) / (x[-1] - x[-2]), 0.0) * (tokens - x[-1])

    def chunk_seconds(self, chunks, model: str = "target") -> float:
        """Σ over ``chunks`` = [(prefix, tokens), ...] of P(prefix + tokens) − P(prefix) (never below 0): what
        prefilling each chunk adds to a forward that is paid for anyway. A chunk at prefix p attends over
        p + tokens positions; the difference of the curve charges its linear layers and that attention.
        Chunks that make up a whole prompt of N tokens sum to P(N) − F (the sum telescopes)."""
        known = self._chunk_known(model)
        total = 0.0
        for chunk in chunks:
            s = known.get(chunk)
            if s is None:  # (chunks repeat: whole short prompts; the cost model computes each once)
                prefix, tokens = chunk
                s = known[chunk] = max(self.prefill_curve_at(prefix + tokens, model)
                                       - self.prefill_curve_at(prefix, model), 0.0)
            total += s
        return total

    def _chunk_known(self, model: str) -> dict:
        """(prefix, tokens) -> seconds of chunks priced so far for ``model`` (a cache)."""
        caches = self.__dict__.setdefault("_chunk_cache", {})
        known = caches.get(model)
        if known is None:
            known = caches[model] = {}
        return known

    def mixed_iteration(self, batch: int, gamma: int, context: float, chunks, draft: bool = True) -> tuple[float, float]:
        """One forward that verifies the running batch and prefills prompt chunks (chunked prefill, vLLM V1 /
        SGLang). Returns ``(extra_s, step_s)``: ``step_s`` = :meth:`iteration` (b, γ, c) (0 when ``batch`` is 0),
        ``extra_s`` what the chunks add; the iteration takes ``extra_s + step_s`` seconds.

        The composition rule, per model m (the target; the draft too when ``draft``):

            extra_m = F_m + Σ_chunks [P_m(p + n) − P_m(p)] − min(F_m, S_m)

        with P_m and F_m from :meth:`mixed_rule`, and S_m the part of the iteration that model m runs anyway:
        the target's verify T_verify(b, γ, c); the draft's one decode step T_draft(b, c) when it runs (γ ≥ 1,
        or γ = 0 under draft_sync), else 0. Assumptions: (1) a forward costs a fixed part F (weights streamed
        once, launches) plus terms that grow with its tokens, so the chunks' tokens add their growth terms
        (linear layers in proportion to their tokens, attention over their own prefix) and the fixed part is
        paid once, by the decode/verify part, which is charged at its own context c as before; (2) the parts
        add: near the memory/compute knee, where a forward's time is the larger of the two rather than
        their sum, the rule errs by up to min(F, S) in either direction; (3) prefill rows at batch 1 describe
        a chunk (several chunks in one forward add up). With no running batch the iteration is a prefill-only
        forward of the chunks, F + Σ ΔP. A profile's measured mixed forwards (``mixed.csv``) show how far the
        rule is off on its device: ``python -m specbatch.fidelity.mixed <profile>`` (``meta.json``
        ``mixed_check``); the rule does not read them."""
        step = self.iteration(batch, gamma, context) if batch else 0.0
        if not chunks:
            return 0.0, step
        fixed, floor = self._mixed_fixed("target")
        # min(F, S): S is never below the smallest value in the step tables (floor), so F ≤ floor means F
        if not batch:
            shared = 0.0
        elif fixed <= floor:
            shared = fixed
        else:
            shared = min(fixed, self.target_verify(batch, gamma, context))
        extra = fixed + self.chunk_seconds(chunks, "target") - shared
        if draft:
            fixed, floor = self._mixed_fixed("draft")
            if not (batch and (gamma or self.draft_sync)):
                shared = 0.0
            elif fixed <= floor:
                shared = fixed
            else:
                shared = min(fixed, self.draft_decode(batch, context))
            extra += fixed + self.chunk_seconds(chunks, "draft") - shared
        return extra, step

    def _mixed_fixed(self, model: str) -> tuple[float, float]:
        """(F of ``model``'s mixed rule, the smallest step time its tables hold: target verify or draft decode)."""
        fast = self.__dict__.setdefault("_mixed_fast", {})
        got = fast.get(model)
        if got is None:
            tab = self._verify_tab if model == "target" else [self._draft_tab]
            floor = min(min(min(row) for row in rows) for rows in tab)
            got = fast[model] = (self.mixed_rule(model)["fixed_s"], floor)
        return got

    # -- vectorised views (for tables and the quantitative model) ------------------------------------------

    def iteration_table(self, context, batches: np.ndarray | None = None) -> np.ndarray:
        """Array [γ, j] of iteration times (seconds) for γ = 0..max_gamma and the j-th of ``batches``
        (default b = 1..max_batch), at ``context`` (tokens): one number, or one per batch size."""
        batches = np.arange(1, self.max_batch + 1) if batches is None else np.asarray(batches)
        contexts = np.broadcast_to(np.asarray(context, float), batches.shape)
        out = np.empty((self.max_gamma + 1, len(batches)))
        for g in range(self.max_gamma + 1):
            for j, (b, c) in enumerate(zip(batches, contexts)):
                out[g, j] = self.iteration(int(b), g, float(c))
        return out
