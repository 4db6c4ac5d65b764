"""One packed forward of a running batch's verify tokens and prompt chunks, as vLLM V1 runs chunked prefill.

The forward's input is every new token of the iteration flattened into one sequence (batch 1): first the
verify rows' γ+1 tokens each (row-major), then each prompt chunk's tokens. Each token carries its own position
id (its sequence's cached length plus its offset), so the rotary embeddings are the per-sequence ones; the
linear layers (projections, MLP, LM head) run once over all tokens; attention runs per part over that part's
own cached prefix:

* the verify rows together, one SDPA over (rows, γ+1 queries, the longest row's span): the causal mask is
  lower-right aligned (query i of row r sees the row's cached positions and its own first i+1 new ones),
  given as a boolean mask when the rows' cached lengths differ (padded to the longest, as the fidelity
  engine's steps run);
* each chunk alone, its k queries over its sequence's ``prefix`` cached positions plus its own k tokens
  (``is_causal`` with no prefix, lower-right otherwise).

No rectangular padding joins the chunk and the verify rows (that would charge rows × chunk tokens). The plan
(:class:`PackedPlan`) reaches the attention function as the forward's ``packed`` keyword (transformers passes
a model's extra keywords down to its attention function): :func:`specbatch.profiler.attention.engine_attention`
hands such a call to :func:`packed_attention`. The cache (:class:`PackedLayer`, or any layer calling
:func:`write_packed`) writes each token's K/V at (its row, its position) and returns the whole buffers.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch.nn.attention.bias import causal_lower_right

from specbatch.profiler import models as M


@dataclass(frozen=True)
class Chunk:
    """A prompt chunk: ``tokens`` new tokens of the sequence in cache row ``row``, after ``prefix`` cached ones."""

    row: int
    prefix: int
    tokens: int


@dataclass
class PackedPlan:
    """What one packed forward computes: ``verify_rows`` rows (cache rows 0..verify_rows-1) of ``verify_tokens``
    new tokens each after ``lengths[r]`` cached positions, then ``chunks`` in order. ``rows``/``positions``
    (one per token of the packed input) are where each token's K/V goes."""

    verify_rows: int
    verify_tokens: int
    lengths: torch.Tensor  # (verify_rows,) cached positions per verify row
    chunks: list[Chunk]
    rows: torch.Tensor
    positions: torch.Tensor

    @classmethod
    def build(cls, lengths: torch.Tensor, verify_tokens: int, chunks: list[Chunk], device) -> "PackedPlan":
        b = int(lengths.shape[0])
        lengths = lengths.to(device)
        offs = torch.arange(verify_tokens, device=device)
        rows = [torch.arange(b, device=device).repeat_interleave(verify_tokens)]
        pos = [(lengths[:, None] + offs[None, :]).reshape(-1)]
        for c in chunks:
            rows.append(torch.full((c.tokens,), c.row, device=device, dtype=torch.long))
            pos.append(torch.arange(c.prefix, c.prefix + c.tokens, device=device))
        return cls(b, int(verify_tokens) if b else 0, lengths, list(chunks), torch.cat(rows), torch.cat(pos))

    @property
    def total_tokens(self) -> int:
        return int(self.rows.shape[0])

    def logit_positions(self) -> torch.Tensor:
        """Indices into the packed input whose logits are read: every verify token, then each chunk's last."""
        v = self.verify_rows * self.verify_tokens
        ends, at = [], v
        for c in self.chunks:
            at += c.tokens
            ends.append(at - 1)
        return torch.cat([torch.arange(v), torch.tensor(ends, dtype=torch.long)]).to(self.rows.device)


def write_packed(kbuf: torch.Tensor, vbuf: torch.Tensor, plan: PackedPlan, key_states, value_states) -> None:
    """Write the packed K/V (1, kv_heads, T, d) of each token at (its row, its position) of the buffers
    (rows, kv_heads, positions, d)."""
    kbuf[plan.rows, :, plan.positions] = key_states[0].transpose(0, 1)
    vbuf[plan.rows, :, plan.positions] = value_states[0].transpose(0, 1)


class PackedLayer(M.PreallocLayer):
    """A pre-allocated KV layer of independent rows (sequences) for packed forwards: ``plan`` (shared by the
    layers of one cache, :func:`set_plan`) says where each new token goes; ``update`` returns the whole buffers."""

    def __init__(self, max_len: int, holder: dict):
        super().__init__(max_len)
        self.holder = holder

    def update(self, key_states, value_states, *args, **kwargs):
        write_packed(self.kbuf, self.vbuf, self.holder["plan"], key_states, value_states)
        return self.kbuf, self.vbuf


def packed_cache(cfg, rows: int, max_len: int, dtype, device, fill: bool = True):
    """A transformers ``Cache`` of :class:`PackedLayer` s: ``rows`` sequences × ``max_len`` positions; the
    plan of the next forward goes in ``cache.plan_holder["plan"]``."""
    from transformers.cache_utils import Cache

    layers, kv_heads, head_dim = M.kv_shape(cfg)
    holder: dict = {"plan": None}
    cache = Cache(layers=[PackedLayer(max_len, holder) for _ in range(layers)])
    for layer in cache.layers:
        layer.allocate(rows, kv_heads, head_dim, dtype, device, fill=fill)
    cache.plan_holder = holder
    return cache


def _sdpa(query, key, value, mask, is_causal: bool, scaling):
    """SDPA of (n, heads, q, d) over (n, kv_heads, kv, d), reading shared K/V heads as attention.engine_attention does."""
    from specbatch.profiler.attention import expand_kv, gqa_plan

    plan = gqa_plan(query, key, value, is_causal, mask is not None)
    if plan == "expand":
        groups = query.shape[1] // key.shape[1]
        key, value = expand_kv(key, groups), expand_kv(value, groups)
    return F.scaled_dot_product_attention(query, key, value, attn_mask=mask, is_causal=is_causal, scale=scaling,
                                          enable_gqa=plan == "native")


def verify_mask(lengths: torch.Tensor, tokens: int, span: int) -> torch.Tensor:
    """Boolean (b, 1, tokens, span) mask: query q of row i sees positions ≤ lengths[i] + q."""
    j = torch.arange(span, device=lengths.device)
    q = torch.arange(tokens, device=lengths.device)
    return (j[None, None, :] <= (lengths[:, None, None] + q[None, :, None]))[:, None]


def packed_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, plan: PackedPlan, scaling):
    """Attention of a packed forward: ``query`` (1, heads, T, d) of the packed tokens, ``key``/``value`` the
    whole buffers (rows, kv_heads, positions, d) after the new tokens were written. Returns (1, T, heads, d)."""
    _, heads, _, d = query.shape
    outs, at = [], 0
    b, q = plan.verify_rows, plan.verify_tokens
    if b:
        qv = query[0, :, :b * q].reshape(heads, b, q, d).transpose(0, 1)
        lo, hi = int(plan.lengths.min()), int(plan.lengths.max())
        span = hi + q
        # equal lengths: the lower-right causal mask shared by all rows (as the profiler's verify steps)
        mask = (causal_lower_right(q, span) if q > 1 else None) if lo == hi else verify_mask(plan.lengths, q, span)
        out = _sdpa(qv, key[:b, :, :span], value[:b, :, :span], mask, False, scaling)
        outs.append(out.transpose(1, 2).reshape(1, b * q, heads, d))
        at = b * q
    for c in plan.chunks:
        span = c.prefix + c.tokens
        qc = query[:, :, at:at + c.tokens]
        kc, vc = key[c.row:c.row + 1, :, :span], value[c.row:c.row + 1, :, :span]
        mask = None if c.prefix == 0 or c.tokens == 1 else causal_lower_right(c.tokens, span)
        outs.append(_sdpa(qc, kc, vc, mask, c.prefix == 0 and c.tokens > 1, scaling).transpose(1, 2))
        at += c.tokens
    return torch.cat(outs, 1).contiguous()


@torch.inference_mode()
def packed_forward(model, cache, ids: torch.Tensor, plan: PackedPlan, holder: dict | None = None,
                   hidden: bool = False):
    """One packed forward of ``ids`` (T,) under ``plan`` on ``cache``; returns the logits (float) at
    :meth:`PackedPlan.logit_positions` (n, vocab), or with ``hidden`` the decoder's last hidden states
    (T, width) and those logits. ``holder``: the dict the cache's layers read the plan from (default
    ``cache.plan_holder``). The model must run attention :data:`specbatch.profiler.attention.NAME`."""
    holder = cache.plan_holder if holder is None else holder
    holder["plan"] = plan
    try:
        keep = plan.logit_positions()
        if hidden:
            h = M.forward(model.get_decoder(), cache, input_ids=ids[None], position_ids=plan.positions[None],
                          use_cache=True, packed=plan).last_hidden_state[0]
            return model.get_output_embeddings()(h[keep]).float(), h
        out = M.forward(model, cache, input_ids=ids[None], position_ids=plan.positions[None], use_cache=True,
                        logits_to_keep=keep, packed=plan)
        return out.logits[0].float()
    finally:
        holder["plan"] = None
