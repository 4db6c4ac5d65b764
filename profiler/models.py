"""Models, KV caches and the three timed step functions (gpt-fast style: flat and explicit).

Conventions: ``batch`` = sequences, ``tokens`` = new tokens per sequence, ``context`` = tokens already in the
KV cache before the step. All functions leave the cache exactly ``context`` tokens long when they return
(rejected and accepted positions alike are rolled back), so one cache can be reused across timed repeats.
"""
from __future__ import annotations

import functools
import inspect
import os
from pathlib import Path

# GQA models fed more than one new token would otherwise expand (copy) the KV heads in every layer.
os.environ.setdefault("TRANSFORMERS_SDPA_FORCE_GQA", "1")

import torch  # noqa: E402
from transformers.cache_utils import Cache, DynamicCache, DynamicLayer  # noqa: E402

from specbatch.profiler.presets import PRESETS, make_config  # noqa: E402

DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
          "float16": torch.float16, "fp16": torch.float16}


class ProfilerOOM(RuntimeError):
    """A point needs more memory than the device (or the configured memory limit) has."""


def is_oom(exc: BaseException) -> bool:
    """True for CUDA OOM, CPU allocator failures and :class:`ProfilerOOM`."""
    if isinstance(exc, ProfilerOOM):
        return True
    oom_cls = getattr(torch, "OutOfMemoryError", None) or getattr(torch.cuda, "OutOfMemoryError", None)
    if oom_cls is not None and isinstance(exc, oom_cls):
        return True
    msg = str(exc).lower()
    return isinstance(exc, RuntimeError) and ("out of memory" in msg or "can't allocate memory" in msg)


# --- models ------------------------------------------------------------------------------------------------


def attention_backends(device: str) -> dict:
    """Set the SDPA backends the profiler and the engine use on ``device``; return them for meta.json.

    On CUDA, cuDNN attention is switched off unless ``SPECBATCH_SDPA_CUDNN=1``: recent torch puts it first
    on H100/B200-class GPUs, and it builds an execution plan for every new shape. A profile times each shape
    many times (the plan is built once, in warm-up), while in a serving run the attention span changes at
    almost every iteration, so every step would pay a plan build that no profile records. Flash and
    memory-efficient attention (what serving engines use) have no per-shape set-up. CPU: nothing to set.
    """
    if not str(device).startswith("cuda"):
        return {}
    cudnn = os.environ.get("SPECBATCH_SDPA_CUDNN", "0") == "1"
    torch.backends.cuda.enable_cudnn_sdp(cudnn)
    return {"cudnn": cudnn, "flash": torch.backends.cuda.flash_sdp_enabled(),
            "mem_efficient": torch.backends.cuda.mem_efficient_sdp_enabled()}


def load_model(spec: str, dtype: torch.dtype, device: str, seed: int = 0, attention: str | None = None):
    """Return ``(model, info)`` for a preset name (random weights) or a checkpoint folder / hub name.

    ``attention``: the transformers attention implementation, default
    :data:`specbatch.profiler.attention.DEFAULT` (SDPA with implicit causal masks over the cache, as serving
    engines run it); ``sdpa`` or ``eager`` for transformers' own (masked) paths.
    ``info`` is the meta.json ``models.<role>`` record without ``kv_bytes_per_token``.
    """
    import transformers

    from specbatch.profiler import attention as A

    attn = A.check(attention or A.DEFAULT)
    attention_backends(device)
    torch.manual_seed(seed)
    if spec in PRESETS:
        cfg = make_config(spec, attn)
        with torch.device(device):
            model = transformers.AutoModelForCausalLM.from_config(cfg, dtype=dtype, attn_implementation=attn)
        source, hf = "preset (random weights)", PRESETS[spec].hf_name
    else:
        path = Path(spec)
        if not path.is_dir() and (spec.startswith((".", "/", "~")) or os.sep in spec and spec.count("/") > 1):
            raise FileNotFoundError(f"model {spec!r}: no such checkpoint folder, and not a preset "
                                    f"(presets: {sorted(PRESETS)})")
        try:
            model = transformers.AutoModelForCausalLM.from_pretrained(
                str(path.expanduser()) if path.is_dir() else spec, dtype=dtype, attn_implementation=attn)
        except OSError as e:
            raise FileNotFoundError(f"model {spec!r} is neither a preset ({sorted(PRESETS)}), nor a checkpoint "
                                    f"folder, nor a reachable hub name: {e}") from None
        model = model.to(device)
        source, hf = ("checkpoint folder" if path.is_dir() else "hub"), spec
    model.eval()
    model.requires_grad_(False)
    cfg = model.config
    info = {"name": spec, "weights": source, "shape_of": hf, "architecture": type(model).__name__,
            "config": _config_summary(cfg), "attention": attn, "parameters": int(sum(p.numel() for p in model.parameters())),
            "weight_bytes": int(sum(p.numel() * p.element_size() for p in model.parameters()))}
    return model, info


def _config_summary(cfg) -> dict:
    keys = ["model_type", "hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
            "intermediate_size", "ffn_dim", "vocab_size", "max_position_embeddings", "tie_word_embeddings"]
    return {k: getattr(cfg, k) for k in keys if getattr(cfg, k, None) is not None}


def kv_shape(cfg) -> tuple[int, int, int]:
    """``(layers, kv_heads, head_dim)`` of a decoder config."""
    heads = cfg.num_attention_heads
    kv_heads = getattr(cfg, "num_key_value_heads", None) or heads
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // heads
    return cfg.num_hidden_layers, kv_heads, head_dim


def kv_bytes_per_token(cfg, dtype: torch.dtype) -> int:
    """Bytes of K and V one token occupies over all layers."""
    layers, kv_heads, head_dim = kv_shape(cfg)
    return 2 * layers * kv_heads * head_dim * torch.empty((), dtype=dtype).element_size()


def max_context(model) -> int | None:
    """Longest sequence the model can address (learned positions), or ``None`` (rotary: no hard limit)."""
    if model.config.model_type == "opt":
        return int(model.config.max_position_embeddings)
    return None


# --- KV caches ---------------------------------------------------------------------------------------------


class PreallocLayer(DynamicLayer):
    """One layer of a pre-allocated KV cache: fixed buffers of ``max_len`` positions, written in place.

    ``update`` copies only the new tokens and returns views of the first ``length`` positions, so attention
    spans exactly the tokens in the cache (as in paged serving engines) and nothing is re-copied per step.
    ``crop(-n)`` drops the last ``n`` positions in O(1).
    """

    def __init__(self, max_len: int):
        super().__init__()
        self.max_len = max_len
        self.length = 0

    def allocate(self, batch, kv_heads, head_dim, dtype, device, fill: bool = True):
        shape = (batch, kv_heads, self.max_len, head_dim)
        self.kbuf = torch.empty(shape, dtype=dtype, device=device)
        self.vbuf = torch.empty(shape, dtype=dtype, device=device)
        if fill:  # values do not change the timing, but avoid NaN/denormal garbage in uninitialised memory
            self.kbuf.normal_(0.0, 1.0)
            self.vbuf.normal_(0.0, 1.0)
        self.device, self.dtype, self.is_initialized = device, dtype, True
        self._set_length(0)

    def _set_length(self, n: int) -> None:
        self.length = n
        self.keys = self.kbuf[:, :, :n]
        self.values = self.vbuf[:, :, :n]

    def set_length(self, n: int) -> None:
        """Declare the first ``n`` positions cached (the buffers are not touched): what a replayed CUDA graph,
        which runs no Python, needs to have the Python-side length follow the positions it wrote."""
        if not 0 <= n <= self.max_len:
            raise ValueError(f"length {n} outside the pre-allocated 0..{self.max_len} positions")
        self._set_length(n)

    def lazy_initialization(self, key_states, value_states):  # never lazy: buffers exist before the first step
        raise RuntimeError("PreallocLayer must be allocated before use")

    def update(self, key_states, value_states, *args, **kwargs):
        t = key_states.shape[-2]
        if self.length + t > self.max_len:
            raise ValueError(f"pre-allocated KV cache overflow: {self.length} + {t} > {self.max_len} positions")
        self.kbuf[:, :, self.length:self.length + t].copy_(key_states)
        self.vbuf[:, :, self.length:self.length + t].copy_(value_states)
        self._set_length(self.length + t)
        return self.keys, self.values

    def crop(self, tokens_to_remove: int) -> None:
        if tokens_to_remove > 0:
            raise ValueError("crop takes a negative count of tokens to drop")
        self._set_length(max(0, self.length + tokens_to_remove))

    def get_seq_length(self) -> int:
        return self.length

    def get_max_length(self) -> int:
        return self.max_len


def make_cache(kind: str, cfg, batch: int, context: int, max_new: int, dtype, device):
    """A cache for ``batch`` sequences already holding ``context`` positions of (random) K/V.

    ``kind``: ``prealloc`` (:class:`PreallocLayer` buffers of ``context + max_new`` positions) or
    ``dynamic`` (transformers ``DynamicCache``: every update concatenates, copying the whole cache).
    """
    layers, kv_heads, head_dim = kv_shape(cfg)
    if kind == "prealloc":
        cache = Cache(layers=[PreallocLayer(context + max_new) for _ in range(layers)])
        for layer in cache.layers:
            layer.allocate(batch, kv_heads, head_dim, dtype, device)
            layer._set_length(context)
        return cache
    if kind == "dynamic":
        shape = (batch, kv_heads, context, head_dim)
        data = [(torch.randn(shape, dtype=dtype, device=device), torch.randn(shape, dtype=dtype, device=device))
                for _ in range(layers)]
        cache = DynamicCache(ddp_cache_data=data, config=cfg) if context > 0 else DynamicCache(config=cfg)
        return cache
    raise ValueError(f"cache {kind!r}: expected 'prealloc' or 'dynamic'")


def set_cache_length(cache, n: int) -> None:
    """Set every :class:`PreallocLayer` of ``cache`` to ``n`` cached positions (O(1), no data moved)."""
    for layer in cache.layers:
        if not isinstance(layer, PreallocLayer):
            raise TypeError(f"set_cache_length needs a pre-allocated cache, not {type(layer).__name__} layers")
        layer.set_length(n)


def cache_bytes(cfg, batch: int, positions: int, dtype) -> int:
    """Bytes a cache of ``batch`` x ``positions`` occupies."""
    return batch * positions * kv_bytes_per_token(cfg, dtype)


def rollback(cache, n: int) -> None:
    """Drop the last ``n`` positions of every layer (``n`` >= 0)."""
    if n > 0:
        cache.crop(-n)


# --- the timed steps ---------------------------------------------------------------------------------------


@functools.cache
def cache_keyword(model_class: type) -> str:
    """Keyword under which ``model_class.forward`` takes the KV cache: ``cache`` in recent transformers,
    ``past_key_values`` before. Passing the wrong one is not an error there (it lands in ``**kwargs``) but
    silently runs every step without the cache, so it is looked up, never assumed."""
    params = inspect.signature(model_class.forward).parameters
    for name in ("cache", "past_key_values"):
        if name in params:
            return name
    raise TypeError(f"{model_class.__name__}.forward takes neither `cache` nor `past_key_values`; "
                    "this transformers version is not supported by the profiler")


def forward(model, cache, **kwargs):
    """``model(**kwargs)`` with ``cache`` passed under the installed transformers' keyword."""
    return model(**{cache_keyword(type(model)): cache}, **kwargs)


def _positions(batch: int, start: int, tokens: int, device) -> torch.Tensor:
    return torch.arange(start, start + tokens, device=device).unsqueeze(0).expand(batch, tokens)


@torch.inference_mode()
def prefill(model, cache, input_ids: torch.Tensor) -> torch.Tensor:
    """Run the prompt ``input_ids`` (batch x prompt tokens) into an empty ``cache``; logits of the last token.

    The cache keeps the prompt (the caller rolls it back when timing repeats).
    """
    b, t = input_ids.shape
    start = cache.get_seq_length()
    out = forward(model, cache, input_ids=input_ids, position_ids=_positions(b, start, t, input_ids.device),
                  use_cache=True, logits_to_keep=1)
    return out.logits[:, -1]


@torch.inference_mode()
def decode_one_token(model, cache, tokens: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """One decode step: ``tokens`` (batch,) are appended; returns the sampled next tokens (batch,).

    The cache grows by one position; :func:`rollback` restores it.
    """
    b = tokens.shape[0]
    start = cache.get_seq_length()
    out = forward(model, cache, input_ids=tokens[:, None], position_ids=_positions(b, start, 1, tokens.device),
                  use_cache=True, logits_to_keep=1)
    logits = out.logits[:, -1].float()
    if temperature <= 0:
        return logits.argmax(-1)
    probs = torch.softmax(logits / temperature, -1)
    return torch.multinomial(probs, 1)[:, 0]


def speculative_sample(logits: torch.Tensor, draft_tokens: torch.Tensor, draft_probs: torch.Tensor | None,
                       temperature: float = 1.0, generator: torch.Generator | None = None,
                       accepted: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The speculative-sampling test of ``draft_tokens`` (batch, gamma) against the target's ``logits``
    (batch, gamma+1, vocab; float), the draft's distributions ``draft_probs`` (batch, gamma, vocab) unused when
    greedy (``temperature <= 0``: accept while the target's argmax agrees, then take its argmax).
    Otherwise draft token j is accepted while u·q ≤ p (u < min(1, p/q)); the next token is drawn from the
    residual (p − q)+ at the first rejection, or from p after all gamma (the bonus token).
    ``accepted`` (batch,): counts that replace the test's outcome (the test still runs and draws); a residual
    that is then all zero (draft = target there) gives way to p.
    Returns ``(n_accepted (batch,), next_token (batch,))``."""
    b, gamma = draft_tokens.shape
    rows = torch.arange(b, device=logits.device)
    if temperature <= 0:
        target_tok = logits.argmax(-1)  # (b, gamma+1)
        n_acc = (target_tok[:, :gamma] == draft_tokens).int().cumprod(1).sum(1)
        if accepted is not None:
            n_acc = accepted
        return n_acc, target_tok[rows, n_acc]
    p = torch.softmax(logits / temperature, -1)
    if gamma == 0:
        n_acc = torch.zeros(b, dtype=torch.long, device=logits.device)
        residual = p[:, 0]
    else:
        p_tok = p[:, :gamma].gather(-1, draft_tokens[..., None])[..., 0]
        q_tok = draft_probs.gather(-1, draft_tokens[..., None])[..., 0]
        u = torch.rand(b, gamma, device=logits.device, generator=generator)
        n_acc = (u * q_tok <= p_tok).int().cumprod(1).sum(1)  # u < min(1, p/q)
        if accepted is not None:
            n_acc = accepted
        q_pad = torch.cat([draft_probs, torch.zeros_like(draft_probs[:, :1])], 1)
        residual = (p - q_pad).clamp_min(0)[rows, n_acc]  # at n_acc == gamma q_pad is 0: the bonus token
        residual = residual / residual.sum(-1, keepdim=True).clamp_min(1e-20)
        if accepted is not None:
            residual = torch.where(residual.sum(-1, keepdim=True) > 0, residual, p[rows, n_acc])
    return n_acc, torch.multinomial(residual, 1, generator=generator)[:, 0]


@torch.inference_mode()
def verify(model, cache, last_token: torch.Tensor, draft_tokens: torch.Tensor, draft_probs: torch.Tensor | None,
           temperature: float = 1.0, generator: torch.Generator | None = None):
    """Verify ``gamma`` draft tokens per sequence with the target, speculative-sampling style.

    ``last_token`` (batch,) is the last accepted token (not yet in the cache), ``draft_tokens`` (batch, gamma),
    ``draft_probs`` (batch, gamma, vocab) the draft's distributions (unused when greedy, ``temperature <= 0``).
    Runs one forward of gamma+1 tokens, the acceptance test, the residual/bonus sampling, and rolls the cache
    back so that it holds only the accepted positions of the longest-accepting sequence (per-sequence
    lengths would be tracked by the engine; rejected positions beyond them are masked there).
    Returns ``(n_accepted (batch,), next_token (batch,))``. With gamma = 0 this is plain decode.
    """
    b, gamma = draft_tokens.shape
    start = cache.get_seq_length()
    ids = torch.cat([last_token[:, None], draft_tokens], 1)
    out = forward(model, cache, input_ids=ids, position_ids=_positions(b, start, gamma + 1, ids.device), use_cache=True)
    n_acc, next_tok = speculative_sample(out.logits.float(), draft_tokens, draft_probs, temperature, generator)
    # rollback of rejected positions: keep last_token + the longest accepted prefix in the shared buffer
    keep = 1 + int(n_acc.max())
    rollback(cache, gamma + 1 - keep)
    return n_acc, next_tok
