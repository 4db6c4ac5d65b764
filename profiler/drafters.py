"""Drafters other than a draft model: an EAGLE-style head and n-gram (prompt-lookup) proposals.

**EAGLE head** (:class:`EagleHead`). EAGLE drafts with a small head on top of the target: the target's last
hidden state and the embedding of the token it produced are concatenated and fused by one linear layer
(2·hidden → hidden), then one decoder layer and the vocabulary LM head predict the next token; the head's own
output hidden state feeds its next step. The head here is built from the **target's** transformers config
with random weights (as every profiler preset): one Llama-style decoder layer with the target's hidden size,
attention heads, K/V heads, head dimension and MLP width (an OPT target's ``ffn_dim``), the fusion
``Linear(2·hidden, hidden, bias=True)`` (EAGLE-1's ``fc``), a final RMSNorm and an LM head over the
target's vocabulary, plus an embedding table (in EAGLE the embedding and the LM head are the target's, shared).
It runs the project's attention (``specbatch_sdpa`` by default) over the profiler's pre-allocated KV cache, one
layer deep, so its KV bytes per token are one target layer's (:func:`eagle_kv_bytes_per_token`).

**N-gram proposals** (:func:`ngram_propose`): prompt lookup as vLLM's ``ngram`` method does it: for n from
``prompt_lookup_max`` down to ``prompt_lookup_min``, look for the sequence's last n tokens earlier in the
sequence; at the first (earliest) earlier occurrence of the longest n that has one, propose the tokens that
followed it (at most k, fewer where the sequence ends first); no occurrence for any n: no proposal. Plain
numpy on the CPU (vLLM's proposer runs numpy/numba on the CPU too); the fidelity engine uses the same function.
Defaults :data:`PROMPT_LOOKUP_MIN` = :data:`PROMPT_LOOKUP_MAX` = 5 are vLLM's
(``vllm/config/speculative.py``, ``SpeculativeConfig.__post_init__``: both 5 when neither is given).
"""
from __future__ import annotations

import numpy as np

#: vLLM's defaults for the n-gram method (``SpeculativeConfig``: both 5 when neither is set)
PROMPT_LOOKUP_MIN = 5
PROMPT_LOOKUP_MAX = 5
#: the profile's ``model`` names of the drafters (``drafters`` in conf/profile.yaml)
KINDS = ("draft", "eagle", "ngram")


# --- n-gram -----------------------------------------------------------------------------------------------


def ngram_propose(tokens, k: int, prompt_lookup_min: int = PROMPT_LOOKUP_MIN,
                  prompt_lookup_max: int = PROMPT_LOOKUP_MAX) -> np.ndarray:
    """At most ``k`` proposed tokens for the sequence ``tokens`` (1-D ints) by prompt lookup (module docstring):
    an int64 array of 0..k tokens (empty: nothing matched)."""
    if not 1 <= prompt_lookup_min <= prompt_lookup_max:
        raise ValueError(f"prompt_lookup_min={prompt_lookup_min}, prompt_lookup_max={prompt_lookup_max}; "
                         "expected 1 <= min <= max")
    seq = np.asarray(tokens, dtype=np.int64)
    n_tok = len(seq)
    if k <= 0:
        return seq[:0]
    for n in range(min(prompt_lookup_max, n_tok - 1), prompt_lookup_min - 1, -1):
        # windows starting at i = 0 .. n_tok-n-1: every occurrence ending before the suffix's last token
        windows = np.lib.stride_tricks.sliding_window_view(seq[:-1], n)
        hits = np.flatnonzero((windows == seq[n_tok - n:]).all(axis=1))
        if len(hits):
            start = int(hits[0]) + n
            return seq[start:start + k].copy()
    return seq[:0]


def ngram_propose_batch(seqs, k: int, prompt_lookup_min: int = PROMPT_LOOKUP_MIN,
                        prompt_lookup_max: int = PROMPT_LOOKUP_MAX) -> list[np.ndarray]:
    """:func:`ngram_propose` for each sequence of ``seqs`` (one CPU loop over the batch, as vLLM's)."""
    return [ngram_propose(s, k, prompt_lookup_min, prompt_lookup_max) for s in seqs]


def synthetic_sequences(batch: int, context: int, seed: int = 0, vocab: int = 64, span: int = 16,
                        repeat_prob: float = 0.5) -> list[np.ndarray]:
    """``batch`` synthetic token sequences of ``context`` tokens for timing the n-gram proposer: random tokens
    from a small vocabulary (``vocab``) where, with probability ``repeat_prob`` at each span boundary, the
    next ``span`` tokens copy an earlier span of the same sequence (quoted text, code), so that some
    sequences end inside a repeated span (a hit: the lookup stops at the longest n) and others in fresh
    random tokens (with a 64-token vocabulary a 5-gram rarely recurs by chance: a miss, every n searched)."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(batch):
        s = rng.integers(0, vocab, context)
        for pos in range(span, context, span):
            if rng.random() < repeat_prob:
                src = int(rng.integers(0, pos - span + 1))
                n = min(span, context - pos)
                s[pos:pos + n] = s[src:src + n]
        out.append(s.astype(np.int64))
    return out


# --- EAGLE head ---------------------------------------------------------------------------------------------


def eagle_config(target_cfg, attention: str | None = None):
    """The head's transformers (Llama) config: one decoder layer with the attention and MLP shape of
    ``target_cfg``'s layers and its vocabulary (module docstring)."""
    import transformers

    from specbatch.profiler import attention as A
    from specbatch.profiler.models import kv_shape

    _, kv_heads, head_dim = kv_shape(target_cfg)
    ffn = getattr(target_cfg, "intermediate_size", None) or getattr(target_cfg, "ffn_dim", None) \
        or 4 * target_cfg.hidden_size
    rope = getattr(target_cfg, "rope_theta", None)
    extra = {"rope_theta": rope} if rope is not None else {}
    return transformers.LlamaConfig(
        hidden_size=target_cfg.hidden_size, num_hidden_layers=1, num_attention_heads=target_cfg.num_attention_heads,
        num_key_value_heads=kv_heads, head_dim=head_dim, intermediate_size=ffn, vocab_size=target_cfg.vocab_size,
        max_position_embeddings=getattr(target_cfg, "max_position_embeddings", 4096), tie_word_embeddings=False,
        attn_implementation=A.check(attention or A.DEFAULT), **extra)


def eagle_kv_bytes_per_token(target_cfg, dtype) -> int:
    """K and V bytes of one token in the head: one layer at the target's K/V heads × head dimension."""
    import torch

    from specbatch.profiler.models import kv_shape

    _, kv_heads, head_dim = kv_shape(target_cfg)
    return 2 * kv_heads * head_dim * torch.empty((), dtype=dtype).element_size()


def _eagle_module():
    import torch
    from transformers.masking_utils import create_causal_mask
    from transformers.models.llama.modeling_llama import LlamaDecoderLayer, LlamaRMSNorm, LlamaRotaryEmbedding

    from specbatch.profiler.models import cache_keyword

    class EagleHead(torch.nn.Module):
        """The EAGLE head (module docstring). ``forward(input_ids, hidden, position_ids, cache, ...)``:
        ``input_ids`` (b, t) the tokens, ``hidden`` (b, t, hidden) the features paired with them (the target's
        hidden states, or the head's own output at later draft steps); returns ``(logits, out_hidden)``."""

        def __init__(self, config):
            super().__init__()
            h = config.hidden_size
            self.config = config
            self.embed_tokens = torch.nn.Embedding(config.vocab_size, h)
            self.fc = torch.nn.Linear(2 * h, h, bias=True)
            self.layer = LlamaDecoderLayer(config, layer_idx=0)
            self.norm = LlamaRMSNorm(h, eps=config.rms_norm_eps)
            self.rotary_emb = LlamaRotaryEmbedding(config)
            self.lm_head = torch.nn.Linear(h, config.vocab_size, bias=False)
            self._cache_kw = cache_keyword(LlamaDecoderLayer)

        def forward(self, input_ids, hidden, position_ids, cache, attention_mask=None, logits_to_keep: int = 1):
            x = self.fc(torch.cat([self.embed_tokens(input_ids), hidden.to(self.fc.weight.dtype)], -1))
            mask = create_causal_mask(config=self.config, inputs_embeds=x, attention_mask=attention_mask,
                                      cache=cache, position_ids=position_ids)
            pos = self.rotary_emb(x, position_ids=position_ids)
            out = self.layer(x, attention_mask=mask, position_ids=position_ids, use_cache=True,
                             position_embeddings=pos, **{self._cache_kw: cache})
            keep = out if not logits_to_keep else out[:, -logits_to_keep:]
            return self.lm_head(self.norm(keep)), out

    return EagleHead


def load_eagle_head(target_cfg, dtype, device: str, seed: int = 0, attention: str | None = None):
    """``(head, info)``: the EAGLE head for a target of config ``target_cfg`` with random weights, and its
    meta.json ``models.eagle`` record (without ``kv_bytes_per_token``)."""
    import torch

    from specbatch.profiler import attention as A

    cfg = eagle_config(target_cfg, attention)
    torch.manual_seed(seed)
    with torch.device(device):
        head = _eagle_module()(cfg).to(dtype)
    head.eval()
    head.requires_grad_(False)
    n = {name: sum(p.numel() for p in m.parameters()) for name, m in
         (("embedding", head.embed_tokens), ("fusion", head.fc), ("layer", head.layer), ("norm", head.norm),
          ("lm_head", head.lm_head))}
    total = int(sum(n.values()))
    info = {"name": "eagle", "weights": "random (EAGLE-style head built from the target's config)",
            "architecture": "EagleHead (fusion Linear(2*hidden, hidden) + 1 LlamaDecoderLayer + RMSNorm + LM head)",
            "config": {"hidden_size": cfg.hidden_size, "num_hidden_layers": 1,
                       "num_attention_heads": cfg.num_attention_heads, "num_key_value_heads": cfg.num_key_value_heads,
                       "head_dim": cfg.head_dim, "intermediate_size": cfg.intermediate_size,
                       "vocab_size": cfg.vocab_size, "fusion": [2 * cfg.hidden_size, cfg.hidden_size]},
            "attention": A.check(attention or A.DEFAULT), "parameters": total,
            "parameters_by_part": {k: int(v) for k, v in n.items()},
            "parameters_own": int(n["fusion"] + n["layer"] + n["norm"]),
            "parameters_note": "parameters: everything the head's step reads (embedding and LM head included); "
                               "in EAGLE the embedding and the LM head are the target's (shared), so the weights "
                               "a head adds beside the target are parameters_own",
            "weight_bytes": int(sum(p.numel() * p.element_size() for p in head.parameters()))}
    return head, info


def eagle_forward(head, cache, input_ids, hidden, logits_to_keep: int = 1, attention_mask=None,
                  position_ids=None):
    """One head forward of ``input_ids`` (b, t) with features ``hidden`` (b, t, hidden) after the positions
    ``cache`` holds; returns ``(logits, out_hidden)``."""
    import torch

    b, t = input_ids.shape
    if position_ids is None:
        start = cache.get_seq_length()
        position_ids = torch.arange(start, start + t, device=input_ids.device).unsqueeze(0).expand(b, t)
    return head(input_ids, hidden, position_ids, cache, attention_mask=attention_mask, logits_to_keep=logits_to_keep)


def eagle_decode_one_token(head, cache, tokens, hidden, temperature: float = 1.0):
    """One EAGLE draft step (what a profile's ``eagle`` decode row times): ``tokens`` (b,) and ``hidden``
    (b, hidden) in, the sampled next tokens (b,) and the head's output hidden state (b, hidden) out. The
    cache grows by one position."""
    import torch

    with torch.inference_mode():
        logits, out = eagle_forward(head, cache, tokens[:, None], hidden[:, None])
        logits = logits[:, -1].float()
        if temperature <= 0:
            return logits.argmax(-1), out[:, -1]
        probs = torch.softmax(logits / temperature, -1)
        return torch.multinomial(probs, 1)[:, 0], out[:, -1]


def eagle_prefill(head, cache, input_ids, hidden):
    """The head's prefill (a profile's ``eagle`` prefill row): the prompt's tokens (b, t) and the target's
    hidden states over them (b, t, hidden) into an empty ``cache``; the last token's logits."""
    import torch

    with torch.inference_mode():
        return eagle_forward(head, cache, input_ids, hidden)[0][:, -1]


class GraphedEagle:
    """One captured head forward over ``cache`` at its current length (batch × ``tokens``; last-token logits),
    as :class:`specbatch.profiler.graphs.GraphedModel` does for a model: called like :func:`eagle_forward`'s
    ``head(input_ids, hidden, position_ids, cache, ...)``, it copies the inputs into static tensors and replays."""

    def __init__(self, head, cache, batch: int, tokens: int, capture):
        import torch

        from specbatch.profiler import models as M

        self.head, self.config, self.cache, self.tokens = head, head.config, cache, tokens
        self.context = cache.get_seq_length()
        device = cache.layers[0].kbuf.device
        self.input_ids = torch.zeros((batch, tokens), dtype=torch.long, device=device)
        self.hidden = torch.zeros((batch, tokens, head.config.hidden_size), dtype=head.fc.weight.dtype, device=device)
        self.position_ids = (torch.arange(tokens, device=device) + self.context).repeat(batch, 1)
        self.out: dict = {}

        def run() -> None:
            self.out["logits"], self.out["hidden"] = head(self.input_ids, self.hidden, self.position_ids, cache)

        with torch.inference_mode():
            self.replay = capture(run, lambda: M.set_cache_length(cache, self.context))

    def __call__(self, input_ids, hidden, position_ids, cache, attention_mask=None, logits_to_keep: int = 1):
        from specbatch.profiler import models as M

        if cache is not self.cache or cache.get_seq_length() != self.context or attention_mask is not None \
                or logits_to_keep != 1 or tuple(input_ids.shape) != tuple(self.input_ids.shape):
            raise ValueError("a GraphedEagle replays the forward it captured (same cache, length, shapes, no mask)")
        self.input_ids.copy_(input_ids)
        self.hidden.copy_(hidden)
        self.position_ids.copy_(position_ids)
        self.replay()
        M.set_cache_length(cache, self.context + self.tokens)
        return self.out["logits"], self.out["hidden"]
