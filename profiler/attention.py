"""Attention as serving engines run it: SDPA over the pre-allocated KV cache with an implicit causal mask.

vLLM and SGLang run flash / paged attention kernels whose causal mask is *lower-right aligned* (query ``i`` of
``q`` new tokens after ``c`` cached ones sees key positions ``<= c + i``) and never materialised. transformers'
``sdpa`` path instead builds an explicit 4-D boolean mask for every multi-token step over a non-empty cache
(verification of γ+1 draft tokens), and SDPA with an explicit mask cannot take the flash kernel (and, with GQA,
not the memory-efficient one either): verify steps then fall to the math kernel and grow with batch × context.

:func:`engine_attention` is registered with transformers' public ``AttentionInterface`` under :data:`NAME`;
a model built with ``attn_implementation=NAME`` calls it in every attention layer with the query of the new
tokens and the K/V the cache returns (``PreallocLayer.update``: views of exactly the cached positions).
It picks the mask from the shapes alone (:func:`mask_kind`):

* ``none``: one query (decode, γ = 0): no mask, every cached position is visible;
* ``causal``: as many queries as keys (prefill into an empty cache): ``is_causal=True``;
* ``lower_right``: ``q`` queries after ``kv - q`` cached positions (verify): ``causal_lower_right(q, kv)``,
  which SDPA dispatches on CUDA to the flash kernel (``is_causal`` there *is* lower-right) or to the
  memory-efficient kernel (``custom_mask_type`` lower-right), without a mask tensor. Where neither kernel is
  eligible (every CPU, fp32 flash on CUDA, ...) torch materialises the small ``q × kv`` boolean mask (shared by
  the batch and the heads) and takes the best kernel that accepts a mask.

No 4-D mask is built: transformers' ``create_causal_mask`` returns the caller's mask untouched (``None`` in the
profiler's steps) for an attention implementation that has no mask function in ``AttentionMaskInterface``
(``masking_utils._preprocess_mask_arguments``, transformers 5.x: "custom attention without equivalent mask
creation: we don't need a mask"); :data:`NAME` is deliberately not registered there
(:func:`builds_no_mask` checks it). A caller that passes its own mask (the fidelity engine's per-slot ragged
lengths) gets plain masked SDPA, as transformers' ``sdpa`` would run it.
A forward called with the keyword ``packed`` (a :class:`specbatch.profiler.packed.PackedPlan`: verify rows and
prompt chunks flattened into one input, chunked prefill) runs attention per part instead
(:func:`specbatch.profiler.packed.packed_attention`).

GQA (fewer K/V heads than query heads): ``enable_gqa=True`` lets SDPA read the shared K/V heads without a
copy; it is supported by the flash, cuDNN and math kernels (and the CPU flash kernel) but not by the
memory-efficient one. On CUDA, when the flash kernel is not eligible for the step, K/V heads are expanded
(copied) so that the memory-efficient kernel can run instead of the math one (:func:`gqa_plan`).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.nn.attention.bias import causal_lower_right

NAME = "specbatch_sdpa"
#: attention implementations the profiler can build models with (``attention`` in conf/profile.yaml)
IMPLEMENTATIONS = (NAME, "sdpa", "eager")
DEFAULT = NAME

#: SDPA backends in the order :func:`probe_backend` tries them
BACKENDS = (("flash", SDPBackend.FLASH_ATTENTION), ("efficient", SDPBackend.EFFICIENT_ATTENTION),
            ("cudnn", SDPBackend.CUDNN_ATTENTION), ("math", SDPBackend.MATH))

PATHS = {"none": "one query: no mask", "causal": "q == kv: is_causal=True (no mask tensor)",
         "lower_right": "q < kv: torch.nn.attention.bias.causal_lower_right(q, kv) (no mask tensor on CUDA "
                        "flash/efficient kernels; a q x kv bool mask elsewhere)",
         "given": "the caller's mask (plain masked SDPA)"}


def mask_kind(q_len: int, kv_len: int, causal: bool = True, has_mask: bool = False) -> str:
    """Which mask :func:`engine_attention` uses for ``q_len`` queries over ``kv_len`` keys: one of :data:`PATHS`."""
    if has_mask:
        return "given"
    if q_len == 1 or not causal:
        return "none"
    if q_len == kv_len:
        return "causal"
    if q_len > kv_len:
        raise ValueError(f"{q_len} queries over {kv_len} keys: the cache must hold the new tokens too")
    return "lower_right"


def gqa_plan(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, is_causal: bool,
             has_mask: bool = False) -> str:
    """How K/V heads shared by several query heads are read: ``same`` (no GQA), ``native`` (``enable_gqa=True``)
    or ``expand`` (K/V heads copied to the query heads' count, on CUDA when the flash kernel is not eligible)."""
    if query.shape[1] == key.shape[1]:
        return "same"
    if query.device.type != "cuda":
        return "native"
    if has_mask:  # masks rule out flash; the memory-efficient kernel takes masks but not GQA
        return "expand"
    params = torch.backends.cuda.SDPAParams(query, key, value, None, 0.0, is_causal, True)
    return "native" if torch.backends.cuda.can_use_flash_attention(params) else "expand"


def expand_kv(x: torch.Tensor, groups: int) -> torch.Tensor:
    """(b, kv_heads, n, d) -> (b, kv_heads * groups, n, d), head ``h`` reading K/V head ``h // groups``."""
    b, h, n, d = x.shape
    return x[:, :, None].expand(b, h, groups, n, d).reshape(b, h * groups, n, d)


def engine_attention(module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                     attention_mask: torch.Tensor | None, dropout: float = 0.0, scaling: float | None = None,
                     is_causal: bool | None = None, **kwargs):
    """transformers attention function (``AttentionInterface``): query (b, heads, q, d), key/value
    (b, kv_heads, kv, d) including the new tokens; returns ``(output (b, q, heads, d), None)``."""
    if kwargs.get("softcap") is not None:
        raise ValueError(f"attn_implementation={NAME!r} does not support softcap")
    if kwargs.get("packed") is not None:  # a packed forward (profiler/packed.py): attention per part
        from specbatch.profiler.packed import packed_attention

        return packed_attention(query, key, value, kwargs["packed"], scaling), None
    causal = is_causal if is_causal is not None else getattr(module, "is_causal", True)
    q_len, kv_len = query.shape[2], key.shape[2]
    kind = mask_kind(q_len, kv_len, causal, attention_mask is not None)
    mask, flag = {"given": (attention_mask, False), "none": (None, False), "causal": (None, True),
                  "lower_right": (None, False)}[kind]
    if kind == "lower_right":
        mask = causal_lower_right(q_len, kv_len)
    plan = gqa_plan(query, key, value, flag, attention_mask is not None)
    if plan == "expand":
        groups = query.shape[1] // key.shape[1]
        key, value = expand_kv(key, groups), expand_kv(value, groups)
    out = F.scaled_dot_product_attention(query, key, value, attn_mask=mask, dropout_p=dropout, is_causal=flag,
                                         scale=scaling, enable_gqa=plan == "native")
    return out.transpose(1, 2).contiguous(), None


def register() -> str:
    """Register :func:`engine_attention` as :data:`NAME` with transformers (idempotent); return the name."""
    from transformers import AttentionInterface

    AttentionInterface.register(NAME, engine_attention)
    return NAME


def builds_no_mask(name: str = NAME) -> bool:
    """True when transformers' mask creation returns the caller's mask untouched for ``name`` (no mask
    function registered for it in the public ``AttentionMaskInterface``)."""
    from transformers.masking_utils import AttentionMaskInterface

    return name not in AttentionMaskInterface()


def check(name: str) -> str:
    if name not in IMPLEMENTATIONS:
        raise ValueError(f"attention={name!r}; expected one of {list(IMPLEMENTATIONS)}")
    if name == NAME:
        register()
    return name


def enabled_backends() -> list[tuple[str, SDPBackend]]:
    """The SDPA backends switched on globally (``torch.backends.cuda.*_sdp_enabled``; cuDNN is off in the
    profiler unless ``SPECBATCH_SDPA_CUDNN=1``, see ``models.attention_backends``), in :data:`BACKENDS` order."""
    on = {"flash": torch.backends.cuda.flash_sdp_enabled(), "efficient": torch.backends.cuda.mem_efficient_sdp_enabled(),
          "cudnn": torch.backends.cuda.cudnn_sdp_enabled(), "math": torch.backends.cuda.math_sdp_enabled()}
    return [(n, b) for n, b in BACKENDS if on[n]]


def probe_backend(run, reset=None) -> str:
    """The SDPA backend a step runs on, found out rather than assumed: ``run()`` (one forward) is tried under
    ``torch.nn.attention.sdpa_kernel([backend])`` for each enabled backend in the order flash, efficient,
    cudnn, math, and the first that runs without error is returned (``reset()`` after every try, e.g. a
    cache rollback). That is the kernel SDPA's own dispatcher picks among the enabled backends, which it
    tries in the same order (flash > efficient > math; cuDNN, when enabled, may rank first on some GPUs:
    the profiler keeps it off). ``"none"`` if no backend runs."""
    for name, backend in enabled_backends():
        try:
            with sdpa_kernel([backend]):
                run()
            return name
        except RuntimeError:
            continue
        finally:
            if reset is not None:
                reset()
    return "none"
