"""The prompt side of images (spec/model.md §9.5-9.6): image-pad expansion, image rows into the
embeddings, and the 3-D mRoPE positions transformers' get_rope_index gives.

A prompt holds one run of image-pad tokens per image (normally `<|vision_start|><|image_pad|>
<|vision_end|>` from the chat template). `expand_image_pads` makes each run as long as the image's
merged-token count; `mrope_positions` gives every token its (temporal, height, width) position and
the `rope_delta` that every later token's position is offset by:

    decode position of the token at cache length s  =  s + rope_delta   (three equal rows)

Video (frames as temporal patches) is handled as transformers does: a video grid (t, h, w) is t
frames of (1, h, w), each its own run of video-pad tokens (Qwen3.5 puts a timestamp between them).
"""
from __future__ import annotations

from typing import Sequence

import numpy as np

from ref.layers import text_positions

Grid = tuple[int, int, int]


def pad_runs(ids: Sequence[int], token_id: int) -> list[tuple[int, int]]:
    """[start, end) of every maximal run of `token_id` in ids."""
    a = np.asarray(ids)
    hit = np.concatenate([[False], a == token_id, [False]])
    edges = np.flatnonzero(hit[1:] != hit[:-1])
    return [(int(lo), int(hi)) for lo, hi in zip(edges[::2], edges[1::2])]


def merged_counts(grids: Sequence[Grid], merge_size: int) -> list[int]:
    """Merged tokens (image-pad tokens) per grid: t * (h/m) * (w/m)."""
    return [t * (h // merge_size) * (w // merge_size) for t, h, w in grids]


def expand_image_pads(ids: Sequence[int], counts: Sequence[int], image_token_id: int,
                      names: Sequence[str] = ()) -> list[int]:
    """Each run of image-pad tokens, in order, becomes counts[i] pads: a single pad is expanded, a run
    of exactly counts[i] is kept. ValueError names the image (1-based, and names[i] when given) and
    both counts, or the number of runs and images when they differ."""
    ids = [int(i) for i in ids]
    runs = pad_runs(ids, image_token_id)
    if len(runs) != len(counts):
        raise ValueError(f"the prompt has {len(runs)} image placeholder(s) but {len(counts)} image(s) were given")
    out, prev = [], 0
    for i, ((lo, hi), n) in enumerate(zip(runs, counts)):
        if hi - lo not in (1, n):
            name = f" ({names[i]})" if i < len(names) else ""
            raise ValueError(f"image {i + 1} of {len(counts)}{name}: the prompt has {hi - lo} image-pad tokens for "
                             f"it but the image is {n} tokens")
        out += ids[prev:lo] + [image_token_id] * n
        prev = hi
    return out + ids[prev:]


def scatter_image_rows(embeds: np.ndarray, ids: Sequence[int], image_token_id: int,
                       image_embeds: np.ndarray) -> np.ndarray:
    """The embeddings [T, H] with the image-pad rows replaced, in order, by the encoder's merged rows
    [M, H] (cast to the embeddings' dtype). ValueError unless there are exactly M image-pad tokens."""
    rows = np.flatnonzero(np.asarray(ids) == image_token_id)
    if len(rows) != len(image_embeds):
        raise ValueError(f"the prompt has {len(rows)} image-pad tokens but the images give {len(image_embeds)} rows")
    out = embeds.copy()
    out[rows] = image_embeds.astype(embeds.dtype, copy=False)
    return out


def vision_positions(start: int, grid: Grid, merge_size: int) -> np.ndarray:
    """Positions [3, t*(h/m)*(w/m)] of one image's (or frame's) merged tokens in raster order:
    (start + frame, start + row, start + column)."""
    t, h, w = grid[0], grid[1] // merge_size, grid[2] // merge_size
    tt, hh, ww = np.meshgrid(np.arange(t), np.arange(h), np.arange(w), indexing="ij")
    return start + np.stack([tt, hh, ww]).reshape(3, -1)


def mrope_positions(ids: Sequence[int], image_token_id: int, image_grids: Sequence[Grid], merge_size: int,
                    video_token_id: int | None = None, video_grids: Sequence[Grid] = ()) -> tuple[np.ndarray, int]:
    """transformers' get_rope_index for one sequence -> (positions [3, T] int64, rope_delta).

    Text tokens take three equal rows, counting on from the previous token. Each run of image-pad
    (video-pad) tokens takes the next grid (videos split into frames of t = 1) and the positions of
    vision_positions(current, grid); the text after it continues at current + max(h, w) / m. rope_delta
    = max(positions) + 1 - T. ValueError if a run's length or the number of runs does not match."""
    ids = np.asarray(ids, np.int64)
    if ids.ndim != 1 or ids.size == 0:
        raise ValueError("token ids must be a non-empty 1-D sequence")
    queues = {image_token_id: (list(image_grids), "image")}
    if video_token_id is not None:
        queues[video_token_id] = ([(1, h, w) for t, h, w in video_grids for _ in range(t)], "video frame")
    elif video_grids:
        raise ValueError("video grids were given without a video_token_id")
    kinds = np.zeros(len(ids), np.int64)                 # 0 text, else the pad token of the run
    for token in queues:
        kinds[ids == token] = token
    bounds = np.flatnonzero(np.diff(kinds)) + 1
    parts, current, used = [], 0, dict.fromkeys(queues, 0)
    for lo, hi in zip(np.concatenate([[0], bounds]), np.concatenate([bounds, [len(ids)]])):
        token = int(kinds[lo])
        if token == 0:
            parts.append(text_positions(current, hi - lo))
            current += hi - lo
            continue
        grids, what = queues[token]
        if used[token] >= len(grids):
            raise ValueError(f"the prompt has more {what} placeholders than the {len(grids)} {what}(s) given")
        grid = grids[used[token]]
        used[token] += 1
        n = merged_counts([grid], merge_size)[0]
        if hi - lo != n:
            raise ValueError(f"{what} {used[token]} of {len(grids)}: the prompt has {hi - lo} pad tokens for it "
                             f"but its grid {tuple(grid)} is {n} tokens")
        parts.append(vision_positions(current, grid, merge_size))
        current += max(grid[1], grid[2]) // merge_size
    for token, (grids, what) in queues.items():
        if used[token] != len(grids):
            raise ValueError(f"{len(grids)} {what}(s) were given but the prompt has {used[token]} placeholder(s)")
    positions = np.concatenate(parts, axis=1).astype(np.int64)
    return positions, int(positions.max()) + 1 - len(ids)


def user_message(text: str, n_images: int = 0) -> dict:
    """One user turn for a chat template: the text alone, or the images' content parts (in order)
    followed by the text, as OpenAI-style chat requests put them; the Qwen3.5 template writes each
    {"type": "image"} part as <|vision_start|><|image_pad|><|vision_end|>."""
    if not n_images:
        return {"role": "user", "content": text}
    return {"role": "user", "content": [{"type": "image"}] * n_images + [{"type": "text", "text": text}]}


def positions_after(start: int, T: int, rope_delta: int) -> np.ndarray:
    """Positions [3, T] of T tokens that follow `start` cached tokens of a prompt whose mRoPE gave
    rope_delta (decode steps, speculative drafts, continued prefills): start + rope_delta + i."""
    return text_positions(start + rope_delta, T)
