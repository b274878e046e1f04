"""Host-drawn augmentation decisions (pipelines.decisions) and image sizes from header bytes
(pipelines.headers): a pure function of (seed, rank, epoch, batch), torchvision's crop windows, the
sizes a decoder outputs."""

from __future__ import annotations

import io
import math

import numpy as np
import pytest
import torch
from fastse.pipelines import recipes
from fastse.pipelines.decisions import batch_rng, draw_batch, view_keys
from fastse.pipelines.headers import decoded_shape
from PIL import Image


def test_decisions_are_a_pure_function_of_seed_rank_epoch_batch():
    shapes = np.array([[375, 500], [500, 333], [32, 32], [1000, 40]] * 16)
    recipe = recipes.fixmatch(32)

    def tables(*key):
        return [t for t, _ in draw_batch(recipe, batch_rng(*key), shapes)]

    a = tables(0, 0, 3, 7)
    assert all(np.array_equal(x, y) for x, y in zip(a, tables(0, 0, 3, 7)))
    for other in ((1, 0, 3, 7), (0, 1, 3, 7), (0, 0, 4, 7), (0, 0, 3, 8)):
        assert not np.array_equal(a[1], tables(*other)[1]), other
    for table, view in zip(a, recipe.views):
        assert table.dtype == np.float32 and table.shape == (64, len(view_keys(view)))


def test_every_recipe_draws_the_values_its_views_name():
    shapes = np.array([[300, 400]] * 8)
    for name in recipes.RECIPES:
        recipe = recipes.get_recipe(name, 224)
        for (table, named), view in zip(draw_batch(recipe, batch_rng(0, 0, 0, 0), shapes), recipe.views):
            assert tuple(named) == view_keys(view) and table.shape == (8, len(named))
            assert all(np.isfinite(v).all() for v in named.values())


def test_crop_windows_follow_torchvision_random_resized_crop():
    from torchvision.transforms import RandomResizedCrop

    n, (h, w) = 4000, (375, 500)
    op = recipes.byol(224).views[0].ops[0]
    (_, ours), = draw_batch(recipes.Recipe("crop", (recipes.View((op,)),), 224), batch_rng(0, 0, 0, 0),
                            np.array([[h, w]] * n))
    y0, x0, y1, x1 = (ours[k].astype(np.float64) for k in ("crop_y0", "crop_x0", "crop_y1", "crop_x1"))
    assert (0 <= y0).all() and (y0 < y1).all() and (y1 <= 1).all() and (0 <= x0).all() and (x0 < x1).all()
    assert (x1 <= 1).all()
    ch, cw = np.rint((y1 - y0) * h), np.rint((x1 - x0) * w)  # whole pixels, as torchvision's
    assert np.allclose((y1 - y0) * h, ch, atol=1e-3) and np.allclose((x1 - x0) * w, cw, atol=1e-3)
    area = ch * cw / (h * w)
    assert area.min() >= 0.08 - 0.01 and area.max() <= 1
    assert (np.abs(np.log(cw / ch)) <= math.log(4 / 3) + 0.02).all()
    torch.manual_seed(0)
    theirs = np.array([RandomResizedCrop.get_params(torch.empty(3, h, w), [0.08, 1.0], [3 / 4, 4 / 3])
                       for _ in range(n)], dtype=np.float64)  # (top, left, height, width)
    their_area = theirs[:, 2] * theirs[:, 3] / (h * w)
    assert abs(area.mean() - their_area.mean()) < 0.02 and abs(np.median(area) - np.median(their_area)) < 0.03
    assert abs(np.mean(y0 + y1) / 2 - np.mean((theirs[:, 0] + theirs[:, 2] / 2) / h)) < 0.02  # centred windows


def test_crop_of_an_extreme_aspect_image_falls_back_to_the_clamped_centre_crop():
    op = recipes.linear(224).views[0].ops[0]
    (_, named), = draw_batch(recipes.Recipe("crop", (recipes.View((op,)),), 224), batch_rng(0, 0, 0, 0),
                             np.array([[20, 2000]] * 16))
    width = (named["crop_x1"] - named["crop_x0"]) * 2000
    assert np.allclose(width, 20 * 4 / 3, atol=0.6)  # no window of area >= 8 % fits: the 4:3 centre crop
    assert np.allclose(named["crop_y0"], 0) and np.allclose(named["crop_y1"], 1)


def _jpeg(size, mode="RGB", orientation=None) -> bytes:
    out = io.BytesIO()
    image = Image.new(mode, size)
    exif = None
    if orientation is not None:
        exif = Image.Exif()
        exif[0x0112] = orientation
    image.save(out, "JPEG", **({"exif": exif} if exif is not None else {}))
    return out.getvalue()


@pytest.mark.parametrize("mode", ["RGB", "L", "CMYK"])
def test_header_sizes_of_jpegs_and_exif_rotations(mode):
    assert decoded_shape(_jpeg((500, 375), mode)) == (375, 500)
    assert decoded_shape(np.frombuffer(_jpeg((500, 375), mode), np.uint8)) == (375, 500)
    for orientation, shape in ((1, (375, 500)), (3, (375, 500)), (6, (500, 375)), (8, (500, 375))):
        data = _jpeg((500, 375), mode, orientation)
        assert decoded_shape(data) == shape
        with Image.open(io.BytesIO(data)) as im:  # as PIL turns it upright
            from PIL import ImageOps

            assert ImageOps.exif_transpose(im).size[::-1] == shape


def test_header_sizes_of_png_and_errors(tmp_path):
    out = io.BytesIO()
    Image.new("RGB", (40, 30)).save(out, "PNG")
    assert decoded_shape(out.getvalue()) == (30, 40)
    with pytest.raises(ValueError, match="bad.JPEG: cannot read the image size"):
        decoded_shape(b"\xff\xd8\xff\xe0\x00\x10JFIF", "bad.JPEG")
    with pytest.raises(ValueError, match="x.bin"):
        decoded_shape(b"not an image at all", "x.bin")
