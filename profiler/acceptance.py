"""Per-position acceptance rates of a real draft/target pair on user prompts.

Speculative decoding is run for real (no cache: every step re-runs the full sequence, which is simple and
exact; acceptance does not depend on speed). At each round the draft proposes ``gamma`` tokens; position
``i`` (1-based) counts one *attempt* when positions ``1..i-1`` were accepted, and one *accept* when the
target accepts it: greedy (temperature 0) means the draft token equals the target's argmax; otherwise
the speculative-sampling test ``u < min(1, p/q)``. ``alpha_i = accepts_i / attempts_i``.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch


def read_prompts(prompts=None, prompts_file=None) -> list[str]:
    """Prompts from a list of strings and/or a file (``.jsonl``: one object per line with a ``prompt`` or
    ``text`` field, or a JSON string; other files: one prompt per non-empty line)."""
    out = [str(p) for p in (prompts or [])]
    if prompts_file:
        path = Path(prompts_file)
        if not path.is_file():
            raise FileNotFoundError(f"acceptance.prompts_file: {path} not found")
        for i, line in enumerate(path.read_text().splitlines(), 1):
            if not line.strip():
                continue
            if path.suffix == ".jsonl":
                try:
                    obj = json.loads(line)
                except json.JSONDecodeError as e:
                    raise ValueError(f"{path}:{i}: not valid JSON ({e})") from None
                if isinstance(obj, dict):
                    text = obj.get("prompt", obj.get("text"))
                    if not isinstance(text, str):
                        raise ValueError(f"{path}:{i}: expected a 'prompt' or 'text' string field")
                elif isinstance(obj, str):
                    text = obj
                else:
                    raise ValueError(f"{path}:{i}: expected an object with 'prompt'/'text' or a string")
                out.append(text)
            else:
                out.append(line)
    if not out:
        raise ValueError("acceptance needs prompts: set acceptance.prompts (list of strings) or "
                         "acceptance.prompts_file (a .jsonl or .txt file)")
    return out


def load_tokenizer(spec: str):
    """The checkpoint's tokenizer, or ``None`` (presets, folders without one)."""
    try:
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(spec)
    except Exception:  # noqa: BLE001
        return None


def encode(text: str, tokenizer, vocab_size: int) -> list[int]:
    """Token ids of ``text``: the tokenizer's, else UTF-8 bytes modulo the vocabulary (random-weight presets)."""
    if tokenizer is not None:
        return list(tokenizer(text)["input_ids"])
    return [b % vocab_size for b in text.encode("utf-8")] or [0]


def _probs(logits: torch.Tensor, temperature: float) -> torch.Tensor:
    return torch.softmax(logits.float() / temperature, -1)


@torch.inference_mode()
def measure_acceptance(target, draft, prompts_ids: list[list[int]], gamma: int, temperature: float,
                       max_new_tokens: int, seed: int = 0) -> tuple[list[float], list[int]]:
    """Per-position ``(alpha, attempts)`` for positions 1..gamma (positions never attempted are dropped from
    the end). Token ids must be valid for both models."""
    if gamma < 1:
        raise ValueError(f"acceptance.gamma={gamma}; expected >= 1")
    device = next(target.parameters()).device
    gen = torch.Generator(device=device).manual_seed(seed)
    attempts = [0] * gamma
    accepts = [0] * gamma
    for ids in prompts_ids:
        seq = torch.tensor([ids], device=device)
        generated = 0
        while generated < max_new_tokens:
            # draft proposes gamma tokens
            d_seq, q_list = seq, []
            for _ in range(gamma):
                logits = draft(input_ids=d_seq).logits[:, -1]
                if temperature <= 0:
                    tok = logits.argmax(-1, keepdim=True)
                    q_list.append(None)
                else:
                    q = _probs(logits, temperature)
                    tok = torch.multinomial(q, 1, generator=gen)
                    q_list.append(q[0])
                d_seq = torch.cat([d_seq, tok], 1)
            proposal = d_seq[0, seq.shape[1]:]
            t_logits = target(input_ids=d_seq).logits[0, seq.shape[1] - 1:]  # gamma+1 positions
            n_acc = 0
            next_tok = None
            for i in range(gamma):
                attempts[i] += 1
                tok = int(proposal[i])
                if temperature <= 0:
                    ok = int(t_logits[i].argmax()) == tok
                    if not ok:
                        next_tok = int(t_logits[i].argmax())
                else:
                    p = _probs(t_logits[i], temperature)
                    q = q_list[i]
                    ok = bool(torch.rand((), device=device, generator=gen) * q[tok] <= p[tok])
                    if not ok:
                        r = (p - q).clamp_min(0)
                        r = r / r.sum() if r.sum() > 0 else p
                        next_tok = int(torch.multinomial(r, 1, generator=gen))
                if not ok:
                    break
                accepts[i] += 1
                n_acc += 1
            if next_tok is None:  # all accepted: bonus token from the target
                last = t_logits[gamma]
                next_tok = int(last.argmax()) if temperature <= 0 else \
                    int(torch.multinomial(_probs(last, temperature), 1, generator=gen))
            new = torch.cat([proposal[:n_acc], torch.tensor([next_tok], device=device)])
            seq = torch.cat([seq, new[None]], 1)
            generated += n_acc + 1
    n = max((i + 1 for i in range(gamma) if attempts[i] > 0), default=0)
    alphas = [accepts[i] / attempts[i] for i in range(n)]
    return alphas, attempts[:n]
