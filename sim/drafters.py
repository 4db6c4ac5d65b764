"""Drafters: what proposes the draft tokens, what a draft step costs, and how often its tokens are accepted.

Three kinds (``drafter.kind``; the defaults and their sources are in ``conf/drafter/<kind>.yaml``):

``draft_model``
    A small causal LM. A draft step is one ``model=draft`` decode row at (batch, context), run γ times per
    iteration; its KV (``models.draft.kv_bytes_per_token``) is held beside the target's; each admitted prompt
    is prefilled on it (``model=draft`` prefill rows). Acceptance: the ``acceptance`` group, unchanged.
``eagle``
    An EAGLE head on the target's hidden states. A draft step is one ``model=eagle`` decode row (one decoder
    layer at the target's width, the fusion layer and the target's LM head), run γ times per iteration; its
    KV is one layer's (``models.eagle.kv_bytes_per_token``); prompts are prefilled on it (``model=eagle``
    prefill rows). Acceptance: ``drafter.positions`` (per-position α).
``ngram``
    Prompt lookup (vLLM's ``ngram`` method, ``prompt_lookup_min``/``prompt_lookup_max``): no model, no KV,
    no prefill. Each speculative iteration (γ ≥ 1) runs the proposer once for the whole batch, one
    ``model=ngram`` decode row at (batch, context) whatever γ. A sequence's lookup finds a match with
    probability ``drafter.match_rate`` (independently per sequence and iteration); a matched sequence
    proposes γ tokens, an unmatched one none. Acceptance counts only for matched sequences: P(accepted ≥ j)
    = match_rate · Π_{i≤j} α_i (:class:`~specbatch.sim.acceptance.AcceptanceModel` ``match_rate``).

**Charging an ngram iteration** with m of the b sequences matched (m drawn, not expected):
``T = T_ngram(b, c) + T_verify(b, x, c)`` with ``x = γ·m/b`` draft tokens per sequence (the batch's
b·(1 + x) tokens in one verify), T_verify linear in x between the profile's rows at ⌊x⌋ and ⌈x⌉ draft
tokens (:meth:`CostModel.iteration_matched`). The offline tables (quant, the policies) use the expected
step, ``T_ngram(b, c) + T_verify(b, γ·match_rate, c)`` (the same interpolation at the mean; exact when
T_verify is linear in tokens over the rows it spans). The match draw is the acceleration draw itself: a
sequence's one uniform U per iteration matches when ``U < match_rate`` and then accepts
``#{j : U < match_rate·Π_{i≤j} α_i}`` tokens (U/match_rate is uniform given the match), so fast-forward and
stepping read the same draws. ``cluster.draft_sync`` adds nothing for ngram (it has no KV to keep in step).

**The verify's width** depends on how the engine lays out a batch (``cluster.attention``, :func:`charged_matched`).
``paged`` (the default; vLLM V1): the verify forward is ragged, each sequence contributing its own 1 + k tokens
to one flattened batch (``num_scheduled_tokens`` per request, the rejection sampler's ``cu_num_draft_tokens``),
so the step costs the tokens proposed, ``x = γ·m/b`` above. ``padded`` (a rectangular batch, as the fidelity
engine runs it: attention padded to the longest sequence): every row verifies 1 + the most any row proposed,
so an iteration where any sequence matched is charged as if all had (``x = γ``), one where none did as a
decode (``x = 0``); the proposer runs in both.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

from .profile import Profile, ProfileError

DRAFTER_KINDS = ("draft_model", "eagle", "ngram")
#: The steps.csv ``model`` whose rows price each kind's draft step and prefill.
ROWS = {"draft_model": "draft", "eagle": "eagle", "ngram": "ngram"}


@dataclass(frozen=True)
class Drafter:
    """One drafter kind and its acceptance settings (see the module docstring).

    ``positions``: per-position acceptance rates of its proposals (``None``: the ``acceptance`` group's);
    ``match_rate``: probability that a sequence's proposer finds something to propose in an iteration (1 for
    the model-based kinds); ``prompt_lookup_min``/``prompt_lookup_max``: the n-gram window (ngram only)."""

    kind: str = "draft_model"
    positions: tuple[float, ...] | None = None
    match_rate: float = 1.0
    prompt_lookup_min: int | None = None
    prompt_lookup_max: int | None = None

    def __post_init__(self) -> None:
        if self.kind not in DRAFTER_KINDS:
            raise ValueError(f"drafter.kind is {self.kind!r}; expected one of {list(DRAFTER_KINDS)}")
        if self.positions is not None:
            pos = tuple(float(a) for a in self.positions)
            if not pos or any(not (0 <= a <= 1) or math.isnan(a) for a in pos):
                raise ValueError(f"drafter.positions is {list(self.positions)!r}; expected a non-empty list of "
                                 "probabilities in [0, 1] or null")
            object.__setattr__(self, "positions", pos)
        if isinstance(self.match_rate, bool) or not isinstance(self.match_rate, (int, float)) \
                or not 0 < self.match_rate <= 1:
            raise ValueError(f"drafter.match_rate is {self.match_rate!r}; expected a probability in (0, 1]")
        object.__setattr__(self, "match_rate", float(self.match_rate))
        if self.kind != "ngram" and self.match_rate != 1.0:
            raise ValueError(f"drafter.match_rate is {self.match_rate}; only drafter.kind=ngram proposes partially "
                             "(expected 1.0)")
        lo, hi = self.prompt_lookup_min, self.prompt_lookup_max
        for key, v in (("prompt_lookup_min", lo), ("prompt_lookup_max", hi)):
            if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < 1):
                raise ValueError(f"drafter.{key} is {v!r}; expected an integer ≥ 1 or null")
        if lo is not None and hi is not None and lo > hi:
            raise ValueError(f"drafter.prompt_lookup_min ({lo}) is above drafter.prompt_lookup_max ({hi})")

    @property
    def rows(self) -> str:
        """The steps.csv ``model`` whose decode (and prefill) rows price this drafter."""
        return ROWS[self.kind]

    @property
    def per_token(self) -> bool:
        """True: γ draft steps per iteration (a model stepping one token per call); False: one proposer call
        per speculative iteration whatever γ (ngram)."""
        return self.kind != "ngram"

    @property
    def prefill(self) -> bool:
        """Whether an admitted prompt is also prefilled on the drafter (its own prefill rows)."""
        return self.kind != "ngram"

    @property
    def partial(self) -> bool:
        """Whether a sequence may propose nothing in an iteration (ngram): then the step is charged for the
        tokens actually proposed (:meth:`CostModel.iteration_matched`)."""
        return self.kind == "ngram"

    def kv_bytes_per_token(self, profile: Profile) -> int:
        """Bytes of KV one token of context occupies in the drafter (0 for ngram)."""
        if self.kind == "ngram":
            return 0
        return profile.kv_bytes_per_token(self.rows)

    def check_profile(self, profile: Profile) -> None:
        """A :class:`ProfileError` in one line naming the profile folder and what this drafter misses in it."""
        if self.kind == "draft_model":
            return
        m = self.rows
        missing = []
        if not isinstance(profile.meta["models"].get(m), dict):
            missing.append(f"models.{m} in meta.json")
        s = profile.ok_steps
        if not ((s["model"] == m) & (s["phase"] == "decode") & (s["tokens"] == 1)).any():
            missing.append(f"ok model={m} phase=decode tokens=1 rows in steps.csv")
        if self.prefill and not ((s["model"] == m) & (s["phase"] == "prefill") & (s["batch"] == 1)).any():
            missing.append(f"ok model={m} phase=prefill batch=1 rows in steps.csv")
        if missing:
            raise ProfileError(f"{profile.path}: drafter={self.kind} needs {' and '.join(missing)}; this profile has "
                               f"none (profile the {self.kind} drafter, or use drafter=draft_model)")

    def describe(self) -> dict:
        return {"kind": self.kind, "positions": list(self.positions) if self.positions is not None else None,
                "match_rate": self.match_rate, "prompt_lookup_min": self.prompt_lookup_min,
                "prompt_lookup_max": self.prompt_lookup_max}


DRAFT_MODEL = Drafter()


def charged_matched(matched: int, batch: int, padded: bool) -> int:
    """Sequences an iteration of a partial proposer is charged as having proposed γ tokens when ``matched`` of
    its ``batch`` did (:meth:`CostModel.iteration_matched`'s ``matched``): ``matched`` itself for a ragged verify
    (paged), the whole batch under ``padded`` when any matched (every row is padded to the longest proposal)."""
    return batch if padded and matched else matched


def drafter_defaults(kind: str) -> dict:
    """The keys of ``conf/drafter/<kind>.yaml`` (the documented defaults of that kind) as a plain dict."""
    from omegaconf import OmegaConf

    from specbatch import conf_dir

    if kind not in DRAFTER_KINDS:
        raise ValueError(f"drafter kind {kind!r}; expected one of {list(DRAFTER_KINDS)}")
    return OmegaConf.to_container(OmegaConf.load(conf_dir() / "drafter" / f"{kind}.yaml"), resolve=True)


def make_drafter(kind: str = "draft_model", **overrides) -> Drafter:
    """A :class:`Drafter` of ``kind`` with its documented defaults (``conf/drafter/<kind>.yaml``), keys in
    ``overrides`` replacing them."""
    params = {k: v for k, v in drafter_defaults(kind).items() if k != "kind"}
    params.update(overrides)
    if params.get("positions") is not None:
        params["positions"] = tuple(params["positions"])
    return Drafter(kind=kind, **params)
