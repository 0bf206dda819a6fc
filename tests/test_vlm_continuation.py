"""What a pruned prefill leaves for the steps after it (patches/vlm.py ``compact`` and
``CompactedPrefill.check_continues``), on position layouts written here: the language model's own 1-D positions
(LLaVA), Qwen's 3-row M-RoPE positions, generate's 4-row layout (the 1-D text positions, then the three M-RoPE
axes) and the single row of text positions plus the rope delta that Qwen's generate gives a continued cache.
The end-to-end tests (test_vlm_generate.py, test_qwen_review.py) reach these through generate, where every
continuation of a pruned cache is wrong and refused; here a right one must pass, and each layout must be read
by its own row."""
from __future__ import annotations

import pytest
import torch
from tokenprune.patches.vlm import CompactedPrefill, Compaction, compact

KEPT, LENGTH = 5, 9  # a prompt of 9 positions, 5 kept by the pruned prefill


def prefill(next_positions) -> CompactedPrefill:
    batch = torch.as_tensor(next_positions).shape[-1]
    return CompactedPrefill(mask=torch.ones(batch, KEPT, dtype=torch.long), length=LENGTH, shift=None,
                            next=torch.as_tensor(next_positions))


def step(first: list[int], rows: int | None, new: int = 3) -> torch.Tensor:
    """Positions of ``new`` tokens starting at ``first`` (one per sample): (B, new), or (rows, B, new)."""
    positions = torch.as_tensor(first)[:, None] + torch.arange(new)
    return positions if rows is None else positions.expand(rows, -1, -1).clone()


def refused(note: CompactedPrefill, positions: torch.Tensor, past: int) -> bool:
    try:
        note.check_continues(positions, past)
    except ValueError as error:
        assert f"({KEPT} of {LENGTH} prompt positions kept)" in str(error)
        return True
    return False


@pytest.mark.parametrize("past", [KEPT, KEPT + 2])  # the first decode step, or two tokens later
def test_one_d_positions_continue_after_the_prompt(past):
    note = prefill([9, 7])  # LLaVA: each sample's next 1-D position (left padding: the second is shorter)
    after = past - KEPT
    assert not refused(note, step([9 + after, 7 + after], None), past)
    assert refused(note, step([9 + after - 4, 7 + after], None), past)  # a prompt token fed again


def test_generate_s_four_rows_are_checked_on_their_text_row():
    note = prefill([[9, 8], [6, 4], [6, 4], [6, 4]])  # text positions 9 / 8, the M-RoPE axes 6 / 4
    assert not refused(note, step([9, 8], 4), KEPT)
    assert refused(note, step([6, 4], 4), KEPT)  # the M-RoPE values are not the text row's


@pytest.mark.parametrize("rows", [3, 4])
def test_qwen_s_continued_cache_row_is_text_positions_plus_the_rope_delta(rows):
    """One row of positions (Qwen's generate continuing a cache): compared with the M-RoPE axes' next
    position, every axis the same after the prefill, whichever layout the prefill had."""
    axes = [[6, 4]] * 3
    note = prefill(([[9, 8]] if rows == 4 else []) + axes)
    assert not refused(note, step([6, 4], 1), KEPT)
    assert refused(note, step([9, 8], 1), KEPT)  # the text row is not what this row continues
    assert refused(note, step([6, 5], 1), KEPT)  # each sample its own


def test_a_one_d_next_position_is_read_per_sample_in_every_layout():
    note = prefill([9, 7])
    assert not refused(note, step([9, 7], 1), KEPT)
    assert refused(note, step([9, 9], 1), KEPT)


def test_layouts_that_name_no_text_row_are_not_checked():
    """Qwen's own 3-row M-RoPE positions have no text row; a 1-D step beside an M-RoPE prefill, or a batch of
    another size, cannot be compared: none of these is refused (nor fails)."""
    assert not refused(prefill([[6, 4]] * 3), step([0, 0], 3), KEPT)
    assert not refused(prefill([[6, 4]] * 3), step([0, 0], None), KEPT)
    assert not refused(prefill([9, 7]), step([0, 0, 0], None), KEPT)
    assert not refused(prefill([[9, 7]] * 4), step([0, 0, 0], 4), KEPT)


def test_compact_continues_every_m_rope_axis_after_the_largest_and_text_after_its_own():
    """After a prefill whose prompt ends in image tokens, generate's 4-row layout: the text row continues after
    its own largest position, each M-RoPE axis after the largest position of any axis (Qwen's rope delta)."""
    batch, length = 2, 6
    text = torch.arange(length).expand(batch, -1)
    t = torch.tensor([[0, 1, 2, 2, 2, 2], [0, 1, 2, 2, 2, 2]])
    h = torch.tensor([[0, 1, 2, 2, 3, 3], [0, 1, 2, 2, 3, 3]])
    w = torch.tensor([[0, 1, 2, 3, 2, 4], [0, 1, 2, 3, 2, 3]])
    keep = torch.tensor([[1, 1, 1, 0, 1, 0], [1, 1, 0, 1, 1, 1]], dtype=torch.bool)
    for layout, expected in ((torch.stack([text, t, h, w]), [[6, 6], [5, 4], [5, 4], [5, 4]]),
                             (torch.stack([t, h, w]), [[5, 4], [5, 4], [5, 4]])):
        kwargs = dict(inputs_embeds=torch.randn(batch, length, 4), attention_mask=torch.ones(batch, length),
                      position_ids=layout)
        note = compact(kwargs, Compaction(keep=keep, positions="original"))
        assert note.next.tolist() == expected
        assert note.mask.shape == (batch, 5) and kwargs["position_ids"].shape == (layout.shape[0], batch, 5)
