"""Architecture presets: transformers configs of public models, built with random weights.

Step time does not depend on weight values, so the profiler needs no download: a preset gives the exact
shapes (layers, hidden size, heads, KV heads, vocabulary) of the public model it is named after.
``max_context`` is the longest sequence (tokens) the architecture can address; ``None`` means no hard limit
(rotary positions). Tiny presets (``tiny-*``) exist for tests and smoke runs.
"""
from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class Preset:
    name: str
    family: str  # opt | llama | qwen2
    hf_name: str  # the hub model whose shape this copies (for the record; never downloaded)
    kwargs: dict = field(default_factory=dict)
    max_context: int | None = None


def _opt(name, hf, hidden, layers, heads, ffn, vocab=50272):
    kw = dict(hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads, ffn_dim=ffn,
              vocab_size=vocab, word_embed_proj_dim=hidden, max_position_embeddings=2048,
              do_layer_norm_before=True, enable_bias=True)
    return Preset(name, "opt", hf, kw, max_context=2048)


def _llama(name, hf, hidden, layers, heads, kv_heads, ffn, vocab=32000, max_pos=4096, rope_theta=10000.0,
           tie=False, family="llama", **extra):
    kw = dict(hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
              num_key_value_heads=kv_heads, intermediate_size=ffn, vocab_size=vocab,
              max_position_embeddings=max_pos, rope_theta=rope_theta, tie_word_embeddings=tie, **extra)
    return Preset(name, family, hf, kw, max_context=None)


PRESETS: dict[str, Preset] = {p.name: p for p in [
    _opt("opt-125m", "facebook/opt-125m", 768, 12, 12, 3072),
    _opt("opt-1.3b", "facebook/opt-1.3b", 2048, 24, 32, 8192),
    _opt("opt-6.7b", "facebook/opt-6.7b", 4096, 32, 32, 16384),
    _opt("opt-13b", "facebook/opt-13b", 5120, 40, 40, 20480),
    _llama("llama-68m", "JackFram/llama-68m", 768, 2, 12, 12, 3072, max_pos=2048),
    _llama("tinyllama-1.1b", "TinyLlama/TinyLlama-1.1B-intermediate-step-1431k-3T", 2048, 22, 32, 4, 5632,
           max_pos=2048),
    _llama("llama-2-7b", "meta-llama/Llama-2-7b-hf", 4096, 32, 32, 32, 11008),
    _llama("llama-3.2-1b", "meta-llama/Llama-3.2-1B", 2048, 16, 32, 8, 8192, vocab=128256, max_pos=131072,
           rope_theta=500000.0, tie=True),
    _llama("llama-3-8b", "meta-llama/Meta-Llama-3-8B", 4096, 32, 32, 8, 14336, vocab=128256, max_pos=8192,
           rope_theta=500000.0),
    _llama("qwen2.5-0.5b", "Qwen/Qwen2.5-0.5B", 896, 24, 14, 2, 4864, vocab=151936, max_pos=32768,
           rope_theta=1000000.0, tie=True, family="qwen2"),
    _llama("qwen2.5-7b", "Qwen/Qwen2.5-7B", 3584, 28, 28, 4, 18944, vocab=152064, max_pos=32768,
           rope_theta=1000000.0, family="qwen2"),
    # tiny shapes for tests and smoke runs (GQA target, MHA draft, OPT pair)
    _llama("tiny-llama", "(test)", 64, 2, 4, 2, 128, vocab=512, max_pos=4096),
    _llama("tiny-llama-draft", "(test)", 32, 1, 2, 2, 64, vocab=512, max_pos=4096),
    Preset("tiny-opt", "opt", "(test)", dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, ffn_dim=128,
                                             vocab_size=512, word_embed_proj_dim=64, max_position_embeddings=512,
                                             do_layer_norm_before=True, enable_bias=True), max_context=512),
]}


def make_config(name: str, attention: str | None = None):
    """The transformers config of preset ``name`` (raises ``KeyError`` listing the presets).

    ``attention``: the attention implementation the config asks for (transformers' public
    ``attn_implementation`` config argument); default :data:`specbatch.profiler.attention.DEFAULT`, the
    engine-style SDPA function (registered with transformers here)."""
    if name not in PRESETS:
        raise KeyError(f"unknown model preset {name!r}; expected one of {sorted(PRESETS)} "
                       "or a local checkpoint folder / hub name")
    p = PRESETS[name]
    import transformers

    cls = {"opt": transformers.OPTConfig, "llama": transformers.LlamaConfig, "qwen2": transformers.Qwen2Config}[p.family]
    from specbatch.profiler import attention as A

    return cls(**p.kwargs, attn_implementation=A.check(attention or A.DEFAULT))
