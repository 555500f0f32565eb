"""ref.image_prompt: image-pad expansion, image rows into the embeddings, and the 3-D mRoPE positions
against hand-worked cases and transformers' own get_rope_index (spec/vectors/vision_hf/rope_index_*)."""
from pathlib import Path

import numpy as np
import pytest

from ref.image_prompt import expand_image_pads, merged_counts, mrope_positions, pad_runs, positions_after, \
    scatter_image_rows
from ref.layer_vectors import read

HF_DIR = Path(__file__).resolve().parent.parent / "spec" / "vectors" / "vision_hf"
S, I, E, V = 248053, 248056, 248054, 248057  # vision start, image pad, vision end, video pad


def test_one_image_hand_worked():
    ids = expand_image_pads([10, 11, S, I, E, 12], [6], I)        # grid (1, 4, 6): 2 x 3 merged tokens
    assert ids == [10, 11, S] + [I] * 6 + [E, 12]
    pos, delta = mrope_positions(ids, I, [(1, 4, 6)], 2)
    assert pos.tolist() == [[0, 1, 2, 3, 3, 3, 3, 3, 3, 6, 7],    # temporal: the image sits at 3
                            [0, 1, 2, 3, 3, 3, 4, 4, 4, 6, 7],    # rows 3, 4
                            [0, 1, 2, 3, 4, 5, 3, 4, 5, 6, 7]]    # columns 3, 4, 5; then 3 + max(2, 3) = 6
    assert delta == 7 + 1 - 11


def test_two_images_with_text_between_hand_worked():
    ids = expand_image_pads([S, I, E, 20, 21, S, I, E], merged_counts([(1, 4, 4), (1, 2, 6)], 2), I)
    pos, delta = mrope_positions(ids, I, [(1, 4, 4), (1, 2, 6)], 2)
    assert pos.tolist() == [[0, 1, 1, 1, 1, 3, 4, 5, 6, 7, 7, 7, 10],
                            [0, 1, 1, 2, 2, 3, 4, 5, 6, 7, 7, 7, 10],
                            [0, 1, 2, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10]]
    assert delta == -2
    # the token after the prompt continues at max + 1, every later one at cache length + delta
    assert positions_after(len(ids), 3, delta).tolist() == [[11, 12, 13]] * 3


def test_text_only_is_plain_positions():
    pos, delta = mrope_positions([5, 6, 7, 8], I, [], 2)
    assert pos.tolist() == [[0, 1, 2, 3]] * 3 and delta == 0


@pytest.mark.parametrize("path", sorted(HF_DIR.glob("rope_index_*.safetensors")), ids=lambda p: p.stem)
def test_equals_transformers_get_rope_index(path):
    fn, a, s, o = read(path)
    grids = lambda k: [tuple(int(v) for v in g) for g in a.get(k, np.zeros((0, 3), int))]
    pos, delta = mrope_positions(a["input_ids"], s["image_token_id"], grids("image_grid_thw"), s["spatial_merge_size"],
                                 s["video_token_id"], grids("video_grid_thw"))
    assert np.array_equal(pos, o["positions"]) and delta == int(o["rope_delta"][0])


def test_already_expanded_runs_are_kept():
    once = expand_image_pads([1, S, I, E, 2, S, I, E], [4, 1], I)
    assert once == [1, S, I, I, I, I, E, 2, S, I, E]
    assert expand_image_pads(once, [4, 1], I) == once
    assert pad_runs(once, I) == [(2, 6), (9, 10)]


def test_expansion_errors_name_the_image_and_counts():
    with pytest.raises(ValueError, match="^image 2 of 2: the prompt has 3 image-pad tokens for it but the image is 6 "):
        expand_image_pads([S, I, E, S, I, I, I, E], [4, 6], I)
    with pytest.raises(ValueError, match="the prompt has 2 image placeholder\\(s\\) but 1 image\\(s\\) were given"):
        expand_image_pads([S, I, E, S, I, E], [4], I)
    with pytest.raises(ValueError, match="the prompt has 0 image placeholder\\(s\\) but 1 image"):
        expand_image_pads([1, 2], [4], I)


def test_position_errors():
    with pytest.raises(ValueError, match="image 1 of 1: the prompt has 1 pad tokens for it but its grid \\(1, 4, 4\\)"):
        mrope_positions([S, I, E], I, [(1, 4, 4)], 2)          # not expanded
    with pytest.raises(ValueError, match="more image placeholders than the 1 image"):
        mrope_positions([I, 1, I], I, [(1, 2, 2)], 2)
    with pytest.raises(ValueError, match="2 image\\(s\\) were given but the prompt has 1"):
        mrope_positions([I, 1], I, [(1, 2, 2), (1, 2, 2)], 2)


def test_video_frames_each_take_a_grid_of_one_frame():
    ids = [7, S] + [V] * 4 + [E, 8, S] + [V] * 4 + [E]
    pos, delta = mrope_positions(ids, I, [], 2, V, [(2, 4, 4)])
    assert pos[:, 2:6].tolist() == [[2, 2, 2, 2], [2, 2, 3, 3], [2, 3, 2, 3]]
    assert pos[:, 9:13].tolist() == [[7, 7, 7, 7], [7, 7, 8, 8], [7, 8, 7, 8]]  # the second frame starts anew
    assert delta == int(pos.max()) + 1 - len(ids)


def test_scatter_image_rows():
    ids = [1, I, I, 2, I]
    embeds = np.arange(10.0).reshape(5, 2)
    rows = -np.arange(6.0).reshape(3, 2)
    out = scatter_image_rows(embeds, ids, I, rows)
    assert out.tolist() == [[0, 1], [0, -1], [-2, -3], [6, 7], [-4, -5]] and embeds[1].tolist() == [2, 3]
    with pytest.raises(ValueError, match="the prompt has 3 image-pad tokens but the images give 2 rows"):
        scatter_image_rows(embeds, ids, I, rows[:2])
