"""render: a PNG with one row of mask panels per site, in known colours."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from matplotlib import image
from matplotlib.colors import to_rgb
from scipy import ndimage

from autodropout import Pattern, render
from autodropout.patterns.figures import DROPPED_COLOUR, KEPT_COLOUR

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def whole_map(rotate: float) -> dict:
    """A 32 x 32 rectangle on a 32 x 32 map: its only offset is 0, so the mask is fixed."""
    return dict(size_h=32, size_w=32, stride=1, repeat=1, rotate=rotate, shear_x=0.0,
                shear_y=0.0, share_c=True, residual=False)


def colour_mask(pixels: np.ndarray, colour: str) -> np.ndarray:
    return (np.abs(pixels[..., :3] - np.array(to_rgb(colour))) < 0.02).all(-1)


def test_render_draws_one_row_per_site_with_known_dropped_regions(tmp_path):
    # Site 0 turns the whole-map square by 45 degrees: its corners leave the map, so the
    # panel shows a red octagon with grey corners; site 1 drops the whole map.
    pattern = Pattern("conv", [whole_map(45.0), whole_map(0.0)])
    path = render(pattern, (2, 32, 32), tmp_path / "pattern.png", examples=3)
    assert path == tmp_path / "pattern.png"
    assert path.read_bytes()[:8] == PNG_MAGIC
    pixels = image.imread(path)

    labels, count = ndimage.label(colour_mask(pixels, DROPPED_COLOUR))
    assert count == 6
    boxes = sorted(ndimage.find_objects(labels), key=lambda box: (box[0].start, box[1].start))
    tops = sorted({box[0].start for box in boxes})
    assert len(tops) == 2 and tops[1] - tops[0] > 50  # two rows, three panels each
    kept = colour_mask(pixels, KEPT_COLOUR)
    for index, (rows, cols) in enumerate(boxes):
        corners = [(rows.start + 2, cols.start + 2), (rows.stop - 3, cols.stop - 3)]
        centre = ((rows.start + rows.stop) // 2, (cols.start + cols.stop) // 2)
        assert labels[centre] == labels[rows.start + 2, (cols.start + cols.stop) // 2]
        if index < 3:  # octagon: corners kept
            assert all(kept[corner] for corner in corners)
            assert labels[centre] > 0
        else:  # full square: corners dropped
            assert all(labels[corner] > 0 for corner in corners)
            assert not kept[rows, cols].any()


def test_render_sequence_patterns_and_leaves_the_global_rng_alone(tmp_path):
    pattern = Pattern("sequence", [dict(size=4, stride=16, repeat="fill", axis="tokens",
                                        share=False, apply_to=["ffn_hidden"])])
    state = torch.get_rng_state()
    first = image.imread(render(pattern, (64, 32), tmp_path / "a.png", seed=3))
    assert torch.equal(torch.get_rng_state(), state)
    assert colour_mask(first, DROPPED_COLOUR).any() and colour_mask(first, KEPT_COLOUR).any()
    again = image.imread(render(pattern, (64, 32), tmp_path / "b.png", seed=3))
    other = image.imread(render(pattern, (64, 32), tmp_path / "c.png", seed=4))
    assert np.array_equal(first, again) and not np.array_equal(first, other)


@pytest.mark.parametrize("shape", [(32, 32), (3, 0, 32), "3x32x32", (3, 32.0, 32)])
def test_bad_shape_is_rejected(tmp_path, shape):
    pattern = Pattern("conv", [whole_map(0.0)])
    with pytest.raises(ValueError, match="shape"):
        render(pattern, shape, tmp_path / "bad.png")
    assert not (tmp_path / "bad.png").exists()


def test_bad_examples_is_rejected(tmp_path):
    with pytest.raises(ValueError, match="examples"):
        render(Pattern("conv", [whole_map(0.0)]), (1, 8, 8), tmp_path / "bad.png", examples=0)


@pytest.mark.parametrize(
    ("kind", "shape", "text"),
    [("conv", (3, 28, 20), "28x20 map, 3 channels"), ("conv", (1, 7, 7), "7x7 map, 1 channel"),
     ("sequence", (16, 32), "16 tokens x 32 features")],
)
def test_the_title_names_the_map_size_it_was_drawn_for(kind, shape, text):
    from autodropout.patterns import figures

    site = whole_map(0.0) if kind == "conv" else dict(
        size=4, stride=16, repeat="fill", axis="tokens", share=False, apply_to=["ffn_hidden"])
    pattern = Pattern(kind, [site])
    figure = figures._figure(pattern, figures._masks(pattern, shape, 2, 0), shape)
    assert f"on a {text}:" in figure.get_suptitle()
