"""The packed mixed forward (profiler/packed.py): verify rows and prompt chunks flattened into one forward give
the logits and K/V of running them apart (CPU, fp32, to 1e-5), and the mixed grid's defaults."""
from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

from specbatch.profiler import attention as A  # noqa: E402
from specbatch.profiler import models as M  # noqa: E402
from specbatch.profiler import packed as P  # noqa: E402
from specbatch.profiler.mixed import MixedGrid, MixedPoint  # noqa: E402
from specbatch.profiler.sweep import Grid  # noqa: E402

ATOL = 1e-5


@pytest.fixture(scope="module")
def model():
    return M.load_model("tiny-llama", torch.float32, "cpu", seed=5, attention=A.NAME)[0]


def _prefilled(model, ids: torch.Tensor, room: int):
    """A pre-allocated cache holding the prompt ``ids`` (batch × n), with ``room`` more positions."""
    cache = M.make_cache("prealloc", model.config, ids.shape[0], 0, ids.shape[1] + room, torch.float32, "cpu")
    M.prefill(model, cache, ids)
    return cache


def _copy_in(packed, cache, row: int, n: int, src_row: int = 0) -> None:
    for dst, src in zip(packed.layers, cache.layers):
        dst.kbuf[row, :, :n] = src.kbuf[src_row, :, :n]
        dst.vbuf[row, :, :n] = src.vbuf[src_row, :, :n]


@torch.inference_mode()
def _alone(model, cache, ids: torch.Tensor, start: int) -> torch.Tensor:
    """Logits (float) of ``ids`` (batch × t) run alone on ``cache`` after ``start`` cached positions."""
    pos = torch.arange(start, start + ids.shape[1])[None].expand(ids.shape[0], -1)
    return M.forward(model, cache, input_ids=ids, position_ids=pos, use_cache=True).logits.float()


def test_packed_forward_equals_the_parts_run_apart(model):
    """Three verify rows (γ = 4) at context 20, a chunk of 11 tokens after 7 cached ones and a first chunk
    (no prefix) of 6 tokens, in one forward: every verify logit, each chunk's last logit and every K/V
    written equal the separate forwards'."""
    torch.manual_seed(0)
    V, b, g, c = model.config.vocab_size, 3, 4, 20
    ctx, pre = torch.randint(0, V, (b, c)), torch.randint(0, V, (1, 7))
    rows, chunk, first = torch.randint(0, V, (b, g + 1)), torch.randint(0, V, (1, 11)), torch.randint(0, V, (1, 6))
    verify_cache, chunk_cache = _prefilled(model, ctx, g + 1), _prefilled(model, pre, 11)
    first_cache = M.make_cache("prealloc", model.config, 1, 0, 6, torch.float32, "cpu")
    packed = P.packed_cache(model.config, b + 2, 40, torch.float32, "cpu")
    for r in range(b):
        _copy_in(packed, verify_cache, r, c, r)
    _copy_in(packed, chunk_cache, b, 7)
    plan = P.PackedPlan.build(torch.full((b,), c), g + 1, [P.Chunk(b, 7, 11), P.Chunk(b + 1, 0, 6)], "cpu")
    logits = P.packed_forward(model, packed, torch.cat([rows.reshape(-1), chunk[0], first[0]]), plan)

    want_rows = _alone(model, verify_cache, rows, c).reshape(b * (g + 1), -1)
    want_chunk = _alone(model, chunk_cache, chunk, 7)[0, -1]
    want_first = _alone(model, first_cache, first, 0)[0, -1]
    assert logits.shape[0] == b * (g + 1) + 2
    assert torch.allclose(logits[:b * (g + 1)], want_rows, atol=ATOL)
    assert torch.allclose(logits[-2], want_chunk, atol=ATOL) and torch.allclose(logits[-1], want_first, atol=ATOL)
    for dst, v, ch, fi in zip(packed.layers, verify_cache.layers, chunk_cache.layers, first_cache.layers):
        assert torch.allclose(dst.kbuf[:b, :, :c + g + 1], v.kbuf[:, :, :c + g + 1], atol=ATOL)
        assert torch.allclose(dst.vbuf[b, :, :18], ch.vbuf[0, :, :18], atol=ATOL)
        assert torch.allclose(dst.kbuf[b + 1, :, :6], fi.kbuf[0, :, :6], atol=ATOL)


def test_verify_rows_of_different_lengths_attend_over_their_own_prefix(model):
    """Rows cached to 9 and 16 positions (the fidelity engine's ragged batch) verify 3 tokens each in one
    packed forward with a chunk: each row's logits equal that row run alone."""
    torch.manual_seed(1)
    V = model.config.vocab_size
    lengths = [9, 16]
    packed = P.packed_cache(model.config, 3, 32, torch.float32, "cpu")
    wants, rows = [], []
    for r, n in enumerate(lengths):
        cache = _prefilled(model, torch.randint(0, V, (1, n)), 3)
        _copy_in(packed, cache, r, n)
        ids = torch.randint(0, V, (1, 3))
        rows.append(ids[0])
        wants.append(_alone(model, cache, ids, n)[0])
    chunk = torch.randint(0, V, (5,))
    plan = P.PackedPlan.build(torch.tensor(lengths), 3, [P.Chunk(2, 0, 5)], "cpu")
    logits = P.packed_forward(model, packed, torch.cat(rows + [chunk]), plan)
    assert torch.allclose(logits[:3], wants[0], atol=ATOL) and torch.allclose(logits[3:6], wants[1], atol=ATOL)


def test_mixed_grid_defaults_come_from_the_step_grid():
    grid = Grid(batches=[1, 2, 4, 8, 16, 32], gammas=[0, 1, 2, 4, 8], contexts=[128, 1024, 2048],
                prefill_lengths=[32, 128, 512, 1024], prefill_batches=[1])
    m = MixedGrid.from_cfg(None, grid)
    assert (m.batches, m.gammas, m.contexts) == ([1, 8, 32], [0, 4], [1024])
    assert (m.chunk_tokens, m.chunk_prefixes, m.models) == ([32, 128, 512], [0, 512], ["draft", "target"])
    pts = m.points()
    assert len(pts) == 3 * 3 * 2 * (2 + 1)  # batches × chunk lengths × prefixes × (two γ on the target, the draft)
    assert MixedPoint("target", 8, 5, 1024, 128, 512) in pts and MixedPoint("draft", 8, 1, 1024, 128, 512) in pts
    with pytest.raises(ValueError, match=r"mixed\.chunk_tokens = \[0\]"):
        MixedGrid.from_cfg({"chunk_tokens": [0]}, grid)
