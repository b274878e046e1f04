"""The size rule: what the image sizes of a data set decide, in one place for pretraining, FixMatch,
evaluation and the loaders.

The median of the training images' longer sides decides, so a few odd images cannot switch the recipe.
At most SMALL_SIDE px the data is small (CIFAR-like): the small-image recipes (no blur, translated
crops) at the size most of its images have, held in memory (or decoded by DALI) at that one size;
images of another size are refused, each named, before any model is built. Above it the data is large:
the large-image recipes at LARGE_SIZE px (random resized crops through DALI), which take any size;
images whose longer side is more than FAR times off the median are reported as outliers.
`fastse data check` prints what the rule reads in each split.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .datasets import DataError, ImageFolderIndex, _listing
from .recipes import SMALL_SIDE  # px: data whose median longer side is at most this is small (CIFAR-like)

LARGE_SIZE = 224  # px: the training crop of large data when none is set
FAR = 4  # large data: an image whose longer side is over FAR x or under 1 / FAR x the median is an outlier


@dataclass(frozen=True)
class ImageSizes:
    """What the size rule reads in a data set (`image_sizes`). side: the median of the training images'
    longer sides (px); shape: the (height, width) in px most training images have; sizes: int32 [N, 2]
    (height, width) of every image given, training split first, with their `files`."""

    root: Path
    side: int
    shape: tuple[int, int]
    sizes: np.ndarray
    files: list[Path]

    @property
    def small(self) -> bool:
        """Small data: the small-image recipes at one size (`shape`)."""
        return self.side <= SMALL_SIDE

    @property
    def default_size(self) -> int:
        """The training crop (px) when none is set: the longer side of `shape` for small data, else LARGE_SIZE."""
        return max(self.shape) if self.small else LARGE_SIZE

    @property
    def verdict(self) -> str:
        """One phrase for the run's summary line, e.g. `small images (median side 32 px)`."""
        return f"{'small' if self.small else 'large'} images (median side {self.side} px)"

    def off_shape(self) -> np.ndarray:
        """Indices into `sizes` of the images not of `shape`."""
        return np.flatnonzero((self.sizes != np.asarray(self.shape)).any(1))

    def outliers(self) -> np.ndarray:
        """Indices into `sizes` of the images off the rule: not of `shape` (small data), or with a longer side
        more than FAR x off the median (large data)."""
        if self.small:
            return self.off_shape()
        longer = self.sizes.max(1)
        return np.flatnonzero((longer > FAR * self.side) | (FAR * longer < self.side))

    def check(self, *, one_size: bool = False) -> ImageSizes:
        """Self, unless the data must be of one size (small data; or `one_size`: large images held in memory)
        and some images are not of `shape`: then a DataError naming them."""
        odd = self.off_shape()
        if not len(odd) or not (self.small or one_size):
            return self
        h, w = self.shape
        why = "small images are trained at one size" if self.small else "the images are held in memory at one size"
        head = (f"{self.root}: {len(odd)} of {len(self.sizes)} images are not {h}x{w} px, the size of the data "
                f"(median side {self.side} px; {why}); remove or resize them")
        raise DataError(_listing(head, self._named(odd)))

    def describe(self) -> str:
        """What `fastse data check` prints: the distribution, the choice it makes and the outliers (lines)."""
        longer = self.sizes.max(1)
        distinct, counts = np.unique(self.sizes, axis=0, return_counts=True)
        if len(distinct) == 1:
            spread = "all {}x{} px".format(*distinct[0])
        else:
            h, w = distinct[counts.argmax()]
            spread = (f"{len(distinct)} sizes, longer side {longer.min()}-{longer.max()} px, most often {h}x{w} px "
                      f"({counts.max()} images)")
        recipe = (f"small-image recipes at {self.default_size} px" if self.small
                  else f"large-image recipes at {LARGE_SIZE} px")
        text = f"image sizes: {spread}; median longer side {self.side} px: {recipe}"
        odd = self.outliers()
        if not len(odd):
            return text
        what = ("not {}x{} px: refused for training".format(*self.shape) if self.small
                else f"over {FAR}x off the median side")
        return text + "\n" + _listing(f"{len(odd)} outlier(s), {what}", self._named(odd))

    def _named(self, indices: np.ndarray) -> list[tuple[Path, str]]:
        return [(self.files[i], "{}x{} px".format(*self.sizes[i])) for i in indices]


def image_sizes(train: ImageFolderIndex, *others: ImageFolderIndex) -> ImageSizes:
    """The size rule on `train` (the images trained on decide), its images and those of `others` (e.g. the
    test split) read against it. Indexes need the sizes `datasets.scan_image_folder` reads."""
    indexes = (train, *others)
    if any(index.sizes is None or not len(index.sizes) for index in indexes):
        raise DataError(f"{train.root}: the index has no image sizes; build it with datasets.scan_image_folder")
    longer = np.sort(train.sizes.max(1))
    distinct, counts = np.unique(train.sizes, axis=0, return_counts=True)
    h, w = (int(x) for x in distinct[counts.argmax()])
    return ImageSizes(root=train.root, side=int(longer[(len(longer) - 1) // 2]), shape=(h, w),
                      sizes=np.concatenate([index.sizes for index in indexes]),
                      files=[f for index in indexes for f in index.files])
