"""Datasets: class-folder image trees found, validated before training, and decoded once.

Layout: `root/<class>/<image>` or `root/<split>/<class>/<image>`; classes are the sorted names of the
sub-folders, so labels are the same on every machine. Images are JPEG or PNG, told apart by their
bytes, not their names. Folder links are followed out of the tree only, each folder read once: a
link back into the tree (a cycle, another class) is not followed, and reported. The bad-data policy
is in docs/DATA.md: gray, CMYK and PNG images are decoded to RGB and counted; corrupt or truncated
files, empty class folders, unsupported image formats and missing or empty roots are refused before
training with the offending paths.
"""

from __future__ import annotations

import hashlib
import json
import logging
import multiprocessing
import os
import secrets
import shutil
import struct
import subprocess
import sys
import tarfile
import tempfile
import time
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np
from PIL import Image, ImageOps

from fastse.atomic import write_atomic

from .recipes import CIFAR10_MEAN, CIFAR10_STD, CIFAR100_MEAN, CIFAR100_STD, IMAGENET_MEAN, IMAGENET_STD

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".png"})
# Image files we do not read: refused rather than silently dropped from the training set.
UNSUPPORTED_SUFFIXES = frozenset({".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm", ".jp2", ".heic"})
ARCHIVE_SUFFIXES = (".tar.zst", ".tar.gz", ".tgz", ".tar")
SPLIT_NAMES = frozenset({"train", "val", "valid", "validation", "test"})
TORCHVISION_SETS = {"cifar10": "CIFAR10", "cifar100": "CIFAR100"}
KNOWN_STATS = {
    "cifar10": (CIFAR10_MEAN, CIFAR10_STD),
    "cifar100": (CIFAR100_MEAN, CIFAR100_STD),
    "imagenet": (IMAGENET_MEAN, IMAGENET_STD),
}
SPLIT_FILE = "labeled_split.json"
COMPLETE = ".complete"

_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
_JPEG_SOF = frozenset(range(0xC0, 0xD0)) - {0xC4, 0xC8, 0xCC}  # frame headers (not DHT, JPG, DAC)
_JPEG_STANDALONE = frozenset(range(0xD0, 0xD8)) | {0x01, 0xD8}  # markers without a length field
_PNG_CHANNELS = {0: 1, 2: 3, 3: 3, 4: 2, 6: 4}  # IHDR colour type -> channels
_TAIL = 1024  # bytes read at the end of a file to find its end marker
_LISTED = 10  # offending paths named in one error message


class DataError(ValueError):
    """Data that cannot be trained on; the message names the offending path(s)."""


@dataclass
class ImageFolderIndex:
    """The images of one class-folder tree (or one split of it), in a fixed order.

    files: absolute paths; labels: int64 [N], index into `classes`; sizes: int32 [N, 2] (height,
    width) in px as stored in the file headers (before any EXIF rotation); counts: what the scan
    found ("jpeg", "png", "gray", "cmyk", "ignored" non-image files, "skipped" corrupt files);
    skipped: the corrupt files left out (on_corrupt="skip"); unfollowed: (link, why) of the folder
    links the walk did not follow (`_walk`).
    """

    root: Path
    classes: list[str]
    files: list[Path]
    labels: np.ndarray
    sizes: np.ndarray | None = None
    counts: dict[str, int] = field(default_factory=dict)
    skipped: list[Path] = field(default_factory=list)
    unfollowed: list[tuple[Path, str]] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.files)

    def summary(self) -> str:
        c = self.counts
        kinds = ", ".join(f"{k} {c[k]}" for k in ("jpeg", "png", "gray", "cmyk") if c.get(k))
        text = f"{len(self)} images in {len(self.classes)} classes at {self.root}"
        text += f" ({kinds}; gray, CMYK and PNG are decoded to RGB)" if kinds else ""
        if c.get("ignored"):
            text += f"; ignored {c['ignored']} non-image files"
        if c.get("skipped"):
            text += f"; skipped {c['skipped']} corrupt files"
        if self.unfollowed:
            text += f"; did not follow {len(self.unfollowed)} folder link(s) (a cycle, into the tree or read before)"
        return text


def default_cache_dir() -> Path:
    """$FASTSE_CACHE, else ~/.cache/fastse."""
    return Path(os.environ.get("FASTSE_CACHE", Path.home() / ".cache/fastse")).expanduser()


# ----------------------------------------------------------------------------------------------- scan


def scan_image_folder(
    root: str | Path,
    *,
    split: str | None = None,
    classes: Sequence[str] | None = None,
    on_corrupt: Literal["raise", "skip"] = "raise",
    deep: bool = False,
    workers: int | None = None,
) -> ImageFolderIndex:
    """Index and validate `root/<class>/*` (or `root/<split>/<class>/*`) before training.

    Every image's header and end marker are read (a few KB a file, in parallel processes); `deep`
    also decodes every image. `classes` pins the expected class folders (e.g. the train split's,
    so a test split cannot shift the labels). Corrupt or truncated files raise a DataError listing
    them, or are left out and counted with on_corrupt="skip".
    """
    if on_corrupt not in ("raise", "skip"):
        raise ValueError(f"on_corrupt={on_corrupt!r}: use 'raise' or 'skip'")
    folder = Path(root).expanduser().absolute() / (split or "")
    if not folder.is_dir():
        what = "is not a folder" if folder.exists() else "does not exist"
        raise DataError(f"{folder}: {what}; expected a class-folder tree (<class>/<image>.jpg)")
    folder = folder.resolve()
    class_dirs = sorted(d for d in _entries(folder) if d.is_dir() and not d.name.startswith("."))
    if not class_dirs:
        raise DataError(f"{folder}: no class folders; expected one sub-folder per class (<class>/<image>)")
    names = [d.name for d in class_dirs]
    if classes is not None and names != list(classes):
        missing, extra = sorted(set(classes) - set(names)), sorted(set(names) - set(classes))
        raise DataError(f"{folder}: class folders are not the expected ones (missing {missing}, extra {extra})")

    real = {d: os.path.realpath(d) for d in class_dirs}
    for link in (d for d in class_dirs if d.is_symlink()):
        for other in (d for d in class_dirs if d != link):
            if _within(real[link], real[other]) or _within(real[other], real[link]):
                raise DataError(f"{link}: a link to {real[link]}, which overlaps class folder {other.name}: "
                                "their images would be read under two labels")
    tree = [str(folder), *real.values()]
    files, labels, unsupported, empty, ignored, unfollowed, seen = [], [], [], [], 0, [], {}
    for label, class_dir in enumerate(class_dirs):
        found = 0
        seen[real[class_dir]] = class_dir
        for dirpath, filenames in _walk(class_dir, tree, seen, unfollowed):
            for name in filenames:
                suffix = os.path.splitext(name)[1].lower()
                if not name.startswith(".") and suffix in IMAGE_SUFFIXES:
                    files.append(Path(dirpath, name))
                    labels.append(label)
                    found += 1
                elif not name.startswith(".") and suffix in UNSUPPORTED_SUFFIXES:
                    unsupported.append((Path(dirpath, name), f"{suffix} is not read (JPEG and PNG are)"))
                else:
                    ignored += 1
        if not found:
            empty.append((class_dir, "class folder has no images (.jpg, .jpeg, .png)"))
    if unsupported:
        raise DataError(_listing(f"{len(unsupported)} unsupported image file(s) under {folder}", unsupported))
    if empty:
        raise DataError(_listing(f"{len(empty)} empty class folder(s) under {folder}", empty))

    probes = _flat(_parallel(_probe_chunk, _chunks(files, 1024), workers=workers))
    bad = {i: p for i, p in enumerate(probes) if isinstance(p, str)}
    if deep:
        good = [i for i in range(len(files)) if i not in bad]
        chunks = _chunks([files[i] for i in good], 256)
        errors = _flat(_parallel(_verify_chunk, chunks, workers=workers))
        bad.update((i, e) for i, e in zip(good, errors, strict=True) if e)
    if bad and on_corrupt == "raise":
        head = f"{len(bad)} corrupt or truncated image(s) under {folder}"
        listing = _listing(head, [(files[i], why) for i, why in sorted(bad.items())])
        raise DataError(f"{listing}\nremove or replace them (`fastse data check {folder} --deep` also decodes every "
                        "image, to find any others)")

    keep = [i for i in range(len(files)) if i not in bad]
    kept = [probes[i] for i in keep]
    kinds = Counter(kind for kind, _, _, _ in kept)
    index = ImageFolderIndex(
        root=folder,
        classes=names,
        files=[files[i] for i in keep],
        labels=np.asarray([labels[i] for i in keep], dtype=np.int64),
        sizes=np.asarray([(h, w) for _, _, h, w in kept], dtype=np.int32).reshape(-1, 2),
        counts={
            "jpeg": kinds["jpeg"],
            "png": kinds["png"],
            "gray": sum(ch <= 2 for _, ch, _, _ in kept),
            "cmyk": sum(kind == "jpeg" and ch == 4 for kind, ch, _, _ in kept),
            "ignored": ignored,
            "skipped": len(bad),
        },
        skipped=[files[i] for i in sorted(bad)],
        unfollowed=unfollowed,
    )
    lost = [names[c] for c in np.flatnonzero(np.bincount(index.labels, minlength=len(names)) == 0)]
    if lost:
        raise DataError(f"{folder}: class folder(s) {lost} hold no valid image once corrupt ones are skipped")
    if unfollowed:
        log.warning(_listing(f"{folder}: {len(unfollowed)} folder link(s) not followed", unfollowed))
    if bad:
        log.warning("%s: %s", index.summary(), ", ".join(map(str, index.skipped[:_LISTED])))
    elif ignored or any(index.counts[k] for k in ("png", "gray", "cmyk")):
        log.info(index.summary())
    return index


def _walk(class_dir: Path, tree: list[str], seen: dict[str, Path], unfollowed: list[tuple[Path, str]]
          ) -> Iterator[tuple[str, list[str]]]:
    """(folder, sorted file names) of `class_dir` and its non-hidden sub-folders, in sorted order, each real
    folder once. A folder link is followed only out of the tree (`tree`: the real paths of the root and the
    class folders, which are read directly) and not to a folder holding it (a cycle); a folder read before
    (`seen`: real path -> the path it was read at) is not read again. Links and folders left out go to
    `unfollowed` with the reason, so no file is read twice or under another class."""
    for dirpath, dirnames, filenames in os.walk(class_dir, onerror=_unreadable, followlinks=True):
        here, keep = os.path.realpath(dirpath), []
        for name in sorted(d for d in dirnames if not d.startswith(".")):
            path = os.path.join(dirpath, name)
            target = os.path.realpath(path)
            if os.path.islink(path) and _within(here, target):
                why = "a folder holding it (a cycle)"
            elif os.path.islink(path) and any(_within(target, t) or _within(t, target) for t in tree):
                why = "inside the data tree, whose folders are read directly"
            elif target in seen:
                why = f"already read as {seen[target]}"
            else:
                seen[target] = Path(path)
                keep.append(name)
                continue
            unfollowed.append((Path(path), f"not followed: it leads to {target}, {why}"))
        dirnames[:] = keep
        yield dirpath, sorted(filenames)


def _entries(folder: Path) -> list[Path]:
    """The entries of `folder`; DataError where it cannot be listed (no permission)."""
    try:
        return list(folder.iterdir())
    except OSError as e:
        raise DataError(f"{folder}: cannot be read ({e.strerror or e})") from None


def _unreadable(error: OSError) -> None:
    """`os.walk`'s onerror: a folder of the tree that cannot be listed is refused, not taken for an empty one."""
    raise DataError(f"{error.filename}: cannot be read ({error.strerror or error})")


def _within(path: str, folder: str) -> bool:
    """Whether the real path `path` is `folder` or inside it."""
    return path == folder or path.startswith(folder.rstrip(os.sep) + os.sep)


class _Corrupt(Exception):
    """A JPEG whose marker structure is broken; the message says how."""


def _probe(path: Path) -> tuple[str, int, int, int] | str:
    """(kind, channels, height, width) from the header of a JPEG or PNG file, or why it is unusable."""
    try:
        with open(path, "rb") as fh:
            size = os.fstat(fh.fileno()).st_size
            head = fh.read(32)
            if head.startswith(b"\xff\xd8\xff"):
                channels, height, width, data_start = _jpeg_frame(fh)
                end = b"\xff\xd9"  # EOI; cannot occur inside entropy-coded data
            elif head.startswith(_PNG_SIGNATURE):
                if head[12:16] != b"IHDR" or len(head) < 26:
                    return "PNG without an IHDR header"
                width, height = struct.unpack(">II", head[16:24])
                channels, data_start, end = _PNG_CHANNELS.get(head[25], 0), 33, b"IEND"
            elif size == 0:
                return "empty file"
            else:
                return "neither JPEG nor PNG (unknown file signature)"
            fh.seek(max(data_start, size - _TAIL))
            if end not in fh.read():
                return "truncated (no end-of-image marker)"
    except (OSError, ValueError, struct.error, _Corrupt) as e:
        return str(e) or type(e).__name__
    if not (height and width and channels):
        return f"invalid header ({width}x{height} px, {channels} channels)"
    return ("jpeg" if end == b"\xff\xd9" else "png"), channels, height, width


def _jpeg_frame(fh) -> tuple[int, int, int, int]:
    """Walk the JPEG marker segments after SOI, reading 4 KB at a time: (components, height, width)
    from the frame header and the file offset where the first scan's entropy-coded data starts."""
    base, buf, pos, frame = 0, b"", 2, None
    while True:
        if pos + 10 > len(buf):  # a marker, its length and a frame header's fields fit in 10 bytes
            base += pos
            fh.seek(base)
            buf, pos = fh.read(4096), 0
            if len(buf) < 10:
                raise _Corrupt("truncated JPEG header")
        if buf[pos] != 0xFF:
            raise _Corrupt("broken JPEG header (marker expected)")
        marker = buf[pos + 1]
        if marker == 0xFF:  # fill byte
            pos += 1
            continue
        if marker in _JPEG_STANDALONE:
            pos += 2
            continue
        length = int.from_bytes(buf[pos + 2 : pos + 4], "big")
        if length < 2:
            raise _Corrupt("broken JPEG header (segment length)")
        if marker in _JPEG_SOF:
            _, height, width, components = struct.unpack_from(">BHHB", buf, pos + 4)
            frame = (components, height, width)
        elif marker == 0xDA:  # start of scan
            if frame is None:
                raise _Corrupt("JPEG scan before any frame header")
            return (*frame, base + pos + 2 + length)
        elif marker == 0xD9:
            raise _Corrupt("JPEG ends before any image data")
        pos += 2 + length


def _probe_chunk(paths: list[Path]) -> list[tuple[str, int, int, int] | str]:
    return [_probe(p) for p in paths]


def _decode(path: Path) -> tuple[np.ndarray, str]:
    """HWC uint8 RGB pixels of one image, turned upright by its EXIF orientation as DALI's decoders
    do, and its PIL mode before conversion. PIL raises on truncated or undecodable data."""
    with Image.open(path) as im:
        return np.asarray(ImageOps.exif_transpose(im).convert("RGB")), im.mode


def _verify_chunk(paths: list[Path]) -> list[str]:
    errors = []
    for p in paths:
        try:
            _decode(p)
            errors.append("")
        except Exception as e:  # PIL raises many types for bad data; each becomes one line of the report
            errors.append(f"does not decode ({type(e).__name__}: {e})")
    return errors


def _listing(head: str, items: list[tuple[Path, str]]) -> str:
    lines = [f"{head}:"] + [f"  {path}: {why}" for path, why in items[:_LISTED]]
    if len(items) > _LISTED:
        lines.append(f"  ... and {len(items) - _LISTED} more")
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------ parallel


def _chunks(items: list, size: int) -> list[list]:
    return [items[i : i + size] for i in range(0, len(items), size)]


def _flat(parts: list[list]) -> list:
    return [x for part in parts for x in part]


def _cpus() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def _parallel(fn: Callable, tasks: list, *, workers: int | None) -> list:
    """[fn(t) for t in tasks], over one process per core (by default) when there are several tasks.
    Forked on Linux, as torch's DataLoader: workers need no re-import of the caller's script."""
    workers = min(workers or _cpus(), len(tasks))
    if workers <= 1:
        return [fn(t) for t in tasks]
    ctx = multiprocessing.get_context("fork" if sys.platform == "linux" else None)
    with ProcessPoolExecutor(workers, mp_context=ctx) as pool:
        return list(pool.map(fn, tasks))


# -------------------------------------------------------------------------------------------- decode


def load_uint8(
    index: ImageFolderIndex, *, cache_dir: str | Path | None = None, workers: int | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """All images of `index` decoded to RGB: (uint8 [N, H, W, 3], int64 labels [N]).

    Decodes in parallel processes straight into a .npy file under `cache_dir/arrays`, named by a
    hash of the file list (paths, sizes, mtimes) and labels; a later call with the same files
    loads that file. Every image must have the same size; one that fails to decode raises a
    DataError naming it.
    """
    n = len(index.files)
    if n == 0:
        raise DataError(f"{index.root}: the index holds no images")
    sizes = index.sizes if index.sizes is not None else np.asarray([_decode(index.files[0])[0].shape[:2]])
    distinct, first = np.unique(sizes, axis=0, return_index=True)
    if len(distinct) > 1:
        (a, b), (ha, wa), (hb, wb) = (index.files[i] for i in first[:2]), *sizes[first[:2]].tolist()
        raise DataError(
            f"{index.root}: images differ in size (height x width: {a}: {ha}x{wa} px, {b}: {hb}x{wb} px); "
            "in-memory loading needs one size, use the DALI backend"
        )
    height, width = (int(x) for x in distinct[0])
    shape = (n, height, width, 3)
    folder = Path(cache_dir).expanduser() if cache_dir else default_cache_dir()
    folder = folder / "arrays"
    key = _file_list_key(index)
    name = f"{index.root.parent.name}-{index.root.name}-{n}-{key[:16]}"
    array_path, meta_path = folder / f"{name}.npy", folder / f"{name}.json"
    if meta_path.is_file() and array_path.is_file():
        meta = json.loads(meta_path.read_text())
        if meta.get("key") == key and meta.get("shape") == list(shape):
            return np.load(array_path), index.labels.astype(np.int64, copy=True)

    _writable_cache(folder)
    tmp = folder / f".{name}.{os.getpid()}-{secrets.token_hex(4)}.npy"  # unique on a cache that nodes share
    np.lib.format.open_memmap(tmp, mode="w+", dtype=np.uint8, shape=shape).flush()
    start = time.perf_counter()
    try:
        step = max(64, min(2048, -(-n // (8 * _cpus()))))
        jobs = [(tmp, i, index.files[i : i + step], (height, width)) for i in range(0, n, step)]
        reports = _parallel(_decode_into, jobs, workers=workers)
        errors = [e for r in reports for e in r["errors"]]
        if errors:
            raise DataError(_listing(f"{len(errors)} image(s) under {index.root} failed to decode", errors))
        os.replace(tmp, array_path)
    finally:
        tmp.unlink(missing_ok=True)
    modes = sum((Counter(r["modes"]) for r in reports), Counter())
    seconds = time.perf_counter() - start
    meta = {
        "key": key,
        "shape": list(shape),
        "root": str(index.root),
        "classes": index.classes,
        "modes": dict(modes),
        "decode_seconds": round(seconds, 2),
    }
    write_atomic(meta_path, json.dumps(meta, indent=1))
    converted = {m: c for m, c in modes.items() if m != "RGB"}
    log.info("decoded %d images in %.1f s into %s (converted to RGB: %s)", n, seconds, array_path, converted)
    return np.load(array_path), index.labels.astype(np.int64, copy=True)


def _decode_into(job: tuple[Path, int, list[Path], tuple[int, int]]) -> dict:
    """Decode one chunk of files into rows [start, start + len) of the .npy file at `array_path`."""
    array_path, start, paths, hw = job
    out = np.lib.format.open_memmap(array_path, mode="r+")
    errors, modes = [], Counter()
    for i, path in enumerate(paths):
        try:
            pixels, mode = _decode(path)
        except Exception as e:  # PIL raises many types for bad data; each becomes one line of the report
            errors.append((path, f"does not decode ({type(e).__name__}: {e})"))
            continue
        if pixels.shape[:2] != hw:
            errors.append((path, "decodes to {}x{} px, expected {}x{}".format(*pixels.shape[:2], *hw)))
            continue
        out[start + i] = pixels
        modes[mode] += 1
    out.flush()
    del out
    return {"errors": errors, "modes": dict(modes)}


def _writable_cache(folder: Path) -> None:
    """Create the cache folder `folder`; DataError naming it, and how to choose another, where it cannot
    be created or written."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
        tempfile.TemporaryFile(dir=folder).close()
    except OSError as e:
        raise DataError(f"{folder}: the cache folder cannot be written ({e.strerror or e}); choose another with "
                        "--cache-dir or $FASTSE_CACHE") from None


def _file_list_key(index: ImageFolderIndex) -> str:
    h = hashlib.sha256(f"fastse-uint8-v1\n{index.root}\n{index.classes}\n".encode())
    for path in index.files:
        st = path.stat()
        h.update(f"{path}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    h.update(np.ascontiguousarray(index.labels, dtype=np.int64).tobytes())
    return h.hexdigest()


# ------------------------------------------------------------------------------------------- sources


def resolve_data(spec: str | Path, *, cache_dir: str | Path | None = None) -> Path:
    """The root folder of a dataset given as a class-folder tree, a .tar.zst/.tar.gz/.tar archive of
    one (extracted once into `cache_dir`), or `cifar10`/`cifar100` (downloaded by torchvision and
    written once as JPEG class folders `train/<class>/NNNN.jpg`, `test/<class>/NNNN.jpg`)."""
    cache = Path(cache_dir).expanduser() if cache_dir else default_cache_dir()
    path = Path(spec).expanduser()
    if isinstance(spec, str) and spec.lower() in TORCHVISION_SETS and not path.exists():
        return _from_torchvision(spec.lower(), cache)
    if path.is_dir():
        _entries(path)  # an unreadable root is named as such, not as a tree without train/
        return path.resolve()
    if path.is_file() and path.name.lower().endswith(ARCHIVE_SUFFIXES):
        return _extract_archive(path, cache)
    if not path.exists():
        known = ", ".join(TORCHVISION_SETS)
        raise DataError(f"{path}: no such folder or archive (and not a dataset name: {known})")
    raise DataError(f"{path}: not a folder or a {'/'.join(ARCHIVE_SUFFIXES)} archive")


def _extract_archive(archive: Path, cache: Path) -> Path:
    """Extract once into cache/extracted/<name>-<hash of path, size, mtime>; published by one rename."""
    st = archive.stat()
    tag = hashlib.sha256(f"{archive.resolve()}\0{st.st_size}\0{st.st_mtime_ns}".encode()).hexdigest()[:12]
    stem = archive.name[: -len(next(s for s in ARCHIVE_SUFFIXES if archive.name.lower().endswith(s)))]
    dest = cache / "extracted" / f"{stem}-{tag}"
    if (dest / COMPLETE).is_file():
        return dest
    _writable_cache(dest.parent)
    tmp = Path(tempfile.mkdtemp(prefix=f".{stem}-", dir=dest.parent))
    try:
        _untar(archive, tmp)
        _publish(_tree_root(tmp), dest, source=archive)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return dest


def _untar(archive: Path, dest: Path) -> None:
    """Unpack with tarfile's "data" filter (no absolute paths, links out of dest or device files);
    .tar.zst is decompressed by the zstd binary where present, else by the zstandard module."""
    name = archive.name.lower()
    try:
        if name.endswith(".tar.zst") and shutil.which("zstd"):
            proc = subprocess.Popen(["zstd", "-dcq", "--", str(archive)], stdout=subprocess.PIPE)
            try:
                _untar_stream(proc.stdout, dest)
                while proc.stdout.read(1 << 20):  # the bytes after tar's end marker (its record padding):
                    pass  # unread, zstd would die of SIGPIPE when the pipe closes
            finally:
                proc.stdout.close()
                code = proc.wait()
            if code:
                raise DataError(f"{archive}: zstd failed to decompress it (exit {code})")
        elif name.endswith(".tar.zst"):
            import zstandard

            with archive.open("rb") as fh, zstandard.ZstdDecompressor().stream_reader(fh) as stream:
                _untar_stream(stream, dest)
        else:
            with archive.open("rb") as fh:
                _untar_stream(fh, dest, "r|gz" if name.endswith(("gz", ".tgz")) else "r|")
    except (tarfile.TarError, OSError, EOFError) as e:
        raise DataError(f"{archive}: not a readable tar archive ({type(e).__name__}: {e})") from e
    except Exception as e:  # zstandard.ZstdError and kin: corrupt compressed data
        if type(e).__module__.startswith("zstandard"):
            raise DataError(f"{archive}: corrupt zstd data ({e})") from e
        raise


def _untar_stream(stream, dest: Path, mode: str = "r|") -> None:
    with tarfile.open(fileobj=stream, mode=mode) as tar:
        tar.extractall(dest, filter="data")


def _tree_root(top: Path) -> Path:
    """The data root inside an unpacked archive: the top level, or its only folder when that folder
    is a wrapper (not a split such as train/, and not a class folder holding images itself)."""
    entries = [e for e in top.iterdir() if not e.name.startswith(".") and e.name != "__MACOSX"]
    if len(entries) != 1 or not entries[0].is_dir() or entries[0].name.lower() in SPLIT_NAMES:
        return top
    only = entries[0]
    holds_images = any(e.is_file() and e.suffix.lower() in IMAGE_SUFFIXES for e in only.iterdir())
    return top if holds_images else only


def _publish(tree: Path, dest: Path, *, source: object) -> None:
    """Mark `tree` complete and move it to `dest` in one rename; a tree another process published
    first wins, an incomplete leftover is replaced."""
    (tree / COMPLETE).write_text(json.dumps({"source": str(source), "created": time.time()}) + "\n")
    if dest.exists() and not (dest / COMPLETE).is_file():
        shutil.rmtree(dest)
    try:
        os.rename(tree, dest)
    except OSError:
        if not (dest / COMPLETE).is_file():
            raise


def _from_torchvision(name: str, cache: Path) -> Path:
    """CIFAR-10/100 through torchvision (download=True into cache/torchvision), written once as
    JPEG (quality 95, no chroma subsampling) class folders under cache/<name>-jpeg."""
    dest = cache / f"{name}-jpeg"
    if (dest / COMPLETE).is_file():
        return dest
    _writable_cache(cache)
    import torchvision.datasets

    dataset_cls = getattr(torchvision.datasets, TORCHVISION_SETS[name])
    raw = cache / "torchvision"
    try:
        splits = {s: dataset_cls(raw, train=s == "train", download=True) for s in ("train", "test")}
    except Exception as e:  # URLError, RuntimeError (integrity), OSError: all mean "no usable copy"
        raise DataError(
            f"{raw}: torchvision could not download or read {name} ({type(e).__name__}: {e}); "
            f"without internet, place {dataset_cls.filename} there, or pass a class-folder tree or archive"
        ) from e
    tmp = Path(tempfile.mkdtemp(prefix=f".{name}-jpeg-", dir=cache))
    try:
        for split, ds in splits.items():
            write_class_folders(ds.data, np.asarray(ds.targets), ds.classes, tmp / split)
        _publish(tmp, dest, source=f"torchvision.datasets.{dataset_cls.__name__}")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return dest


def write_class_folders(images: np.ndarray, labels: np.ndarray, classes: Sequence[str], dest: Path) -> None:
    """Write uint8 [N, H, W, 3] images as dest/<class>/<NNNN>.jpg (numbered per class, quality 95,
    4:4:4 chroma), in the order given."""
    width = max(4, len(str(int(np.bincount(labels, minlength=len(classes)).max()) - 1)))
    for cls in classes:
        (dest / cls).mkdir(parents=True, exist_ok=True)
    seen = np.zeros(len(classes), dtype=np.int64)
    for image, label in zip(images, labels, strict=True):
        path = dest / classes[label] / f"{seen[label]:0{width}d}.jpg"
        Image.fromarray(image).save(path, quality=95, subsampling=0)
        seen[label] += 1


# ------------------------------------------------------------------------------------ splits, stats


def labeled_split(labels: np.ndarray, n_labels: int, seed: int) -> np.ndarray:
    """Sorted int64 indices of `n_labels` samples, n_labels / n_classes drawn from each class by `seed`."""
    labels = np.asarray(labels)
    classes, counts = np.unique(labels, return_counts=True)
    if n_labels <= 0 or n_labels % len(classes):
        raise ValueError(f"n_labels={n_labels} must be a positive multiple of the {len(classes)} classes")
    per_class = n_labels // len(classes)
    if per_class > counts.min():
        c = classes[counts.argmin()]
        raise ValueError(f"n_labels={n_labels} needs {per_class} a class; class {c} has {counts.min()}")
    rng = np.random.default_rng(seed)
    chosen = [rng.choice(np.flatnonzero(labels == c), per_class, replace=False) for c in classes]
    return np.sort(np.concatenate(chosen)).astype(np.int64)


def save_split(path: str | Path, indices: np.ndarray, files: Sequence[str | Path]) -> Path:
    """Write the labeled indices and their files (relative to the files' common folder) as JSON.
    `path` is a .json file or a run folder (then run_folder/labeled_split.json). Returns the file."""
    path = Path(path)
    if path.is_dir():
        path = path / SPLIT_FILE
    name = _relative_names(files)
    entries = [{"index": int(i), "file": name(int(i))} for i in indices]
    path.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(path, json.dumps(entries, indent=0) + "\n")
    return path


def load_split(path: str | Path, files: Sequence[str | Path] | None = None) -> np.ndarray:
    """The int64 indices written by save_split; with `files`, checks that each index still names the
    same file (else a DataError naming the split file)."""
    path = Path(path)
    if path.is_dir():
        path = path / SPLIT_FILE
    try:
        entries = json.loads(path.read_text())
        indices = np.asarray([e["index"] for e in entries], dtype=np.int64)
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise DataError(f"{path}: not a readable labeled split ({type(e).__name__}: {e})") from e
    if files is not None:
        name = _relative_names(files)
        wrong = [e for e in entries if not 0 <= e["index"] < len(files) or name(e["index"]) != e["file"]]
        if wrong:
            raise DataError(f"{path}: {len(wrong)} entries name other files than given, e.g. {wrong[0]}")
    return indices


def _relative_names(files: Sequence[str | Path]) -> Callable[[int], str]:
    """i -> files[i] relative to the folder all absolute `files` share (relative ones as given)."""
    strings = [Path(f).as_posix() for f in files]
    absolute = bool(strings) and strings[0].startswith("/")
    prefix = os.path.commonprefix([min(strings), max(strings)]) if absolute else ""
    cut = prefix.rfind("/") + 1
    return lambda i: strings[i][cut:]


def dataset_stats(
    name_or_root: str | Path, *, cache_dir: str | Path | None = None, max_images: int = 5000
) -> tuple[tuple[float, float, float], tuple[float, float, float]]:
    """Per-channel (mean, std) on the 0..1 scale: published values for cifar10/cifar100/imagenet;
    for a tree (its train/ split if it has one), measured over up to `max_images` images drawn
    with a fixed seed (JPEGs decoded at reduced scale) and cached."""
    if isinstance(name_or_root, str) and name_or_root.lower() in KNOWN_STATS:
        return KNOWN_STATS[name_or_root.lower()]
    root = resolve_data(name_or_root, cache_dir=cache_dir)
    index = scan_image_folder(root, split="train" if (root / "train").is_dir() else None)
    cache = (Path(cache_dir).expanduser() if cache_dir else default_cache_dir()) / "stats"
    key = hashlib.sha256(f"{index.root}\n{max_images}\n".encode() + "\n".join(map(str, index.files)).encode())
    stats_path = cache / f"{index.root.name}-{key.hexdigest()[:16]}.json"
    if stats_path.is_file():
        saved = json.loads(stats_path.read_text())
        return tuple(saved["mean"]), tuple(saved["std"])
    _writable_cache(cache)
    pick = np.random.default_rng(0).permutation(len(index))[:max_images]
    total, total_sq, count = np.zeros(3), np.zeros(3), 0
    for i in pick:
        with Image.open(index.files[i]) as im:
            im.draft("RGB", (64, 64))  # JPEG: decode at 1/2..1/8 scale, never below 64 px
            x = np.asarray(im.convert("RGB"), dtype=np.float64).reshape(-1, 3) / 255.0
        total += x.sum(0)
        total_sq += (x * x).sum(0)
        count += len(x)
    mean = total / count
    std = np.sqrt(np.maximum(total_sq / count - mean * mean, 0.0))
    result = tuple(round(float(v), 4) for v in mean), tuple(round(float(v), 4) for v in std)
    write_atomic(stats_path, json.dumps({"root": str(index.root), "mean": result[0], "std": result[1]}))
    return result
