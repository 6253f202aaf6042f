"""The inputs of an evaluation: an .npz (`arr_0` uint8 (N, H, W, 3), ADM's format) or a folder of images, read
without unpickling anything, and checked from their headers first (shapes, dtypes, sizes, decompression bombs)
so a bad input fails before the minutes of a reference pass. Every failure is a UserError naming the file."""

from __future__ import annotations

import math
import pickle
import typing
import zipfile
from collections.abc import Iterable
from pathlib import Path

import numpy as np

from sit_atconv.data.images import is_image_file, rgb_image
from sit_atconv.errors import UserError


def read_npz(path: Path, keys: Iterable[str]) -> dict[str, np.ndarray]:
    """The arrays named `keys` that the .npz at `path` holds, never unpickling anything. A truncated or
    corrupt file, one that is no .npz, and object arrays are ValueErrors naming the file: numpy's and
    zipfile's own messages do not name it."""
    try:
        data = np.load(path)
        if not isinstance(data, np.lib.npyio.NpzFile):
            raise UserError("it holds a single .npy array")
        with data:
            return {key: data[key] for key in keys if key in data.files}
    except (zipfile.BadZipFile, EOFError, pickle.UnpicklingError) as error:
        raise _unreadable_npz(path, error) from error
    except ValueError as error:
        if "Object arrays" in str(error):
            raise UserError(
                f"{path} holds object arrays (pickled Python objects), which are never loaded; expected plain arrays"
            ) from error
        if "pickled data" in str(error):
            raise UserError(f"{path} is not an .npz archive (numpy would have to unpickle it)") from error
        raise UserError(f"{path} is not a readable .npz: {error}") from error


def _unreadable_npz(path: Path, error: BaseException) -> UserError:
    reason = str(error) or "it ends before the data its zip directory lists"  # zipfile's EOFError says nothing
    return UserError(f"{path} is not a readable .npz (truncated or corrupt?): {reason}")


def npz_array_header(path: Path, key: str) -> tuple[tuple[int, ...], np.dtype] | None:
    """(shape, dtype) of array `key` of an .npz, read from its header alone (no pixel data), or None when
    the file has no such array. Errors as `read_npz`."""
    readers = {(1, 0): np.lib.format.read_array_header_1_0, (2, 0): np.lib.format.read_array_header_2_0}
    try:
        with zipfile.ZipFile(path) as archive:
            if f"{key}.npy" not in archive.namelist():
                return None
            with archive.open(f"{key}.npy") as f:
                version = np.lib.format.read_magic(f)
                if version not in readers:
                    raise UserError(f"its '{key}' has .npy format version {version}, expected 1.0 or 2.0")
                shape, _, dtype = readers[version](f)
                header_size = f.tell()
            stored = archive.getinfo(f"{key}.npy").file_size  # the zip directory's size of the entry, unpacked
    except (zipfile.BadZipFile, EOFError) as error:
        raise _unreadable_npz(path, error) from error
    except ValueError as error:
        raise UserError(f"{path} is not a readable .npz: {error}") from error
    shape = tuple(int(n) for n in shape)
    declared = header_size + math.prod(shape) * dtype.itemsize
    if not dtype.hasobject and stored < declared:
        raise UserError(
            f"{path}: its '{key}' declares {shape} {dtype} ({declared:,} bytes with the header) but holds only "
            f"{stored:,} bytes (truncated or corrupt?)"
        )
    return shape, dtype


def image_layout(path: str | Path) -> tuple[int, int, int]:
    """(N, H, W) of the images `load_images` would read from `path`, checked without decoding them (an
    .npz's header, image files' headers), so a bad input fails before any slow work."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path} does not exist")
    if path.is_dir():
        return _folder_layout(path)
    header = npz_array_header(path, "arr_0")
    if header is None:
        _no_images(path)
    shape, dtype = header
    if dtype.hasobject:
        raise UserError(
            f"{path}: 'arr_0' is an object array (pickled Python objects), which is never loaded; expected "
            "uint8 images (N, H, W, 3)"
        )
    _check_layout(shape, dtype, path)
    return shape[0], shape[1], shape[2]


def load_images(path: str | Path) -> np.ndarray:
    """uint8 (N, H, W, 3) from an .npz (`arr_0`) or a folder of images; clear errors for bad input."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path} does not exist")
    if path.is_dir():
        return _load_folder(path)
    images = read_npz(path, ["arr_0"]).get("arr_0")
    if images is None:
        _no_images(path)
    return _check_images(images, path)


def _no_images(path: Path) -> typing.NoReturn:
    with zipfile.ZipFile(path) as archive:
        keys = sorted(name.removesuffix(".npy") for name in archive.namelist())
    raise UserError(f"{path} has no 'arr_0' array of images (keys: {keys})")


def _check_layout(shape: tuple[int, ...], dtype: np.dtype, source) -> None:
    if len(shape) != 4 or shape[-1] != 3:
        raise UserError(f"{source}: expected images (N, H, W, 3), got shape {tuple(int(n) for n in shape)}")
    if shape[0] == 0:
        raise UserError(f"{source} holds no images")
    if dtype != np.uint8:
        raise UserError(
            f"{source}: expected uint8 images, got {dtype}; convert with clamp(127.5 * x + 128, 0, 255) "
            "for [-1, 1] data (ADM format)"
        )


def _check_images(images: np.ndarray, source) -> np.ndarray:
    _check_layout(images.shape, images.dtype, source)
    return images


def image_files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if is_image_file(p))


def _folder_layout(folder: Path) -> tuple[int, int, int]:
    from PIL import Image

    files = image_files(folder)
    if not files:
        raise UserError(f"{folder} contains no images")
    sizes = {}
    for file in files:
        try:
            with Image.open(file) as image:  # reads the header only
                sizes[file] = image.size
        except (OSError, Image.DecompressionBombError) as error:  # (Pillow's size limit against memory bombs)
            raise UserError(f"cannot read image {file}: {error}") from error
        if sizes[file] != sizes[files[0]]:
            raise UserError(f"{file} is {sizes[file]} (W, H) but {files[0]} is {sizes[files[0]]}")
    width, height = sizes[files[0]]
    return len(files), height, width


def _load_folder(folder: Path) -> np.ndarray:
    from PIL import Image

    files = image_files(folder)
    if not files:
        raise UserError(f"{folder} contains no images")
    images = []
    for file in files:
        try:
            with Image.open(file) as image:
                images.append(np.asarray(rgb_image(image, file)))
        except (OSError, Image.DecompressionBombError) as error:
            raise UserError(f"cannot read image {file}: {error}") from error
        if images[-1].shape != images[0].shape:
            raise UserError(f"{file} is {images[-1].shape[:2]} but {files[0]} is {images[0].shape[:2]}")
    return _check_images(np.stack(images), folder)
