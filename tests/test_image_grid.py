"""The validation image grid: cell layout for mixed image sizes, captions under their own image, PNG output."""
import numpy as np
import pytest
from PIL import Image

from megatron_qwen_image.image_grid import ELLIPSIS, caption_font, image_grid, save_png, wrap_caption

# Saturated colours: anti-aliased black-on-white text only makes greys, so each colour marks one image.
COLOURS = [(255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 0, 255), (0, 255, 255)]


def _solid(w, h, colour):
    return Image.new("RGB", (w, h), colour)


def _bbox(grid, colour):
    """(left, top, right, bottom), exclusive, of the pixels of `colour`; asserts they fill that box."""
    a = np.asarray(grid)
    ys, xs = np.nonzero(np.all(a == colour, axis=-1))
    assert ys.size, f"colour {colour} is not in the grid"
    box = (xs.min(), ys.min(), xs.max() + 1, ys.max() + 1)
    assert ys.size == (box[2] - box[0]) * (box[3] - box[1]), "an image was cut or covered"
    return box


def test_mixed_sizes_centred_in_equal_cells_row_major():
    sizes = [(64, 64), (32, 48), (64, 32), (48, 16), (16, 64)]
    images = [_solid(w, h, c) for (w, h), c in zip(sizes, COLOURS)]
    grid = image_grid(images, [f"image {i}" for i in range(5)])  # 5 images -> ceil(sqrt(5)) = 3 columns
    boxes = [_bbox(grid, c) for c in COLOURS]
    for (w, h), (l, t, r, b) in zip(sizes, boxes):
        assert (r - l, b - t) == (w, h)
    cx = [(l + r) / 2 for l, _, r, _ in boxes]
    cy = [(t + b) / 2 for _, t, _, b in boxes]
    # Row-major 3 columns: images 0-2 on the first row, 3-4 below; each centred in an equal cell.
    assert cy[0] == pytest.approx(cy[1], abs=1) == pytest.approx(cy[2], abs=1)
    assert cy[3] == pytest.approx(cy[4], abs=1) and cy[3] > boxes[0][3]
    assert cx[0] == pytest.approx(cx[3], abs=1) and cx[1] == pytest.approx(cx[4], abs=1)
    assert cx[0] < cx[1] < cx[2]
    assert cx[1] - cx[0] == pytest.approx(cx[2] - cx[1], abs=1)
    assert grid.mode == "RGB" and grid.getpixel((0, 0)) == (255, 255, 255)


def test_explicit_columns_and_caption_lines_shape_the_grid():
    images = [_solid(32, 32, c) for c in COLOURS[:3]]
    column = image_grid(images, ["a"] * 3, columns=1)
    boxes = [_bbox(column, c) for c in COLOURS[:3]]
    assert boxes[0][0] == boxes[1][0] == boxes[2][0]
    assert boxes[0][3] < boxes[1][1] and boxes[1][3] < boxes[2][1]
    assert image_grid(images, ["a"] * 3, columns=10).size == image_grid(images, ["a"] * 3, columns=3).size
    one_line = image_grid(images, ["a"] * 3, columns=3, caption_lines=1)
    three_lines = image_grid(images, ["a"] * 3, columns=3, caption_lines=3)
    assert one_line.width == three_lines.width and one_line.height < three_lines.height


def test_caption_is_drawn_under_its_own_image_only():
    images = [_solid(64, 64, c) for c in COLOURS[:3]]
    blank = image_grid(images, ["", "", ""], columns=3)
    captioned = image_grid(images, ["", "a red cat on a mat", ""], columns=3)
    assert blank.size == captioned.size
    ys, xs = np.nonzero(np.any(np.asarray(blank) != np.asarray(captioned), axis=-1))
    assert ys.size > 0, "the caption changed no pixels"
    left, middle, right = (_bbox(captioned, c) for c in COLOURS[:3])
    assert ys.min() >= middle[3], "the caption must lie below the images"
    assert xs.min() >= left[2] and xs.max() < right[0], "the caption must stay in its own cell"
    assert np.asarray(captioned)[ys, xs].min() < 100, "text is dark on the white background"


def test_wrap_caption_fits_and_truncates_with_ellipsis():
    font = caption_font(160)
    long = "a very long caption about a red cat sitting on a blue mat under a yellow sun " * 4
    lines = wrap_caption(long, font, 160, 2)
    assert len(lines) == 2 and lines[-1].endswith(ELLIPSIS)
    assert all(font.getlength(line) <= 160 for line in lines)
    assert wrap_caption("a cat", font, 160, 3) == ["a cat"]
    wide = wrap_caption("WWWW MMMM WWWW MMMM", font, 60, 5)  # wider letters than the width estimate assumes
    assert "".join(wide).replace(" ", "") == "WWWWMMMMWWWWMMMM"
    assert all(font.getlength(line) <= 60 for line in wide)


def test_font_grows_with_cell_width():
    assert caption_font(64).size >= 12
    assert caption_font(1328).size > 2 * caption_font(160).size


def test_refuses_bad_arguments():
    im = _solid(16, 16, COLOURS[0])
    with pytest.raises(ValueError, match="1 images but 2 captions"):
        image_grid([im], ["a", "b"])
    with pytest.raises(ValueError, match="at least one image"):
        image_grid([], [])
    with pytest.raises(ValueError, match="columns"):
        image_grid([im], ["a"], columns=0)


def test_save_png_creates_directory_atomically(tmp_path):
    grid = image_grid([_solid(32, 16, COLOURS[0]), _solid(16, 32, COLOURS[1])], ["one", "two"])
    path = tmp_path / "samples" / "step_100" / "grid.png"
    save_png(grid, str(path))
    assert sorted(p.name for p in path.parent.iterdir()) == ["grid.png"]  # no temp file left behind
    with Image.open(path) as back:
        assert back.format == "PNG" and np.array_equal(np.asarray(back), np.asarray(grid))
    save_png(image_grid([_solid(16, 16, COLOURS[2])], ["three"]), str(path))  # replaces the old one
    with Image.open(path) as back:
        assert _bbox(back.convert("RGB"), COLOURS[2])
