"""DALI graphs for the recipes: image files in, normalized views on the training device out.

One builder walks a `recipes.View` and emits DALI operators, so every recipe is a declarative
`@pipeline_def` graph with no random operator in it: every random decision (crop window, coins,
factors, shifts, RandAugment's ops and magnitudes) is drawn on the host by `decisions.draw_batch`
from (seed, rank, epoch, batch) and fed beside the files, one float32 row per sample and view. So
one pipeline, built once, serves a whole run: any batch of any epoch can be fed next, epochs follow
each other without a rebuild, and a resumed run gets exactly the batches it would have had. Files
are fed through `fn.external_source` in the order that `sampler.epoch_indices` gives (a full
reshuffle every epoch, each rank its shard), decoded by nvJPEG (`device="mixed"`: the hardware
JPEG decoder where the GPU has one, A100/H100/H200, and CUDA elsewhere) on a GPU or libjpeg-turbo
in DALI's CPU mode (`device_id=None`).

How each op is expressed (images stay uint8 HWC until the final `crop_mirror_normalize`):
- random_resized_crop: the window (torchvision's algorithm, on the host, from the sizes in the
  files' headers) as a relative ROI: `fn.decoders.image_slice` (decodes just that region) then
  `fn.resize` for a single view; for several views one `fn.decoders.image` feeds a `fn.resize`
  with the view's ROI (one decode per source image).
- resize_center_crop: `fn.resize(resize_shorter=...)` then `fn.crop`.
- hflip: a per-sample 0/1; folded into `crop_mirror_normalize(mirror=...)` when every later op
  of the view commutes with a horizontal flip (colour ops, blur, solarize), else `fn.flip`.
- translate: reflect padding built from flipped edge slices + `fn.cat`, then an integer crop
  offset per sample with `fn.slice` (DALI's padding policies have no reflect mode).
- color_jitter (p gate), grayscale, solarize: the gate is folded into the parameters on the host
  (factor 1 / saturation 1 / threshold above 255 when off), so no branch is needed. Brightness
  is `fn.brightness`, contrast blends with the mean of the grey image as torchvision does
  (arithmetic on the image, since a GPU-computed centre cannot be an operator argument),
  saturation then hue is one `fn.hsv`, grayscale is `fn.saturation(saturation=0)`: DALI's
  colour ops work in YIQ, so saturation 0 is exactly ITU-R 601 luma replicated.
  Deviation: DALI's hue rotates the chroma (I, Q) plane; torchvision shifts H in HSV. Same
  range, slightly different colours.
- gaussian_blur: `fn.gaussian_blur` with a per-sample sigma; a p < 1 gate is a DALI conditional
  (`enable_conditionals=True`), so only the selected samples are blurred.
- randaugment: DALI's `auto_aug.rand_augment` cannot express FixMatch's variant (it uses one
  fixed magnitude bin and applies every drawn op), so it is built here from DALI ops: per
  slot the host draws an op index uniform over the pool (with replacement), a p=0.5 gate and a
  magnitude uniform in the op's `recipes.RANDAUGMENT_RANGES`; a conditional binary split routes
  each sample to its op. Geometric ops fill with grey (128); rotate turns about the centre,
  shear and translate act about the top-left corner (PIL's affine, as FixMatch's code).
  Deviations from PIL: `fn.equalize` follows OpenCV's LUT formula; sharpness reflects at the
  1 px border where PIL keeps the original pixels.
- cutout: `fn.erase` of a size_frac square centred uniformly in the image (clipped at the
  borders), filled grey.
- normalization, layout, dtype: `fn.crop_mirror_normalize` (float16/float32, CHW or HWC for
  channels_last); bfloat16 is a cast in torch after a float32 output (DALI has no bfloat16).
"""

from __future__ import annotations

import os
import threading
from collections import deque
from collections.abc import Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch

from .decisions import batch_rng, draw_batch, view_keys
from .headers import decoded_shape
from .recipes import Op, Recipe
from .sampler import epoch_indices

if TYPE_CHECKING:
    from .datasets import ImageFolderIndex

try:
    from nvidia.dali import fn, pipeline_def, types
    from nvidia.dali.plugin.pytorch import feed_ndarray
except ImportError:  # the module imports without DALI; DaliLoader says how to install it
    fn = types = feed_ndarray = None

    def pipeline_def(**kwargs):  # lets the module import; DaliLoader refuses to run without DALI
        return lambda f: f


GREY = 128  # fill of rotated/sheared/translated borders and of cutout (0.5 of the range)
LUMA = (0.299, 0.587, 0.114)  # ITU-R 601, the weights of torchvision's and PIL's grayscale
_FLIP_COMMUTES = frozenset({"color_jitter", "grayscale", "gaussian_blur", "solarize"})
_DALI_DTYPES = {torch.float32: "FLOAT", torch.float16: "FLOAT16", torch.bfloat16: "FLOAT"}


def dali_available() -> bool:
    """True when nvidia.dali imports."""
    return fn is not None


def require_dali() -> None:
    """Fail with the install command when nvidia.dali is missing."""
    if fn is None:
        raise ImportError(
            "the DALI backend needs NVIDIA DALI: pip install 'fastse[cu13]' (CUDA 13) or "
            "'fastse[cu12]' (CUDA 12); the CUDA 13 build also runs in CPU mode"
        )


# --------------------------------------------------------------------------------------- graph


class _Graph:
    """Emits the DALI ops of one recipe, view by view. Each view's host-drawn decisions arrive as one
    float32 vector per sample (`decisions.view_keys` order) from the external source `decisions{i}`;
    `value(key)` is that sample's scalar."""

    def __init__(self, recipe: Recipe, *, gpu: bool, fused_decode: bool, out_dtype: str, layout: str,
                 decoder_options: dict, cpu_share: float = 0.0, on_cpu=None):
        self.recipe, self.gpu, self.fused = recipe, gpu, fused_decode
        self.size, self.out_dtype, self.layout = recipe.size, getattr(types, out_dtype), layout
        self.cpu_share = float(cpu_share) if gpu else 1.0
        self.on_cpu = on_cpu  # per sample: decode on the CPU threads (a split batch), else nvJPEG
        self.decoder_options = decoder_options
        self.table, self.keys = None, ()

    def value(self, key: str):
        """This view's decision `key` for each sample: a float32 scalar on the CPU."""
        return self.table[self.keys.index(key)]

    def decode(self, decoder: str, jpegs, **kwargs):
        """`fn.decoders.<decoder>` (image or image_slice) of `jpegs` as RGB, on the device the graph augments
        on. On a GPU, `cpu_share` says where: 0 all on nvJPEG ("mixed"), 1 all on DALI's CPU threads
        (then copied to the GPU), in between each sample where `on_cpu` routes it (a DALI conditional)."""
        op = getattr(fn.decoders, decoder)
        if self.cpu_share >= 1:
            x = op(jpegs, device="cpu", output_type=types.RGB, **kwargs)
            return x.gpu() if self.gpu else x
        if self.cpu_share <= 0:
            return op(jpegs, device="mixed", output_type=types.RGB, **kwargs, **self.decoder_options)
        if self.on_cpu:
            x = op(jpegs, device="cpu", output_type=types.RGB, **kwargs).gpu()
        else:
            x = op(jpegs, device="mixed", output_type=types.RGB, **kwargs, **self.decoder_options)
        return x

    def dev(self, node):
        """A CPU per-sample value moved next to the images (GPU arithmetic takes GPU operands)."""
        return node.gpu() if self.gpu and hasattr(node, "gpu") else node

    def const(self, array: np.ndarray):
        """A constant tensor on the images' device."""
        return types.Constant(array, device="gpu" if self.gpu else "cpu")

    def views(self, jpegs) -> list:
        """One normalized output per view. Views that start with a random crop fuse it into their own
        decode when `fused`; the others share one full decode of each file."""
        decoded, outs = None, []
        for i, view in enumerate(self.recipe.views):
            self.keys = view_keys(view)
            self.table = fn.external_source(name=f"decisions{i}", dtype=types.FLOAT, ndim=1) if self.keys else None
            ops = view.ops
            if self.fused and ops and ops[0].name == "random_resized_crop":
                x, ops = self.fused_crop(jpegs, ops[0]), ops[1:]
            else:
                if decoded is None:
                    decoded = self.decode("image", jpegs)
                x = decoded
            outs.append(self.view(x, ops))
        return outs

    def view(self, x, ops: tuple[Op, ...]):
        mirror = 0
        for i, op in enumerate(ops):
            if op.name != "hflip":
                x = getattr(self, op.name)(x, op)
                continue
            coin = fn.cast(self.value("hflip"), dtype=types.INT32)
            if all(later.name in _FLIP_COMMUTES for later in ops[i + 1 :]):
                mirror = coin  # done by crop_mirror_normalize: exact, since the later ops commute
            else:
                x = fn.flip(x, horizontal=coin)
        r = self.recipe
        return fn.crop_mirror_normalize(
            x, dtype=self.out_dtype, output_layout=self.layout, mirror=mirror,
            mean=[255 * m for m in r.mean], std=[255 * s for s in r.std],
        )

    # -------------------------------------------------------------------- geometry

    def window(self):
        """The crop window's (y0, x0) and (y1, x1), fractions of the decoded image's height and width."""
        return (fn.stack(self.value("crop_y0"), self.value("crop_x0")),
                fn.stack(self.value("crop_y1"), self.value("crop_x1")))

    def fused_crop(self, jpegs, op: Op):
        """RandomResizedCrop decoding just the window (where the decoder can), then resizing it."""
        start, end = self.window()
        x = self.decode("image_slice", jpegs, rel_start=start, rel_end=end, axis_names="HW")
        return fn.resize(x, size=[op.params["size"]] * 2, antialias=True)

    def random_resized_crop(self, x, op: Op):
        start, end = self.window()
        return fn.resize(x, size=[op.params["size"]] * 2, roi_start=start, roi_end=end, roi_relative=True,
                         antialias=True)

    def resize_center_crop(self, x, op: Op):
        x = fn.resize(x, resize_shorter=op.params["resize"], antialias=True)
        return fn.crop(x, crop=[op.params["size"]] * 2)

    def translate(self, x, op: Op):
        """Reflect-pad by pad_frac of the side, then crop `size` px at an integer offset per sample."""
        pad, size = round(op.params["pad_frac"] * op.params["size"]), op.params["size"]
        x = fn.cat(fn.flip(x[:, 1 : pad + 1]), x, fn.flip(x[:, -pad - 1 : -1]), axis_name="W")
        x = fn.cat(
            fn.flip(x[1 : pad + 1], vertical=1, horizontal=0), x,
            fn.flip(x[-pad - 1 : -1], vertical=1, horizontal=0), axis_name="H",
        )
        dy, dx = (fn.cast(self.value(f"translate_{axis}") + pad, dtype=types.INT32) for axis in "yx")
        return fn.slice(x, start=fn.stack(dy, dx), shape=[size, size], axis_names="HW")

    # -------------------------------------------------------------------- colour

    def color_jitter(self, x, op: Op):
        b, c, s, h = (self.value(k) for k in ("brightness", "contrast", "saturation", "hue"))  # identity where off
        x = fn.brightness(x, brightness=b)
        x = self.contrast(x, c)
        return fn.hsv(x, saturation=s, hue=360 * h)  # saturation and hue commute in YIQ

    def contrast(self, x, factor):
        """Blend with the mean of the image's luma (torchvision/PIL contrast), clamped to uint8."""
        mean = fn.reductions.mean(x, axis_names="HW", keep_dims=True)
        centre = fn.reductions.sum(mean * self.const(np.float32(LUMA)), axis_names="C", keep_dims=True)
        return fn.cast(centre + (x - centre) * self.dev(factor), dtype=types.UINT8)

    def grayscale(self, x, op: Op):
        return fn.saturation(x, saturation=1 - self.value("grayscale"))

    def gaussian_blur(self, x, op: Op):
        window = int(op.params["kernel_frac"] * self.size) // 2 * 2 + 1  # odd; 23 at 224 px as in BYOL
        sigma = self.value("blur_sigma")
        if op.p >= 1:
            return fn.gaussian_blur(x, sigma=sigma, window_size=window)
        if self.value("gaussian_blur") > 0.5:
            x = fn.gaussian_blur(x, sigma=sigma, window_size=window)
        return x

    def solarize(self, x, op: Op):
        return _solarize(x, self.dev(self.value("solarize_threshold")))  # off: 256, which inverts nothing

    # -------------------------------------------------------------------- FixMatch strong

    def randaugment(self, x, op: Op):
        pool = list(op.params["pool"])
        for slot in range(op.params["n"]):
            which = fn.cast(self.value(f"randaugment{slot}"), dtype=types.INT32)  # -1: the slot is skipped
            magnitude = self.value(f"randaugment{slot}_magnitude")
            if which >= 0:
                x = self.select(x, which, magnitude, pool, 0, len(pool) - 1)
        return x

    def select(self, x, which, magnitude, pool: list[str], lo: int, hi: int):
        """Routes each sample to pool[which] by a binary split of conditionals (log2 depth)."""
        if lo == hi:
            return _RA[pool[lo]](self, x, magnitude)
        mid = (lo + hi) // 2
        if which <= mid:
            x = self.select(x, which, magnitude, pool, lo, mid)
        else:
            x = self.select(x, which, magnitude, pool, mid + 1, hi)
        return x

    def cutout(self, x, op: Op):
        side = float(round(op.params["size_frac"] * self.size))
        # integer centre uniform over the pixels, region [c - side/2, c + side/2) clipped (FixMatch's cutout)
        cy, cx = self.value("cutout_y"), self.value("cutout_x")
        return fn.erase(
            x, anchor=fn.stack(cy, cx), shape=[side, side], centered_anchor=True, axis_names="HW",
            fill_value=GREY,
        )


def _solarize(x, threshold):
    """Invert the pixels >= threshold (a per-sample scalar on the images' device)."""
    inverted = x >= threshold
    return fn.cast(x + inverted * (255 - 2 * fn.cast(x, dtype=types.INT16)), dtype=types.UINT8)


def _autocontrast(g: _Graph, x, _):
    """Stretch each channel to [0, 255] (PIL ImageOps.autocontrast, cutoff 0); flat channels stay."""
    lo = fn.reductions.min(x, axis_names="HW", keep_dims=True)
    hi = fn.reductions.max(x, axis_names="HW", keep_dims=True)
    spread = hi > lo
    scale = 255.0 / (spread * (hi - lo) + (spread ^ True))
    return fn.cast((x - lo * spread) * scale, dtype=types.UINT8)


def _sharpness(g: _Graph, x, factor):
    """PIL ImageEnhance.Sharpness: blend with PIL's 3x3 smoothing filter by `factor`, as one kernel."""
    smooth = np.float32([[1, 1, 1], [1, 5, 1], [1, 1, 1]]) / 13
    ident = np.float32([[0, 0, 0], [0, 1, 0], [0, 0, 0]])
    kernel = types.Constant(smooth) + factor * types.Constant(ident - smooth)
    return fn.filter(x, g.dev(kernel))


def _posterize(g: _Graph, x, bits):
    """Keep the top `bits` bits (an integer-valued magnitude, 4..8)."""
    masks = types.Constant(np.uint8([0xFF ^ (2 ** (8 - b) - 1) for b in range(9)]))
    return x & g.dev(masks[fn.cast(bits, dtype=types.INT32)])


def _affine(kind: str, axis: int):
    """shear_x/y (coefficient) or translate_x/y (fraction of the side) about the top-left corner,
    as PIL's affine transform in FixMatch's code; the uncovered area is grey."""

    def op(g: _Graph, x, m):
        vec = fn.stack(m, m * 0) if axis == 0 else fn.stack(m * 0, m)  # (x, y)
        matrix = fn.transforms.shear(shear=vec) if kind == "shear" else fn.transforms.translation(offset=vec * g.size)
        return fn.warp_affine(x, matrix=matrix, fill_value=GREY, inverse_map=False)

    return op


# FixMatch's pool (recipes.RANDAUGMENT_POOL): op name -> emitter(graph, images, magnitude per sample).
_RA = {
    "identity": lambda g, x, m: x,
    "autocontrast": _autocontrast,
    "brightness": lambda g, x, m: fn.brightness(x, brightness=m),
    "color": lambda g, x, m: fn.saturation(x, saturation=m),
    "contrast": lambda g, x, m: g.contrast(x, m),
    "equalize": lambda g, x, m: fn.equalize(x),
    "posterize": _posterize,
    "rotate": lambda g, x, m: fn.rotate(x, angle=m, keep_size=True, fill_value=GREY),
    "sharpness": _sharpness,
    "shear_x": _affine("shear", 0),
    "shear_y": _affine("shear", 1),
    "solarize": lambda g, x, m: _solarize(x, g.dev(255 * m)),
    "translate_x": _affine("translate", 0),
    "translate_y": _affine("translate", 1),
}


@pipeline_def(enable_conditionals=True)
def recipe_pipeline(recipe: Recipe, *, gpu: bool, fused_decode: bool, out_dtype: str = "FLOAT", layout: str = "CHW",
                    decoder_options: dict | None = None, cpu_decode: float = 0.0):
    """The DALI graph of `recipe`. Fed each iteration (`Pipeline.feed_input`): "jpegs" (the encoded
    files, uint8 [bytes] per sample, not copied: keep them alive until the batch's outputs are taken),
    "labels" (int64 per sample), per view i with decisions, "decisions{i}" (float32
    [len(decisions.view_keys(view))] per sample) and, where the decode is split, "on_cpu" (bool per
    sample). Outputs: one normalized image batch per view (`layout` CHW or HWC, `out_dtype`
    FLOAT/FLOAT16), then the labels. `decoder_options` go to the GPU ("mixed") decoders
    (hw_decoder_load, memory paddings, size hints). `cpu_decode` (GPU mode): the share of JPEGs decoded
    on the CPU threads, then augmented on the GPU (which spends no SM time on their decoding); 0 (or
    False): all on nvJPEG; 1 (or True): all on the CPU; in between, the samples fed `on_cpu` True."""
    jpegs = fn.external_source(name="jpegs", dtype=types.UINT8, ndim=1, no_copy=True)
    labels = fn.external_source(name="labels", dtype=types.INT64, ndim=0)
    split = gpu and 0 < cpu_decode < 1
    on_cpu = fn.external_source(name="on_cpu", dtype=types.BOOL, ndim=0) if split else None
    graph = _Graph(recipe, gpu=gpu, fused_decode=fused_decode, out_dtype=out_dtype, layout=layout,
                   decoder_options=decoder_options or {}, cpu_share=cpu_decode, on_cpu=on_cpu)
    return (*graph.views(jpegs), labels.gpu() if gpu else labels)


def cpu_mask(n: int, share: float) -> np.ndarray:
    """Which of a batch's `n` samples a split decode sends to the CPU threads: round(share * n) of them,
    spread evenly over the batch (bool [n])."""
    i = np.arange(n)
    return np.floor((i + 1) * share + 0.5) > np.floor(i * share + 0.5)


# --------------------------------------------------------------------------------------- loader


@dataclass
class _Batch:
    """One batch as fed: where it sits in the stream, the encoded files (kept alive until its outputs
    are taken), the labels and each view's decisions (the fed table and the same values by name)."""

    epoch: int
    index: int
    jpegs: list[np.ndarray]
    labels: np.ndarray
    decisions: list[tuple[np.ndarray, dict[str, np.ndarray]]]

    @property
    def key(self) -> tuple[int, int]:
        return self.epoch, self.index


def _device_id(device: str | torch.device) -> int | None:
    device = torch.device(device)
    if device.type == "cpu":
        return None
    if device.type != "cuda":
        raise ValueError(f"DaliLoader: device {device} is neither cpu nor cuda")
    return device.index if device.index is not None else torch.cuda.current_device()


def default_threads(gpu: bool = False) -> int:
    """DALI CPU threads for one process, from the cores this process may use shared by the processes of
    its node (torchrun's LOCAL_WORLD_SIZE). CPU mode decodes everything on them: all but one (for the
    training loop), up to 16. GPU mode decodes mostly on the GPU: half, up to 8 (more threads slowed
    the step: BYOL R50 on an H200 with 16 cores fed at 0.87 of its GPU-bound speed with 4 or 8 threads,
    0.82 with 12 or 15; docs/BENCHMARKS.md)."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    per_process = cores // max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
    return max(1, min(8, per_process // 2)) if gpu else max(1, min(16, per_process - 1))


class DaliLoader:
    """Batches of `recipe`'s views of image files, decoded and augmented by DALI.

    Each epoch this rank reads its shard of `sampler.epoch_indices` (a full reshuffle; the ragged end
    dropped, or padded by wrapping with drop_last=False); every random decision of batch b of epoch e
    is drawn on the host from (seed, rank, e, b) (`decisions`): same seed, same batches; ranks, epochs
    and batches differ. Like DistributedSampler, call `set_epoch` before each epoch. Yields
    `(views, labels)`: a tuple of [B, 3, size, size] tensors of `dtype` on `device` (channels_last
    memory if asked) and int64 labels [B], all freshly allocated (the caller owns them).
    `device="cpu"` runs DALI's CPU mode.

    One DALI pipeline is built on first use and kept: batches are fed to it `prefetch` ahead, across
    epoch ends once `set_epoch` is in use (without it every pass reads the same epoch again), while
    background threads read the next files and draw their decisions. Reading another epoch than the
    one fed, or starting mid-epoch (`start_batch`), drains the `prefetch` batches in flight: no rebuild.

    files: image paths, or an ImageFolderIndex (then `labels` may be None). indices: restrict to
    those positions of `files` (e.g. a labelled split). fused_decode: each view that starts with
    random_resized_crop decodes just its window (`image_slice`) instead of sharing one full decode;
    default: fused for single-view recipes in CPU mode (on a GPU, one full decode, which the hardware
    decoder takes, fed the linear protocol faster: docs/BENCHMARKS.md). return_params: yield `(views, labels, params)`,
    params a tuple (per view) of {decision: float32 [B] CPU tensor} (`decisions.draw_batch`'s
    values: hflip, color_jitter, grayscale, solarize, gaussian_blur where p < 1: 1 applied / 0 not;
    jitter factors; translate_y/x px; randaugment{slot}: pool index or -1; cutout_y/x centre px; ...).
    num_threads: DALI's CPU threads (default `default_threads(gpu)`); reader_threads: file-reading threads.
    stream_priority: CUDA priority of DALI's streams (lower runs first; PyTorch's streams have 0, the
    range is `torch.cuda.Stream.priority_range()`); None keeps DALI's default. hw_decoder_load: the
    share of JPEGs sent to the GPU's hardware decoder (where it has one); None keeps DALI's default.
    sizes: the images' (height, width) [N, 2] (an ImageFolderIndex has them), which size the hardware
    decoder's preallocated buffers. cpu_decode (GPU mode): decode the JPEGs on DALI's CPU threads (then
    all but one core, up to 16, by default) and only augment on the GPU, leaving its SMs to the step;
    None (default): for recipes of several views (pretraining, where the step, not the decode, is the
    bound: BYOL R50 on an H200 with 16 cores fed at 0.95 of its GPU-bound speed this way, 0.89 with
    nvJPEG), not for one view (linear evaluation, bound by the decode, which nvJPEG does faster). A
    float in (0, 1) splits each batch: that share of its JPEGs (`cpu_mask`) on the CPU threads, the
    rest on nvJPEG, all of it on the hardware decoder unless hw_decoder_load says otherwise (its other
    path decodes Huffman codes on the same CPU threads).
    """

    def __init__(
        self,
        files: Sequence[str | Path] | ImageFolderIndex,
        labels: np.ndarray | Sequence[int] | None,
        recipe: Recipe,
        *,
        batch_size: int,
        device: str | torch.device = "cuda",
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
        dtype: torch.dtype = torch.float32,
        channels_last: bool = False,
        drop_last: bool = True,
        indices: np.ndarray | Sequence[int] | None = None,
        num_threads: int | None = None,
        reader_threads: int = 4,
        prefetch: int = 2,
        fused_decode: bool | None = None,
        return_params: bool = False,
        stream_priority: int | None = None,
        hw_decoder_load: float | None = None,
        sizes: np.ndarray | None = None,
        cpu_decode: bool | float | None = None,
    ):
        require_dali()
        if hasattr(files, "files"):  # an ImageFolderIndex
            labels = files.labels if labels is None else labels
            files, sizes = files.files, files.sizes if sizes is None else sizes
        if labels is None:
            raise ValueError("DaliLoader: labels are required with a list of files")
        self.files = [Path(f) for f in files]
        self.labels = np.asarray(labels, dtype=np.int64)
        if len(self.labels) != len(self.files) or not self.files:
            raise ValueError(f"DaliLoader: {len(self.files)} files but {len(self.labels)} labels")
        if dtype not in _DALI_DTYPES:
            raise ValueError(f"DaliLoader: dtype {dtype} is not one of {', '.join(map(str, _DALI_DTYPES))}")
        if prefetch < 1 or reader_threads < 1:
            raise ValueError(f"DaliLoader: prefetch={prefetch} and reader_threads={reader_threads} must be >= 1")
        if hw_decoder_load is not None and not 0 <= hw_decoder_load <= 1:
            raise ValueError(f"DaliLoader: hw_decoder_load={hw_decoder_load} is outside [0, 1]")
        self.device, self.device_id = torch.device(device), _device_id(device)
        self.pool = np.arange(len(self.files)) if indices is None else np.asarray(indices, dtype=np.int64)
        self.recipe, self.batch_size, self.seed = recipe, batch_size, seed
        self.rank, self.world_size, self.drop_last = rank, world_size, drop_last
        self.dtype, self.channels_last, self.return_params = dtype, channels_last, return_params
        gpu = self.device_id is not None
        self.fused_decode = len(recipe.views) == 1 and not gpu if fused_decode is None else fused_decode
        share = float(len(recipe.views) > 1 if cpu_decode is None else cpu_decode)
        if not 0 <= share <= 1:
            raise ValueError(f"DaliLoader: cpu_decode={cpu_decode} is outside [0, 1]")
        self.cpu_decode = share if gpu else 0.0  # the share of JPEGs decoded on the CPU threads, GPU mode
        self.num_threads, self.prefetch = num_threads or default_threads(gpu and not self.cpu_decode), prefetch
        self.stream_priority, self.hw_decoder_load = stream_priority, hw_decoder_load
        self.sizes = None if sizes is None else np.asarray(sizes)
        self._size_hint = None if sizes is None or not len(sizes) else np.percentile(sizes, 99, axis=0).astype(int)
        self._needs_shapes = any(op.name == "random_resized_crop" for v in recipe.views for op in v.ops)
        self.epoch, self.start_batch = 0, 0
        self._len = len(self._indices(0)) // batch_size  # also validates batch_size, rank, world_size
        self._epochs_set = False  # set_epoch in use: the stream runs on into the next epoch
        self._pipe = None
        self._fed: deque[_Batch] = deque()  # fed and scheduled, oldest first; their outputs not yet taken
        self._next = (0, 0)  # (epoch, batch) the next feed reads
        self._ahead: dict[tuple[int, int], Future] = {}  # batches being read and drawn in the background
        self._order: dict[int, np.ndarray] = {}  # epoch -> this rank's sample indices (the last two epochs)
        self.reader_threads = reader_threads
        self._readers = ThreadPoolExecutor(reader_threads, thread_name_prefix="dali-read")
        self._order_lock = threading.Lock()
        # the batches kept read ahead are prepared at once: a single preparer drew 6,800 img/s on a 16-core
        # host, half of what nvJPEG decodes there (docs/BENCHMARKS.md); reads release the GIL, parsing is short
        self._preparer = ThreadPoolExecutor(prefetch + 1, thread_name_prefix="dali-prepare")

    def __len__(self) -> int:
        return self._len

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        """Select the epoch the next iteration reads (its permutation and decisions) and the batch it
        starts at (a resumed run's position in its epoch; the batches before it are not decoded)."""
        if not 0 <= start_batch <= self._len:
            raise ValueError(f"DaliLoader: start_batch={start_batch} is outside [0, {self._len}]")
        self.epoch, self.start_batch, self._epochs_set = epoch, start_batch, True

    def _indices(self, epoch: int) -> np.ndarray:
        local = epoch_indices(len(self.pool), epoch=epoch, seed=self.seed, rank=self.rank, world_size=self.world_size,
                              batch_size=self.batch_size, drop_last=self.drop_last)
        return self.pool[local]

    # ------------------------------------------------------------------------------ the stream

    def pipeline(self):
        """This loader's DALI pipeline, defined (not built): what `__iter__` builds once and feeds."""
        gpu = self.device_id is not None
        options = {}
        if gpu and self.hw_decoder_load is not None:
            options["hw_decoder_load"] = self.hw_decoder_load
        elif gpu and 0 < self.cpu_decode < 1:  # nvJPEG's share, all to the hardware decoder: the CPU has its own
            options["hw_decoder_load"] = 1.0
        if gpu and self._size_hint is not None:  # the hardware decoder's buffers, sized for most images
            options.update(preallocate_height_hint=int(self._size_hint[0]),
                           preallocate_width_hint=int(self._size_hint[1]))
        return recipe_pipeline(
            self.recipe, gpu=gpu, fused_decode=self.fused_decode, out_dtype=_DALI_DTYPES[self.dtype],
            layout="HWC" if self.channels_last else "CHW", decoder_options=options, cpu_decode=self.cpu_decode,
            batch_size=self.batch_size, num_threads=self.num_threads, device_id=self.device_id,
            prefetch_queue_depth=self.prefetch,
            **({} if self.stream_priority is None or not gpu
               else {"default_cuda_stream_priority": self.stream_priority}),
        )

    def _after(self, key: tuple[int, int]) -> tuple[int, int]:
        epoch, b = key
        if b + 1 < self._len:
            return epoch, b + 1
        return (epoch + 1, 0) if self._epochs_set else (epoch, 0)

    def _prepare(self, key: tuple[int, int]) -> _Batch:
        """Read batch `key`'s files and draw its decisions (in a background thread)."""
        epoch, b = key
        with self._order_lock:  # several batches are prepared at once
            order = self._order.get(epoch)
            if order is None:
                self._order = {e: o for e, o in self._order.items() if e >= epoch - 1}
                order = self._order[epoch] = self._indices(epoch)
        idx = order[b * self.batch_size : (b + 1) * self.batch_size]
        chunks = np.array_split(idx, min(len(idx), 4 * self.reader_threads))
        files = [data for part in self._readers.map(self._read, chunks) for data in part]
        shapes = (np.array([decoded_shape(d, self.files[i]) for d, i in zip(files, idx)])
                  if self._needs_shapes else np.ones((len(idx), 2), dtype=np.int64))
        decisions = draw_batch(self.recipe, batch_rng(self.seed, self.rank, epoch, b), shapes)
        jpegs = [np.frombuffer(data, dtype=np.uint8) for data in files]  # views of the bytes: no copy
        return _Batch(epoch, b, jpegs, self.labels[idx], decisions)

    def _read(self, idx: np.ndarray) -> list[bytes]:
        return [self.files[i].read_bytes() for i in idx]

    def _feed(self) -> None:
        """Feed the batch at `_next` (read ahead if it was) and keep the next ones being read."""
        key = self._next
        future = self._ahead.pop(key, None) or self._preparer.submit(self._prepare, key)
        batch = future.result()
        self._feed_batch(self._pipe, batch)
        self._fed.append(batch)
        self._next = ahead = self._after(key)
        for _ in range(self.prefetch + 1):  # keep a few batches read ahead of the feed
            if ahead not in self._ahead:
                self._ahead[ahead] = self._preparer.submit(self._prepare, ahead)
            ahead = self._after(ahead)

    def _feed_batch(self, pipe, batch: _Batch) -> None:
        """Feed `batch` to `pipe` (this loader's graph): its files, labels, decisions and, where the decode is
        split, which samples go to the CPU threads."""
        pipe.feed_input("jpegs", batch.jpegs)
        pipe.feed_input("labels", batch.labels)
        if self.device_id is not None and 0 < self.cpu_decode < 1:
            pipe.feed_input("on_cpu", cpu_mask(len(batch.labels), self.cpu_decode))
        for i, (table, _) in enumerate(batch.decisions):
            if table.shape[1]:
                pipe.feed_input(f"decisions{i}", table)

    def _seek(self, key: tuple[int, int]) -> None:
        """Make `key` the next batch the pipeline outputs: nothing to do when the stream is there; else
        the batches in flight are drained and dropped, and feeding restarts at `key`."""
        if self._pipe is None:
            self._pipe = self.pipeline()
            self._pipe.build()
            self._next = key
            for _ in range(self.prefetch):
                self._feed()
            self._pipe.schedule_run()  # the first call runs `prefetch` iterations
            return
        if (self._fed[0].key if self._fed else self._next) == key:
            return
        while self._fed:  # drop the batches in flight
            self._pipe.outputs()
            self._fed.popleft()
        for future in self._ahead.values():
            future.cancel()
        self._ahead.clear()
        self._next = key
        for _ in range(self.prefetch):
            self._feed()
            self._pipe.schedule_run()

    def __iter__(self) -> Iterator[tuple]:
        self._seek((self.epoch, self.start_batch))
        start, self.start_batch = self.start_batch, 0  # a later pass reads the whole epoch
        cuda = self.device_id is not None
        n = len(self.recipe.views)
        for _ in range(start, self._len):
            # the consumer's stream at each batch (it may enter another one, e.g. `consumer_stream`, mid-epoch):
            # the batch's copies run on it, so its kernels see them complete
            stream = torch.cuda.current_stream(self.device) if cuda else None
            outs = self._pipe.outputs(cuda_stream=stream) if cuda else self._pipe.outputs()
            batch = self._fed.popleft()  # the batch these outputs are of (its files may now be freed)
            views = tuple(self._view(outs[i], i, stream) for i in range(n))
            labels = _owned(outs[n], torch.int64, self.device, stream)
            del outs
            self._feed()
            self._pipe.schedule_run()
            if self.return_params:
                params = tuple({k: torch.from_numpy(v.copy()) for k, v in named.items()}
                               for _, named in batch.decisions)
                yield views, labels, params
            else:
                yield views, labels

    def close(self) -> None:
        """Stop the background readers and free the pipeline (also done when the loader is collected)."""
        for future in self._ahead.values():
            future.cancel()
        self._ahead.clear()
        self._readers.shutdown(wait=False, cancel_futures=True)
        self._preparer.shutdown(wait=False, cancel_futures=True)
        self._pipe, self._fed = None, deque()

    def _view(self, batch, i: int, stream) -> torch.Tensor:
        size, name = self.recipe.size, self.recipe.name
        wrong = (f"recipe {name!r} view {i} has no crop or resize op, so its images must be {size}x{size} px; "
                 f"DALI produced")
        try:
            out = _owned(batch, torch.float16 if self.dtype == torch.float16 else torch.float32, self.device, stream)
        except RuntimeError as e:  # a batch of mixed shapes cannot become one tensor
            raise ValueError(f"{wrong} images of mixed shapes ({e})") from None
        if self.channels_last:
            out = out.permute(0, 3, 1, 2)  # NHWC storage seen as NCHW: the channels_last memory format
        if tuple(out.shape[1:]) != (3, size, size):
            raise ValueError(f"{wrong} {tuple(out.shape[1:])}")
        return out.to(self.dtype)  # a no-op except for bfloat16 (DALI has no bfloat16)


def _owned(batch, dtype: torch.dtype, device: torch.device, stream) -> torch.Tensor:
    """Copy a uniform-shaped DALI batch into a freshly allocated torch tensor (the caller owns it)."""
    tensor = batch.as_tensor()
    out = torch.empty(tensor.shape(), dtype=dtype, device=device)
    feed_ndarray(tensor, out, cuda_stream=stream)
    return out
