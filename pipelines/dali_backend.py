"""DALI graphs for the recipes: image files in, normalized views on the training device out.

One builder walks a `recipes.View` and emits DALI operators, so every recipe is a declarative
`@pipeline_def` graph. Files are read through `fn.external_source` in the order that
`sampler.epoch_indices` gives (a full reshuffle every epoch, each rank its shard), decoded by
nvJPEG (`device="mixed"`) on a GPU or libjpeg-turbo in DALI's CPU mode (`device_id=None`).

How each op is expressed (images stay uint8 HWC until the final `crop_mirror_normalize`):
- random_resized_crop: `fn.decoders.image_random_crop` (fused decode + crop window, then
  `fn.resize`) for a single view; for several views one `fn.decoders.image` feeds a
  `fn.random_resized_crop` per view (one decode per source image).
- resize_center_crop: `fn.resize(resize_shorter=...)` then `fn.crop`.
- hflip: a per-sample coin; folded into `crop_mirror_normalize(mirror=...)` when every later op
  of the view commutes with a horizontal flip (colour ops, blur, solarize), else `fn.flip`.
- translate: reflect padding built from flipped edge slices + `fn.cat`, then an integer crop
  offset per sample with `fn.slice` (DALI's padding policies have no reflect mode).
- color_jitter (p gate), grayscale, solarize: the gate is folded into the parameters
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
  slot an op index uniform over the pool (with replacement) and a p=0.5 coin; a conditional
  binary split routes each sample to its op, which draws its own magnitude uniformly from
  `recipes.RANDAUGMENT_RANGES`. Geometric ops fill with grey (128); rotate turns about the centre,
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
from collections.abc import Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch

from .recipes import RANDAUGMENT_RANGES, Op, Recipe
from .sampler import epoch_indices, rank_seed

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
    """Emits the DALI ops of one recipe, view by view; `params` collects each view's per-sample
    decisions (name -> float32 scalar node) for the debug outputs."""

    def __init__(self, recipe: Recipe, *, gpu: bool, fused_decode: bool, out_dtype: str, layout: str):
        self.recipe, self.gpu, self.fused = recipe, gpu, fused_decode
        self.size, self.out_dtype, self.layout = recipe.size, getattr(types, out_dtype), layout
        self.decoder = "mixed" if gpu else "cpu"
        self.params: list[dict[str, object]] = []

    def dev(self, node):
        """A CPU per-sample value moved next to the images (GPU arithmetic takes GPU operands)."""
        return node.gpu() if self.gpu and hasattr(node, "gpu") else node

    def const(self, array: np.ndarray):
        """A constant tensor on the images' device."""
        return types.Constant(array, device="gpu" if self.gpu else "cpu")

    def record(self, name: str, node) -> None:
        self.params[-1][name] = fn.cast(node, dtype=types.FLOAT)

    def views(self, jpegs) -> list:
        """One normalized output per view. Views that start with a random crop fuse it into their own
        decode when `fused`; the others share one full decode of each file."""
        decoded, outs = None, []
        for view in self.recipe.views:
            self.params.append({})
            ops = view.ops
            if self.fused and ops and ops[0].name == "random_resized_crop":
                x, ops = self.fused_crop(jpegs, ops[0]), ops[1:]
            else:
                if decoded is None:
                    decoded = fn.decoders.image(jpegs, device=self.decoder, output_type=types.RGB)
                x = decoded
            outs.append(self.view(x, ops))
        return outs

    def view(self, x, ops: tuple[Op, ...]):
        mirror = 0
        for i, op in enumerate(ops):
            if op.name != "hflip":
                x = getattr(self, op.name)(x, op)
                continue
            coin = fn.random.coin_flip(probability=op.p, dtype=types.INT32)
            self.record("hflip", coin)
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

    def fused_crop(self, jpegs, op: Op):
        """RandomResizedCrop with the window drawn by the decoder (which decodes just that region where it can)."""
        p = op.params
        x = fn.decoders.image_random_crop(
            jpegs, device=self.decoder, output_type=types.RGB, random_area=list(p["scale"]),
            random_aspect_ratio=list(p["ratio"]), num_attempts=10,
        )
        return fn.resize(x, size=[p["size"]] * 2, antialias=True)

    def random_resized_crop(self, x, op: Op):
        p = op.params
        return fn.random_resized_crop(
            x, size=[p["size"]] * 2, random_area=list(p["scale"]), random_aspect_ratio=list(p["ratio"]),
            num_attempts=10, antialias=True,
        )

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
        dy, dx = (fn.random.uniform(values=list(range(2 * pad + 1)), dtype=types.INT32) for _ in "yx")
        self.record("translate_y", dy - pad)
        self.record("translate_x", dx - pad)
        return fn.slice(x, start=fn.stack(dy, dx), shape=[size, size], axis_names="HW")

    # -------------------------------------------------------------------- colour

    def color_jitter(self, x, op: Op):
        p = op.params
        on = _coin(op.p, types.FLOAT)
        b, c, s = (1 + on * (_uniform((1 - p[k], 1 + p[k])) - 1) for k in ("brightness", "contrast", "saturation"))
        h = on * _uniform((-p["hue"], p["hue"]))  # identity factors where the p-coin is off
        for name, node in (("color_jitter", on), ("brightness", b), ("contrast", c), ("saturation", s), ("hue", h)):
            self.record(name, node)
        x = fn.brightness(x, brightness=b)
        x = self.contrast(x, c)
        return fn.hsv(x, saturation=s, hue=360 * h)  # saturation and hue commute in YIQ

    def contrast(self, x, factor):
        """Blend with the mean of the image's luma (torchvision/PIL contrast), clamped to uint8."""
        mean = fn.reductions.mean(x, axis_names="HW", keep_dims=True)
        centre = fn.reductions.sum(mean * self.const(np.float32(LUMA)), axis_names="C", keep_dims=True)
        return fn.cast(centre + (x - centre) * self.dev(factor), dtype=types.UINT8)

    def grayscale(self, x, op: Op):
        on = _coin(op.p, types.FLOAT)
        self.record("grayscale", on)
        return fn.saturation(x, saturation=1 - on)

    def gaussian_blur(self, x, op: Op):
        lo, hi = op.params["sigma"]
        window = int(op.params["kernel_frac"] * self.size) // 2 * 2 + 1  # odd; 23 at 224 px as in BYOL
        sigma = fn.random.uniform(range=[lo, hi])
        if op.p >= 1:
            return fn.gaussian_blur(x, sigma=sigma, window_size=window)
        on = fn.random.coin_flip(probability=op.p, dtype=types.BOOL)
        self.record("gaussian_blur", on)
        if on:
            x = fn.gaussian_blur(x, sigma=sigma, window_size=window)
        return x

    def solarize(self, x, op: Op):
        on = _coin(op.p, types.FLOAT)
        self.record("solarize", on)
        # off: a threshold above 255 inverts nothing
        return _solarize(x, self.dev(256 - on * (256 - 255 * op.params["threshold"])))

    # -------------------------------------------------------------------- FixMatch strong

    def randaugment(self, x, op: Op):
        pool = list(op.params["pool"])
        for slot in range(op.params["n"]):
            which = fn.random.uniform(values=list(range(len(pool))), dtype=types.INT32)
            on = fn.random.coin_flip(probability=op.params["op_p"], dtype=types.BOOL)
            self.record(f"randaugment{slot}", (which + 1) * on - 1)  # -1 where the slot is skipped
            if on:
                x = self.select(x, which, pool, 0, len(pool) - 1)
        return x

    def select(self, x, which, pool: list[str], lo: int, hi: int):
        """Routes each sample to pool[which] by a binary split of conditionals (log2 depth)."""
        if lo == hi:  # the magnitude is drawn inside the branch: one per op and sample
            return _RA[pool[lo]](self, x, RANDAUGMENT_RANGES[pool[lo]])
        mid = (lo + hi) // 2
        if which <= mid:
            x = self.select(x, which, pool, lo, mid)
        else:
            x = self.select(x, which, pool, mid + 1, hi)
        return x

    def cutout(self, x, op: Op):
        side = float(round(op.params["size_frac"] * self.size))
        # integer centre uniform over the pixels, region [c - side/2, c + side/2) clipped (FixMatch's cutout)
        cy, cx = (fn.random.uniform(values=list(range(self.size)), dtype=types.FLOAT) for _ in "yx")
        self.record("cutout_y", cy)
        self.record("cutout_x", cx)
        return fn.erase(
            x, anchor=fn.stack(cy, cx), shape=[side, side], centered_anchor=True, axis_names="HW",
            fill_value=GREY,
        )


def _solarize(x, threshold):
    """Invert the pixels >= threshold (a per-sample scalar on the images' device)."""
    inverted = x >= threshold
    return fn.cast(x + inverted * (255 - 2 * fn.cast(x, dtype=types.INT16)), dtype=types.UINT8)


def _coin(p: float, dtype):
    """A per-sample Bernoulli(p) draw of `dtype` (coin_flip itself makes only bool/uint8/int32)."""
    coin = fn.random.coin_flip(probability=p, dtype=types.BOOL)
    return coin if dtype == types.BOOL else fn.cast(coin, dtype=dtype)


def _uniform(rng: tuple[float, float]):
    """A per-sample uniform draw from the closed range (a plain float where the range is a point)."""
    lo, hi = rng
    return float(lo) if lo == hi else fn.random.uniform(range=[lo, hi])


def _autocontrast(g: _Graph, x, _):
    """Stretch each channel to [0, 255] (PIL ImageOps.autocontrast, cutoff 0); flat channels stay."""
    lo = fn.reductions.min(x, axis_names="HW", keep_dims=True)
    hi = fn.reductions.max(x, axis_names="HW", keep_dims=True)
    spread = hi > lo
    scale = 255.0 / (spread * (hi - lo) + (spread ^ True))
    return fn.cast((x - lo * spread) * scale, dtype=types.UINT8)


def _sharpness(g: _Graph, x, rng):
    """PIL ImageEnhance.Sharpness: blend with PIL's 3x3 smoothing filter by factor f, as one kernel."""
    smooth = np.float32([[1, 1, 1], [1, 5, 1], [1, 1, 1]]) / 13
    ident = np.float32([[0, 0, 0], [0, 1, 0], [0, 0, 0]])
    kernel = types.Constant(smooth) + _uniform(rng) * types.Constant(ident - smooth)
    return fn.filter(x, g.dev(kernel))


def _posterize(g: _Graph, x, rng):
    """Keep the top `bits` bits, bits uniform over the integers of the range (4..8)."""
    bits = fn.random.uniform(values=list(range(int(rng[0]), int(rng[1]) + 1)), dtype=types.INT32)
    masks = types.Constant(np.uint8([0xFF ^ (2 ** (8 - b) - 1) for b in range(9)]))
    return x & g.dev(masks[bits])


def _affine(kind: str, axis: int):
    """shear_x/y (coefficient) or translate_x/y (fraction of the side) about the top-left corner,
    as PIL's affine transform in FixMatch's code; the uncovered area is grey."""

    def op(g: _Graph, x, rng):
        m = _uniform(rng)
        vec = fn.stack(m, m * 0) if axis == 0 else fn.stack(m * 0, m)  # (x, y)
        matrix = fn.transforms.shear(shear=vec) if kind == "shear" else fn.transforms.translation(offset=vec * g.size)
        return fn.warp_affine(x, matrix=matrix, fill_value=GREY, inverse_map=False)

    return op


# FixMatch's pool (recipes.RANDAUGMENT_POOL): op name -> emitter(graph, images, magnitude range).
_RA = {
    "identity": lambda g, x, rng: x,
    "autocontrast": _autocontrast,
    "brightness": lambda g, x, rng: fn.brightness(x, brightness=_uniform(rng)),
    "color": lambda g, x, rng: fn.saturation(x, saturation=_uniform(rng)),
    "contrast": lambda g, x, rng: g.contrast(x, _uniform(rng)),
    "equalize": lambda g, x, rng: fn.equalize(x),
    "posterize": _posterize,
    "rotate": lambda g, x, rng: fn.rotate(x, angle=_uniform(rng), keep_size=True, fill_value=GREY),
    "sharpness": _sharpness,
    "shear_x": _affine("shear", 0),
    "shear_y": _affine("shear", 1),
    "solarize": lambda g, x, rng: _solarize(x, g.dev(255 * _uniform(rng))),
    "translate_x": _affine("translate", 0),
    "translate_y": _affine("translate", 1),
}


@pipeline_def(enable_conditionals=True)
def recipe_pipeline(source, recipe: Recipe, *, gpu: bool, fused_decode: bool, out_dtype: str = "FLOAT",
                    layout: str = "CHW", param_names: list | None = None):
    """The DALI graph of `recipe`: encoded files and int64 labels from `source` (an iterable of
    batches) -> one normalized output per view (`layout` CHW or HWC, `out_dtype` FLOAT/FLOAT16),
    the labels, then, when a `param_names` list is given, the per-sample decisions of every view
    as float32 scalars; their names are appended to `param_names` (one list per view)."""
    jpegs, labels = fn.external_source(source=source, num_outputs=2, batch=True,
                                       dtype=[types.UINT8, types.INT64])
    graph = _Graph(recipe, gpu=gpu, fused_decode=fused_decode, out_dtype=out_dtype, layout=layout)
    outs = [*graph.views(jpegs), labels.gpu() if gpu else labels]
    if param_names is not None:
        param_names.extend(list(p) for p in graph.params)
        outs += [node for p in graph.params for node in p.values()]
    return tuple(outs)


# --------------------------------------------------------------------------------------- loader


class _EncodedBatches:
    """Yields (encoded files, int64 labels) batch after batch for the given sample indices; each
    batch's files are read by `workers` threads (file reads release the GIL)."""

    def __init__(self, files: Sequence[Path], labels: np.ndarray, indices: np.ndarray, batch_size: int, workers: int):
        self.files, self.labels, self.indices = files, labels, indices
        self.batch_size, self.workers = batch_size, workers

    def read(self, idx: np.ndarray) -> list[np.ndarray]:
        return [np.fromfile(self.files[i], dtype=np.uint8) for i in idx]

    def __iter__(self) -> Iterator[tuple[list[np.ndarray], np.ndarray]]:
        with ThreadPoolExecutor(self.workers) as pool:
            for start in range(0, len(self.indices) - self.batch_size + 1, self.batch_size):
                idx = self.indices[start : start + self.batch_size]
                parts = pool.map(self.read, np.array_split(idx, self.workers))
                yield [data for part in parts for data in part], self.labels[idx]


def _device_id(device: str | torch.device) -> int | None:
    device = torch.device(device)
    if device.type == "cpu":
        return None
    if device.type != "cuda":
        raise ValueError(f"DaliLoader: device {device} is neither cpu nor cuda")
    return device.index if device.index is not None else torch.cuda.current_device()


class DaliLoader:
    """Batches of `recipe`'s views of image files, decoded and augmented by DALI.

    Each epoch this rank reads its shard of `sampler.epoch_indices` (a full reshuffle; the ragged end
    dropped, or padded by wrapping with drop_last=False) through a graph built with the seed
    `sampler.rank_seed(seed, rank, epoch)`: same seed, same batches; ranks and epochs differ. Like
    DistributedSampler, call `set_epoch` before each epoch. Yields `(views, labels)`: a tuple of
    [B, 3, size, size] tensors of `dtype` on `device` (channels_last memory if asked) and int64
    labels [B], all freshly allocated (the caller owns them). `device="cpu"` runs DALI's CPU mode.
    Once `set_epoch` is in use, each epoch also prepares the next one's graph in a background thread
    (defined, built, first batches scheduled), so a new epoch starts without that wait.

    files: image paths, or an ImageFolderIndex (then `labels` may be None). indices: restrict to
    those positions of `files` (e.g. a labelled split). fused_decode: each view that starts with
    random_resized_crop decodes its own crop window (`image_random_crop`) instead of sharing one
    full decode; default: fused for single-view recipes only. return_params: yield
    `(views, labels, params)`, params a tuple (per view) of {decision: float32 [B] CPU tensor}
    (hflip, color_jitter, grayscale, solarize, gaussian_blur where p < 1: 1 applied / 0 not; jitter
    factors; translate_y/x px; randaugment{slot}: pool index or -1; cutout_y/x centre px).
    stream_priority: CUDA priority of DALI's streams (lower runs first; PyTorch's streams have 0, the
    range is `torch.cuda.Stream.priority_range()`); None keeps DALI's default.
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
        prefetch: int = 2,
        fused_decode: bool | None = None,
        return_params: bool = False,
        stream_priority: int | None = None,
    ):
        require_dali()
        if hasattr(files, "files"):  # an ImageFolderIndex
            labels = files.labels if labels is None else labels
            files = files.files
        if labels is None:
            raise ValueError("DaliLoader: labels are required with a list of files")
        self.files = [Path(f) for f in files]
        self.labels = np.asarray(labels, dtype=np.int64)
        if len(self.labels) != len(self.files) or not self.files:
            raise ValueError(f"DaliLoader: {len(self.files)} files but {len(self.labels)} labels")
        if dtype not in _DALI_DTYPES:
            raise ValueError(f"DaliLoader: dtype {dtype} is not one of {', '.join(map(str, _DALI_DTYPES))}")
        self.device, self.device_id = torch.device(device), _device_id(device)
        self.pool = np.arange(len(self.files)) if indices is None else np.asarray(indices, dtype=np.int64)
        self.recipe, self.batch_size, self.seed = recipe, batch_size, seed
        self.rank, self.world_size, self.drop_last = rank, world_size, drop_last
        self.dtype, self.channels_last, self.return_params = dtype, channels_last, return_params
        self.fused_decode = len(recipe.views) == 1 if fused_decode is None else fused_decode
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
        self.num_threads, self.prefetch = num_threads or min(8, cores), prefetch
        self.stream_priority = stream_priority
        self.epoch = 0
        self._len = len(self._indices(0)) // batch_size  # also validates batch_size, rank, world_size
        self._epochs_set = False  # set_epoch in use: the next iteration will read epoch + 1
        self._ahead: tuple[int, Future] | None = None  # (epoch, its pipeline being prepared)
        self._builder: ThreadPoolExecutor | None = None

    def __len__(self) -> int:
        return self._len

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch the next iteration reads (its permutation and its random streams)."""
        self.epoch, self._epochs_set = epoch, True

    def _indices(self, epoch: int) -> np.ndarray:
        local = epoch_indices(len(self.pool), epoch=epoch, seed=self.seed, rank=self.rank, world_size=self.world_size,
                              batch_size=self.batch_size, drop_last=self.drop_last)
        return self.pool[local]

    def pipeline(self, epoch: int, param_names: list | None = None):
        """The DALI pipeline that reads `epoch` (call build(), then run() once per batch, len(self) times).
        With return_params, `param_names` (a list) receives the names of each view's params outputs."""
        return recipe_pipeline(
            _EncodedBatches(self.files, self.labels, self._indices(epoch), self.batch_size, self.num_threads),
            self.recipe,
            gpu=self.device_id is not None, fused_decode=self.fused_decode, out_dtype=_DALI_DTYPES[self.dtype],
            layout="HWC" if self.channels_last else "CHW", param_names=param_names if self.return_params else None,
            batch_size=self.batch_size, num_threads=self.num_threads, device_id=self.device_id,
            seed=rank_seed(self.seed, self.rank, epoch), prefetch_queue_depth=self.prefetch,
            **({} if self.stream_priority is None or self.device_id is None
               else {"default_cuda_stream_priority": self.stream_priority}),
        )

    def _started(self, epoch: int) -> tuple:
        """(the pipeline of `epoch`, built, its first batches scheduled; its params names per view)."""
        names: list[list[str]] = []
        pipe = self.pipeline(epoch, names)
        pipe.build()
        pipe.schedule_run()
        return pipe, names

    def _take(self, epoch: int) -> tuple:
        """The started pipeline of `epoch`: the one prepared ahead if it is that epoch's, else a new one."""
        ahead, self._ahead = self._ahead, None
        if ahead is not None:
            started = ahead[1].result()  # a preparation for another epoch is waited for and dropped
            if ahead[0] == epoch:
                return started
            del started
        return self._started(epoch)

    def __iter__(self) -> Iterator[tuple]:
        epoch = self.epoch
        pipe, param_names = self._take(epoch)
        if self._epochs_set:  # the caller steps through epochs: prepare the next while this one runs
            self._builder = self._builder or ThreadPoolExecutor(1, thread_name_prefix="dali-next-epoch")
            self._ahead = (epoch + 1, self._builder.submit(self._started, epoch + 1))
        stream = torch.cuda.current_stream(self.device) if self.device_id is not None else None
        n, cpu = len(self.recipe.views), torch.device("cpu")
        for b in range(self._len):
            outs = pipe.outputs()  # _started scheduled the first batches (DALI's prefetch queue)
            views = tuple(self._view(outs[i], i, stream) for i in range(n))
            labels = _owned(outs[n], torch.int64, self.device, stream)
            if self.return_params:
                flat = iter(outs[n + 1 :])
                params = tuple({k: _owned(next(flat), torch.float32, cpu, None) for k in names}
                               for names in param_names)
            if b + 1 < self._len:
                pipe.schedule_run()  # the batch after those queued (once this one's outputs are copied)
            yield (views, labels, params) if self.return_params else (views, labels)

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
