"""The batched tensor backend: each op against torchvision, the recorded per-sample decisions against the
pixels, each recipe's rates over 2,000 real CIFAR-10 images, and TensorLoader's epochs, shards and seeds."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torchvision.transforms.v2.functional as TF
from fastse.pipelines import tensor_backend as tb
from fastse.pipelines.recipes import RANDAUGMENT_POOL, RANDAUGMENT_RANGES, Op, Recipe, View, get_recipe
from PIL import Image
from torchvision.transforms import InterpolationMode
from torchvision.transforms.v2 import RandomResizedCrop

N_RATES = 2000
BILINEAR = InterpolationMode.BILINEAR


@pytest.fixture(scope="module")
def cifar(cifar10_dir) -> torch.Tensor:
    """2,000 real CIFAR-10 training images (200 a class), uint8 [N, 32, 32, 3]."""
    files = [f for d in sorted((cifar10_dir / "train").iterdir()) for f in sorted(d.glob("*.jpg"))[:200]]
    return torch.from_numpy(np.stack([np.asarray(Image.open(f).convert("RGB")) for f in files]))


@pytest.fixture(scope="module")
def small(cifar) -> torch.Tensor:
    """64 of them as float NCHW in [0, 1], and synthetic gradients with a flat channel."""
    x = cifar[::31][:60].permute(0, 3, 1, 2) / 255.0
    ramp = torch.linspace(0, 1, 32)
    synth = torch.stack([ramp.expand(32, 32), ramp[:, None].expand(32, 32), torch.full((32, 32), 0.3)])
    return torch.cat([x, synth[None], synth.flip(2)[None], 1 - synth[None], torch.rand(1, 3, 32, 32)])


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _views(images, recipe: Recipe, seed=0, **kw):
    return tb.augment_views(images, recipe.views, size=recipe.size, mean=recipe.mean, std=recipe.std,
                            generator=_gen(seed), return_params=True, **kw)


def _pixels(out: torch.Tensor, recipe: Recipe) -> torch.Tensor:
    """Undo the normalization: back to [0, 1]."""
    mean, std = (torch.tensor(v).view(1, 3, 1, 1) for v in (recipe.mean, recipe.std))
    return out.float() * std + mean


def _one_op(op: Op) -> Recipe:
    return Recipe("one", (View((op,)),), 32, (0.0, 0.0, 0.0), (1.0, 1.0, 1.0))


def _ra(x, name, magnitude, **kw):
    n = len(x)
    ops = torch.full((n, 1), RANDAUGMENT_POOL.index(name))
    return tb.randaugment(x, ops, torch.full((n, 1), float(magnitude)), **kw)


def _close(a, b, atol):
    torch.testing.assert_close(a, b, atol=atol, rtol=0)


# ---------------------------------------------------------------------------- ops vs torchvision


def test_resized_crop_and_flip_match_torchvision(small):
    boxes = torch.tensor([[3.0, 5, 20, 17]]).expand(len(small), 4)
    flip = torch.arange(len(small)) % 2 == 1
    ref = TF.resized_crop(small, 5, 3, 17, 20, [32, 32], interpolation=BILINEAR)
    ref = torch.where(flip[:, None, None, None], TF.horizontal_flip(ref), ref)
    _close(tb.resized_crop(small, boxes, 32, flip), ref, 1e-5)
    full = torch.tensor([[0.0, 0, 32, 32]]).expand(len(small), 4)
    _close(tb.resized_crop(small, full, 32), small, 1e-6)  # the whole image at its own size: identity


def test_translate_reflect_matches_torchvision_pad_and_crop(small):
    u8 = (small * 255).round().to(torch.uint8)
    for dx, dy in [(3, -2), (-4, 4), (0, 0)]:
        ref = TF.crop(TF.pad(u8, [4, 4, 4, 4], padding_mode="reflect"), 4 + dy, 4 + dx, 32, 32)
        shifts = torch.tensor([[dx, dy]]).expand(len(u8), 2)
        assert torch.equal(tb.translate_reflect(u8, shifts), ref)
        flip = torch.ones(len(u8), dtype=torch.bool)
        assert torch.equal(tb.translate_reflect(u8, shifts, flip), TF.horizontal_flip(ref))


@pytest.mark.parametrize("shift", [-0.5, -0.3, -0.05, 0.0, 0.1, 0.25, 0.5])
def test_hue_matches_torchvision(small, shift):
    _close(tb.adjust_hue(small, torch.full((len(small),), shift)), TF.adjust_hue(small, shift), 1e-5)


def test_color_jitter_components_match_torchvision(small):
    # torchvision's grey weights are (0.2989, 0.587, 0.114), ours ITU-R 601's (0.299, ...): 1e-4 apart
    n = len(small)
    for factor in (0.6, 1.4):
        f = torch.full((n,), factor)
        _close(tb.color_jitter(small, brightness=f), TF.adjust_brightness(small, factor), 1e-6)
        _close(tb.color_jitter(small, contrast=f), TF.adjust_contrast(small, factor), 1e-4)
        _close(tb.color_jitter(small, saturation=f), TF.adjust_saturation(small, factor), 1e-4)
    ref = TF.adjust_hue(TF.adjust_saturation(TF.adjust_contrast(TF.adjust_brightness(small, 1.2), 0.7), 1.1), 0.05)
    got = tb.color_jitter(small, *(torch.full((n,), f) for f in (1.2, 0.7, 1.1, 0.05)))
    _close(got, ref, 1e-4)
    _close(tb.luma(small), TF.rgb_to_grayscale(small), 2e-4)


def test_level_ops_match_torchvision(small):
    u8 = (small * 255).round().to(torch.uint8)
    x = u8 / 255.0
    n = len(x)
    for bits in (4, 6, 8):
        assert torch.equal((tb.posterize(x, torch.full((n,), float(bits))) * 255).round().to(torch.uint8),
                           TF.posterize(u8, bits))
    low_contrast = u8 // 4 + 60
    for img in (u8, low_contrast):
        assert torch.equal((tb.equalize(img / 255.0) * 255).round().to(torch.uint8), TF.equalize(img))
    _close(tb.autocontrast(small), TF.autocontrast(small), 1e-6)
    _close(tb.autocontrast(x[:, :, :1, :1].expand(-1, -1, 4, 4)), x[:, :, :1, :1].expand(-1, -1, 4, 4), 0)  # flat
    for threshold in (0.0, 0.5, 0.9):
        _close(tb.solarize(small, threshold), TF.solarize(small, threshold), 0)


def test_gaussian_blur_matches_torchvision(small):
    sigma = torch.linspace(0.1, 2.0, len(small))
    got = tb.gaussian_blur(small, sigma, 9)
    for i in (0, len(small) // 2, len(small) - 1):
        _close(got[i], TF.gaussian_blur(small[i], [9, 9], [sigma[i].item()] * 2), 1e-5)
    mask = torch.arange(len(small)) % 2 == 0
    assert torch.equal(tb.gaussian_blur(small, sigma, 9, mask)[1::2], small[1::2])


def test_randaugment_ops_match_torchvision_and_pil_semantics(small):
    _close(_ra(small, "brightness", 0.3), TF.adjust_brightness(small, 0.3), 1e-6)
    _close(_ra(small, "color", 0.3), TF.adjust_saturation(small, 0.3), 2e-4)
    _close(_ra(small, "contrast", 0.3), TF.adjust_contrast(small, 0.3), 2e-4)
    _close(_ra(small, "sharpness", 0.3), TF.adjust_sharpness(small, 0.3), 1e-5)
    _close(_ra(small, "solarize", 0.3), TF.solarize(small, 0.3), 0)
    _close(_ra(small, "autocontrast", 0), tb.autocontrast(small), 0)
    _close(_ra(small, "equalize", 0), tb.equalize(small), 0)
    _close(_ra(small, "posterize", 5), tb.posterize(small, torch.full((len(small),), 5.0)), 0)
    _close(_ra(small, "identity", 0), small, 0)
    # geometry: torchvision's rotate/affine on tensors follow PIL (rotation about the centre, shear and
    # translation about the top-left corner); compared with black fill, where torchvision blends correctly
    affine = dict(interpolation=BILINEAR, scale=1.0)
    _close(_ra(small, "rotate", 23, fill=0.0), TF.rotate(small, 23, interpolation=BILINEAR), 1e-5)
    shear = math.degrees(math.atan(0.2))
    _close(_ra(small, "shear_x", 0.2, fill=0.0),
           TF.affine(small, angle=0.0, translate=[0, 0], shear=[shear, 0.0], center=[0, 0], **affine), 1e-5)
    _close(_ra(small, "shear_y", -0.2, fill=0.0),
           TF.affine(small, angle=0.0, translate=[0, 0], shear=[0.0, -shear], center=[0, 0], **affine), 1e-5)
    _close(_ra(small, "translate_x", 0.25, fill=0.0),
           TF.affine(small, angle=0.0, translate=[-8, 0], shear=[0.0, 0.0], **affine), 1e-6)
    _close(_ra(small, "translate_y", -0.25, fill=0.0),
           TF.affine(small, angle=0.0, translate=[0, 8], shear=[0.0, 0.0], **affine), 1e-6)
    # the uncovered area is grey; skipped slots leave the image as it is
    assert torch.allclose(_ra(small, "translate_x", 0.3)[..., -9:], torch.tensor(tb.GREY))
    none = torch.full((len(small), 2), -1)
    assert torch.equal(tb.randaugment(small, none, torch.zeros(len(small), 2)), small)


def test_randaugment_slots_apply_in_order(small):
    """Slot 0 then slot 1: solarize after brightness differs from brightness after solarize."""
    sol, bri = RANDAUGMENT_POOL.index("solarize"), RANDAUGMENT_POOL.index("brightness")
    n = len(small)
    got = tb.randaugment(small, torch.tensor([[bri, sol]]).expand(n, 2), torch.tensor([[0.5, 0.4]]).expand(n, 2))
    _close(got, TF.solarize(TF.adjust_brightness(small, 0.5), 0.4), 1e-6)


def test_cutout_clips_at_the_border(small):
    corners = torch.tensor([[-8.0, 20.0]]).expand(len(small), 2)  # centre (0, 28), side 16
    got = tb.cutout(small, corners, 16)
    ref = small.clone()
    ref[:, :, 20:, :8] = tb.GREY
    assert torch.equal(got, ref)


def test_crop_boxes_follow_torchvision_sampling():
    u = torch.rand(N_RATES, 2 * tb.CROP_TRIES + 2, generator=_gen())
    boxes = tb.crop_boxes(u, 32, 48, (0.08, 1.0), (3 / 4, 4 / 3))
    x, y, w, h = boxes.unbind(1)
    assert (x >= 0).all() and (y >= 0).all() and (x + w <= 48).all() and (y + h <= 32).all() and (w >= 1).all()
    assert torch.equal(boxes, boxes.round())
    img = torch.zeros(3, 32, 48)
    torch.manual_seed(0)
    ref = torch.tensor([RandomResizedCrop.get_params(img, [0.08, 1.0], [3 / 4, 4 / 3]) for _ in range(N_RATES)]).float()
    area, ref_area = w * h / (32 * 48), ref[:, 2] * ref[:, 3] / (32 * 48)
    assert abs(area.mean() - ref_area.mean()) < 0.03
    assert abs(area.std() - ref_area.std()) < 0.03
    assert abs((w / h).log().mean() - (ref[:, 3] / ref[:, 2]).log().mean()) < 0.03
    # no candidate can fit: torchvision's central fallback crop
    fallback = tb.crop_boxes(u[:8], 32, 32, (0.99, 1.0), (2.0, 3.0))
    assert torch.equal(fallback, torch.tensor([[0.0, 8, 32, 16]]).expand(8, 4))


# ------------------------------------------------------------- decisions recorded = pixels produced


def test_single_ops_apply_exactly_where_recorded(cifar):
    u8 = cifar[:500]
    x = u8.permute(0, 3, 1, 2) / 255.0
    flat = lambda out: out.float()  # noqa: E731 (identity stats: the output is the [0, 1] image)

    (out,), (p,) = _views(u8, _one_op(Op("solarize", p=0.2, params={"threshold": 0.5})))
    on = p["solarize"]
    assert torch.equal(flat(out)[on], TF.solarize(x[on], 0.5)) and torch.equal(flat(out)[~on], x[~on])

    (out,), (p,) = _views(u8, _one_op(Op("hflip", p=0.5)))
    on = p["hflip"]
    assert torch.equal(flat(out)[on], x[on].flip(3)) and torch.equal(flat(out)[~on], x[~on])

    (out,), (p,) = _views(u8, _one_op(Op("grayscale", p=0.2)))
    on = p["grayscale"]
    _close(flat(out)[on], tb.luma(x[on]).expand(-1, 3, -1, -1), 0)
    assert torch.equal(flat(out)[~on], x[~on])

    jitter = Op("color_jitter", p=0.8, params={"brightness": 0.4, "contrast": 0.4, "saturation": 0.2, "hue": 0.1})
    (out,), (p,) = _views(u8, _one_op(jitter))
    on = p["color_jitter"]
    factors = [p[k][on] for k in ("brightness", "contrast", "saturation", "hue")]
    _close(flat(out)[on], tb.color_jitter(x[on], *factors), 1e-6)
    assert torch.equal(flat(out)[~on], x[~on])
    assert (p["brightness"][~on] == 1).all() and (p["hue"][~on] == 0).all()


def test_geometry_and_randaugment_reproduce_from_recorded_params(cifar):
    u8 = cifar[:300]
    x = u8.permute(0, 3, 1, 2) / 255.0
    fm = get_recipe("fixmatch", 32)
    (weak, strong), (pw, ps) = _views(u8, fm)
    shifts = torch.stack([pw["translate_x"], pw["translate_y"]], 1).long()
    _close(_pixels(weak, fm), tb.translate_reflect(x, shifts, pw["hflip"]), 2e-6)
    shifts = torch.stack([ps["translate_x"], ps["translate_y"]], 1).long()
    ops = torch.stack([ps["randaugment0"], ps["randaugment1"]], 1)
    mags = torch.stack([ps["randaugment0_magnitude"], ps["randaugment1_magnitude"]], 1)
    ref = tb.randaugment(tb.translate_reflect(x, shifts, ps["hflip"]), ops, mags)
    centre = torch.stack([ps["cutout_x"], ps["cutout_y"]], 1)
    _close(_pixels(strong, fm), tb.cutout(ref, centre - 8, 16), 2e-6)

    lin = get_recipe("linear", 32)
    (out,), (p,) = _views(u8, lin)
    boxes = torch.stack([p[k] for k in ("crop_x", "crop_y", "crop_w", "crop_h")], 1)
    _close(_pixels(out, lin), tb.resized_crop(x, boxes, 32, p["hflip"]), 2e-6)


# ------------------------------------------------------------------------------- whole recipes


@pytest.mark.parametrize("name", ["byol", "mocov2", "simclr", "fixmatch", "linear", "eval"])
@pytest.mark.parametrize("dtype,channels_last", [(torch.float32, False), (torch.bfloat16, True)])
def test_recipe_shapes_dtypes_ranges(cifar, name, dtype, channels_last):
    recipe = get_recipe(name, 32)
    images = cifar[:64] if channels_last else cifar[:64].permute(0, 3, 1, 2)  # NHWC and NCHW inputs
    outs, _ = _views(images, recipe, dtype=dtype, channels_last=channels_last)
    assert len(outs) == len(recipe.views)
    for out in outs:
        assert out.shape == (64, 3, 32, 32) and out.dtype == dtype
        assert out.is_contiguous(memory_format=torch.channels_last if channels_last else torch.contiguous_format)
        pixels = _pixels(out, recipe)
        tol = 0.02 if dtype == torch.bfloat16 else 1e-5
        assert pixels.min() >= -tol and pixels.max() <= 1 + tol
    if len(outs) == 2:
        assert (outs[0].float() - outs[1].float()).abs().mean() > 0.05  # the two views differ
    if name == "eval":
        _close(_pixels(outs[0], recipe), cifar[:64].permute(0, 3, 1, 2) / 255.0, 0.02 if channels_last else 1e-5)


@pytest.mark.parametrize("name", ["byol", "mocov2", "simclr", "eval"])
def test_large_recipes_blur_and_resize(name):
    """The 96 px variants: blur (kernel 9) in byol/mocov2, resize 110 + centre crop in eval."""
    images = torch.randint(0, 256, (16, 120, 100, 3), dtype=torch.uint8, generator=_gen())
    recipe = get_recipe(name, 96)
    outs, params = _views(images, recipe)
    assert all(o.shape == (16, 3, 96, 96) for o in outs)
    if name == "eval":
        ref = TF.center_crop(TF.resize(images.permute(0, 3, 1, 2) / 255.0, 110, antialias=True), 96)
        _close(_pixels(outs[0], recipe), ref, 1e-5)
    else:
        assert all("blur_sigma" in p for p in params)


def test_byol_rates_and_pixels(cifar):
    recipe = get_recipe("byol", 32)
    (v1, v2), (p1, p2) = _views(cifar, recipe)
    for p in (p1, p2):
        assert abs(p["grayscale"].float().mean() - 0.2) < 0.03
        assert abs(p["hflip"].float().mean() - 0.5) < 0.04
        assert abs(p["color_jitter"].float().mean() - 0.8) < 0.03
    assert "solarize" not in p1
    assert abs(p2["solarize"].float().mean() - 0.2) < 0.03
    assert (p1["grayscale"] != p2["grayscale"]).any()  # independent draws per view
    for out, p in ((v1, p1), (v2, p2)):
        pixels = _pixels(out, recipe)
        equal = (pixels.amax(1) - pixels.amin(1)).flatten(1).amax(1) < 1e-4  # grey images: equal channels
        assert equal[p["grayscale"]].all()
        assert equal[~p["grayscale"]].float().mean() < 0.02


def test_mocov2_rates(cifar):
    (a, b), (p1, p2) = _views(cifar, get_recipe("mocov2", 32))
    for p in (p1, p2):
        assert abs(p["grayscale"].float().mean() - 0.2) < 0.03
        assert abs(p["hflip"].float().mean() - 0.5) < 0.04
        assert abs(p["color_jitter"].float().mean() - 0.8) < 0.03
        area = p["crop_w"] * p["crop_h"] / 1024
        assert area.min() >= 0.2 - 0.03  # scale (0.2, 1), up to the rounding of the sides


def test_simclr_rates(cifar):
    """lightly's CIFAR-10 benchmark augmentation: saturation 0.4 (BYOL's is 0.2), no solarize."""
    recipe = get_recipe("simclr", 32)
    assert recipe.views[0] == recipe.views[1] and recipe.views[0].op("color_jitter").params["saturation"] == 0.4
    _, (p1, p2) = _views(cifar, recipe)
    for p in (p1, p2):
        assert abs(p["grayscale"].float().mean() - 0.2) < 0.03
        assert abs(p["color_jitter"].float().mean() - 0.8) < 0.03
        assert "solarize" not in p and "blur_sigma" not in p
        assert (p["crop_w"] * p["crop_h"] / 1024).min() < 0.2  # scale (0.08, 1)


def test_fixmatch_rates(cifar):
    recipe = get_recipe("fixmatch", 32)
    (weak, strong), (pw, ps) = _views(cifar, recipe)
    for p in (pw, ps):
        assert abs(p["hflip"].float().mean() - 0.5) < 0.04
        for axis in "xy":
            counts = torch.bincount(p[f"translate_{axis}"].long() + 4, minlength=9)
            assert len(counts) == 9 and (abs(counts / len(cifar) - 1 / 9) < 0.03).all()
    assert not any(k.startswith(("randaugment", "cutout")) for k in pw)
    assert ps["cutout"].all()
    pixels = _pixels(strong, recipe)
    cx, cy = ps["cutout_x"].long(), ps["cutout_y"].long()
    _close(pixels[torch.arange(len(cifar)), :, cy, cx], torch.full((len(cifar), 3), tb.GREY), 1e-5)
    ops = torch.stack([ps["randaugment0"], ps["randaugment1"]], 1)
    assert (abs((ops >= 0).float().mean(0) - 0.5) < 0.03).all()  # each slot applied with p = 0.5
    counts = torch.bincount(ops[ops >= 0], minlength=len(RANDAUGMENT_POOL)).float()
    expected = (ops >= 0).sum() / len(RANDAUGMENT_POOL)
    assert ((counts - expected) ** 2 / expected).sum() < 34.5, counts  # chi-square, 13 dof, p = 0.001
    for slot in (0, 1):
        ops, mags = ps[f"randaugment{slot}"], ps[f"randaugment{slot}_magnitude"]
        for i, name in enumerate(RANDAUGMENT_POOL):
            lo, hi = RANDAUGMENT_RANGES[name] or (0, 0)
            m = mags[ops == i]
            assert m.min() >= lo and m.max() <= hi, name
            if name == "posterize":
                assert torch.equal(m, m.round()) and set(m.tolist()) == {4.0, 5.0, 6.0, 7.0, 8.0}
    # pixels: the strong view differs from the weak one beyond the cutout
    assert (pixels - _pixels(weak, recipe)).abs().mean() > 0.05


def test_same_seed_same_output_and_check_errors(cifar):
    recipe = get_recipe("fixmatch", 32)
    a, _ = _views(cifar[:64], recipe, seed=3)
    b, _ = _views(cifar[:64], recipe, seed=3)
    c, _ = _views(cifar[:64], recipe, seed=4)
    assert all(torch.equal(x, y) for x, y in zip(a, b, strict=True))
    assert not torch.equal(a[1], c[1])
    with pytest.raises(ValueError, match="uint8"):
        _views(cifar[:4].float(), recipe)
    with pytest.raises(ValueError, match="no crop or resize"):
        _views(torch.zeros(4, 40, 40, 3, dtype=torch.uint8), recipe)
    bad = View((Op("color_jitter", params={"brightness": 0.4}), Op("random_resized_crop", params={
        "size": 32, "scale": (0.08, 1.0), "ratio": (0.75, 1.33)})))
    with pytest.raises(ValueError, match="must come before"):
        tb.check_view(bad, 32, (32, 32))


# ------------------------------------------------------------------------------------- loader


def _loader(images, labels, recipe="byol", **kw) -> tb.TensorLoader:
    kw.setdefault("batch_size", 64)
    return tb.TensorLoader(images, labels, get_recipe(recipe, 32), **kw)


def test_loader_length_shards_and_ownership(cifar):
    images, ids = cifar[:1000], torch.arange(1000)
    seen = []
    for rank in range(3):
        loader = _loader(images, ids, rank=rank, world_size=3)
        assert len(loader) == 1000 // (3 * 64)
        batches = list(loader)
        assert len(batches) == len(loader)
        views, labels = batches[0]
        assert len(views) == 2 and views[0].shape == (64, 3, 32, 32) and labels.dtype == torch.int64
        assert views[0].data_ptr() != batches[1][0][0].data_ptr()  # fresh tensors for every batch
        seen.append(torch.cat([lab for _, lab in batches]))
    everything = torch.cat(seen)
    assert len(everything) == len(set(everything.tolist())) == 5 * 192  # disjoint shards, ragged end dropped

    padded = _loader(images, ids, world_size=3, rank=1, drop_last=False)
    assert len(padded) == 6
    subset = np.arange(0, 1000, 7)
    sub = _loader(images, ids, indices=subset, batch_size=16)
    got = torch.cat([lab for _, lab in sub])
    assert len(sub) == len(subset) // 16 and set(got.tolist()) <= set(subset.tolist())


def test_loader_seeds_epochs_and_ranks(cifar):
    one = cifar[:1].expand(256, -1, -1, -1)  # every sample the same image: only the randomness differs
    labels = torch.zeros(256, dtype=torch.int64)
    first = [v for v, _ in _loader(one, labels, seed=5)]
    again = [v for v, _ in _loader(one, labels, seed=5)]
    assert all(torch.equal(a, b) for x, y in zip(first, again, strict=True) for a, b in zip(x, y, strict=True))
    other_rank = next(iter(_loader(one, labels, seed=5, rank=1, world_size=2)))[0]
    assert not torch.equal(first[0][0][:64], other_rank[0])
    loader = _loader(cifar[:256], torch.arange(256), seed=5)
    e0 = [lab for _, lab in loader]
    loader.set_epoch(1)
    e1 = [lab for _, lab in loader]
    assert not torch.equal(torch.cat(e0), torch.cat(e1)) and set(torch.cat(e0).tolist()) == set(torch.cat(e1).tolist())


def test_loader_refuses_bad_arguments(cifar):
    with pytest.raises(ValueError, match="fewer than one global batch"):
        _loader(cifar[:100], torch.zeros(100), batch_size=64, world_size=2)
    with pytest.raises(ValueError, match="labels"):
        _loader(cifar[:100], torch.zeros(99), batch_size=8)
    with pytest.raises(ValueError, match="uint8"):
        _loader(cifar[:100].float(), torch.zeros(100), batch_size=8)


# ---------------------------------------------------------------------------------------- GPU


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("name", ["byol", "mocov2", "fixmatch", "linear", "eval"])
def test_cuda_never_synchronizes_and_matches_cpu_ops(cifar, name):
    recipe = get_recipe(name, 32)
    loader = tb.TensorLoader(cifar.cuda(), torch.zeros(len(cifar)), recipe, batch_size=256, dtype=torch.bfloat16)
    batches = iter(loader)
    next(batches)  # the epoch's index copy and the constants' first upload happen here
    torch.cuda.set_sync_debug_mode("error")
    try:
        for _ in range(3):
            views, _ = next(batches)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert views[0].is_cuda and views[0].dtype == torch.bfloat16
    x = cifar[:64].permute(0, 3, 1, 2) / 255.0
    ops = torch.randint(-1, len(RANDAUGMENT_POOL), (64, 2), generator=_gen())
    mags = torch.rand(64, 2, generator=_gen()) * 0.5 + 0.3  # a valid magnitude for every op but posterize
    mags[ops == RANDAUGMENT_POOL.index("posterize")] = 5.0
    diff = (tb.randaugment(x.cuda(), ops.cuda(), mags.cuda()).cpu() - tb.randaugment(x, ops, mags)).abs()
    # rounding to 8-bit levels (posterize, equalize) after a resampling may flip a level between devices
    assert (diff.flatten(1).amax(1) < 1e-4).float().mean() > 0.9
