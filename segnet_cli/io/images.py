"""Reading images and writing masks, by documented rules, with nothing half-written.

Reading rules (what ``to_model_input`` does to reach the model's channel count):

* Pixels are scaled by their dtype: integers divided by the dtype's maximum (uint8 / 255,
  uint16 / 65535, ...), floats taken as already in [0, 1] and clipped. The rule depends only on
  the dtype, never on image statistics, so a tile and its whole image agree.
* Palette (P) images are expanded to RGB(A) first; JPEGs get their EXIF orientation applied.
* 1 channel -> C channels: repeated. RGB(A) -> 1: ITU-R 601 luma. RGBA -> 3 and LA -> 1:
  alpha dropped (colour channels kept as stored). RGB -> 4: an opaque alpha band added.
  Any other mismatch (say a 6-band scene for a 3-band model) is an error naming both counts.

Masks are written as 8-bit palette PNGs: the pixel values are class indices (numpy reads
them directly) and the palette holds the class colours, so any viewer shows readable colours.
Every file is written through ``io.files.atomic_path``: nothing half-written, ever.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np

from segnet_cli.errors import (
    ImageReadError,
    ImageTooLargeError,
    ImageTooSmallError,
)
from segnet_cli.io.files import atomic_path

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".gif", ".webp")
TIFF_SUFFIXES = (".tif", ".tiff")
def read_image(path: str | Path, max_pixels: int | None = None) -> np.ndarray:
    """Read an image file as an ``(H, W, C)`` array in its stored dtype.

    TIFFs are read with tifffile (any bit depth and band count); everything else with Pillow
    (EXIF orientation applied, palette expanded).

    Raises:
        ImageReadError: the file is missing, empty, truncated or not an image.
        ImageTooLargeError: the image is over the pixel limit.
    """
    path = Path(path)
    try:
        if path.is_dir():
            raise ImageReadError("is a folder, not an image", path)
        if not path.exists():
            raise ImageReadError("file not found (or a broken link)", path)
        size = path.stat().st_size
        if size == 0:
            raise ImageReadError("empty file (0 bytes)", path)
    except PermissionError:
        raise ImageReadError("permission denied", path) from None
    if path.suffix.lower() in TIFF_SUFFIXES:
        arr = _read_tiff(path, max_pixels)
    else:
        arr = _read_pillow(path, max_pixels)
    if arr.ndim == 2:
        arr = arr[:, :, None]
    if arr.ndim != 3:
        raise ImageReadError(f"unsupported image shape {arr.shape}", path)
    if arr.shape[0] < 1 or arr.shape[1] < 1:
        raise ImageTooSmallError(f"image has no pixels ({arr.shape[1]}x{arr.shape[0]})", path)
    return arr


_PIL_DEFAULT_LIMIT: int | None = None
EXIF_ORIENTATION = 0x0112


def pixel_limit(max_pixels: int | None) -> int | None:
    """The decompression-bomb limit for a read: the given one, else Pillow's own default.

    Pillow's default is captured once, so a limit set for one run never leaks into the
    next call that asks for the default.
    """
    global _PIL_DEFAULT_LIMIT
    from PIL import Image

    if _PIL_DEFAULT_LIMIT is None:
        _PIL_DEFAULT_LIMIT = Image.MAX_IMAGE_PIXELS
    return max_pixels if max_pixels is not None else _PIL_DEFAULT_LIMIT


def _read_pillow(path: Path, max_pixels: int | None) -> np.ndarray:
    from PIL import Image, ImageOps, UnidentifiedImageError

    limit = pixel_limit(max_pixels)
    # Pillow's guard is a process-wide setting. It is set, never restored: reader threads of
    # one run share one limit, and a save/restore pair would race between threads.
    Image.MAX_IMAGE_PIXELS = limit
    try:
        with warnings.catch_warnings():
            # Pillow warns between 1x and 2x the limit; make that an error too.
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as im:
                if limit is not None and im.width * im.height > limit:
                    raise ImageTooLargeError(
                        f"{im.width}x{im.height} is over the pixel limit of {limit} "
                        "(raise it with --max-pixels)",
                        path,
                    )
                im.load()
                # Only an EXIF orientation other than "normal" needs a transpose (which copies).
                if im.getexif().get(EXIF_ORIENTATION, 1) != 1:
                    im = ImageOps.exif_transpose(im)
                return _pil_to_array(im)
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise ImageTooLargeError(
            f"decompression bomb guard: {exc} (raise the limit with --max-pixels)", path
        ) from None
    except UnidentifiedImageError:
        raise ImageReadError("not an image Pillow can read (wrong content or format)", path) from None
    except PermissionError:
        raise ImageReadError("permission denied", path) from None
    except (OSError, SyntaxError, ValueError, EOFError) as exc:
        raise ImageReadError(f"cannot decode ({exc})", path) from None


def _pil_to_array(im) -> np.ndarray:
    mode = im.mode
    if mode == "P" or mode == "PA":
        im = im.convert("RGBA" if "transparency" in im.info or mode == "PA" else "RGB")
    elif mode == "1":
        im = im.convert("L")
    elif mode in ("CMYK", "YCbCr", "LAB", "HSV"):
        im = im.convert("RGB")
    elif mode == "I;16" or mode.startswith("I;16"):
        return np.asarray(im).astype(np.uint16)
    elif mode == "I":
        arr = np.asarray(im)
        return arr.astype(np.uint16) if arr.min() >= 0 and arr.max() < 65536 else arr.astype(
            np.int32
        )
    elif mode == "F":
        return np.asarray(im, dtype=np.float32)
    return np.asarray(im)


def _read_tiff(path: Path, max_pixels: int | None) -> np.ndarray:
    import tifffile

    try:
        with tifffile.TiffFile(path) as tif:
            page = tif.pages[0]
            h, w = int(page.imagelength), int(page.imagewidth)
            limit = pixel_limit(max_pixels)
            if limit is not None and h * w > limit:
                raise ImageTooLargeError(
                    f"{w}x{h} is over the pixel limit of {limit}; use `segnet tile` for huge "
                    "TIFFs or raise the limit with --max-pixels",
                    path,
                )
            arr = page.asarray()
            if page.photometric == tifffile.PHOTOMETRIC.PALETTE and page.colormap is not None:
                cmap = np.asarray(page.colormap)
                scale = 257 if cmap.max() > 255 else 1
                arr = (cmap[:, arr].transpose(1, 2, 0) // scale).astype(np.uint8)
            elif arr.ndim == 3 and page.planarconfig == tifffile.PLANARCONFIG.SEPARATE:
                arr = np.moveaxis(arr, 0, -1)
            return arr
    except ImageReadError:
        raise
    except PermissionError:
        raise ImageReadError("permission denied", path) from None
    except Exception as exc:  # tifffile raises many types for broken files
        raise ImageReadError(f"cannot decode TIFF ({type(exc).__name__}: {exc})", path) from None


def scale_to_unit(arr: np.ndarray) -> np.ndarray:
    """Scale pixels to float32 in [0, 1] by the dtype rule (see the module docstring)."""
    if arr.dtype == np.bool_:
        return arr.astype(np.float32)
    if np.issubdtype(arr.dtype, np.integer):
        info = np.iinfo(arr.dtype)
        out = arr.astype(np.float32)
        if info.min < 0:
            out = (out - info.min) / float(info.max - info.min)
        else:
            out /= float(info.max)
        return out
    return np.clip(np.nan_to_num(arr.astype(np.float32)), 0.0, 1.0)


def match_channels(arr: np.ndarray, channels: int, path: str | Path | None = None) -> np.ndarray:
    """Convert an ``(H, W, c)`` array to ``channels`` bands by the documented rules."""
    c = arr.shape[2]
    if c == channels:
        return arr
    if c == 1:
        return np.repeat(arr, channels, axis=2)
    if c == 2 and channels in (1, 3):  # LA: drop alpha
        return match_channels(arr[:, :, :1], channels, path)
    if c == 4 and channels == 3:  # RGBA: drop alpha
        return arr[:, :, :3]
    if c in (3, 4) and channels == 1:
        rgb = arr[:, :, :3].astype(np.float32)
        luma = rgb @ np.array([0.299, 0.587, 0.114], np.float32)
        if np.issubdtype(arr.dtype, np.integer):
            luma = np.round(luma).astype(arr.dtype)
        return luma[:, :, None]
    if c == 3 and channels == 4:  # RGB for an RGBA model: opaque alpha
        if np.issubdtype(arr.dtype, np.integer):
            alpha = np.full(arr.shape[:2] + (1,), np.iinfo(arr.dtype).max, arr.dtype)
        else:
            alpha = np.ones(arr.shape[:2] + (1,), arr.dtype)
        return np.concatenate([arr, alpha], axis=2)
    raise ImageReadError(
        f"image has {c} channels but the model takes {channels}", path
    )


def to_model_input(arr: np.ndarray, channels: int, path=None) -> np.ndarray:
    """Stored pixels -> float32 ``(H, W, channels)`` in [0, 1], ready for the model."""
    return scale_to_unit(match_channels(arr, channels, path))


def read_mask(path: str | Path) -> np.ndarray:
    """Read a label mask as a 2-D integer array of class indices.

    Raises:
        ImageReadError: unreadable, or not single-channel (RGB masks need a palette mapping).
    """
    path = Path(path)
    if path.suffix.lower() in TIFF_SUFFIXES:
        arr = read_image(path)
        if arr.shape[2] != 1:
            raise ImageReadError(f"mask has {arr.shape[2]} channels; expected class indices", path)
        return arr[:, :, 0]
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as im:
            im.load()
            if im.mode in ("P", "L", "I", "I;16"):
                return np.asarray(im)
            if im.mode in ("RGB", "RGBA"):
                raise ImageReadError(
                    f"mask is {im.mode} colour, not class indices (pass --rgb-masks to map colours through the class palette)",
                    path,
                )
            return np.asarray(im.convert("L"))
    except ImageReadError:
        raise
    except FileNotFoundError:
        raise ImageReadError("file not found", path) from None
    except UnidentifiedImageError:
        raise ImageReadError("not an image", path) from None
    except (OSError, SyntaxError, ValueError) as exc:
        raise ImageReadError(f"cannot decode mask ({exc})", path) from None


def read_rgb_mask(path: str | Path, palette: np.ndarray) -> np.ndarray:
    """Map an RGB colour mask to indices with ``palette`` (K, 3); unknown colours -> error."""
    arr = read_image(path)[:, :, :3].astype(np.int64)
    codes = (arr[:, :, 0] << 16) | (arr[:, :, 1] << 8) | arr[:, :, 2]
    pal = np.asarray(palette, np.int64)
    keys = (pal[:, 0] << 16) | (pal[:, 1] << 8) | pal[:, 2]
    order = np.argsort(keys)
    pos = np.searchsorted(keys[order], codes)
    pos = np.clip(pos, 0, len(keys) - 1)
    found = keys[order][pos] == codes
    if not found.all():
        bad = np.unique(codes[~found])[:3]
        names = ", ".join(f"({c >> 16},{(c >> 8) & 255},{c & 255})" for c in bad)
        raise ImageReadError(f"colours not in the palette: {names}", path)
    return order[pos].astype(np.uint8)


# --------------------------------------------------------------------------- writing


def palette_bytes(palette) -> list[int]:
    """A 256-entry flat RGB palette (unused entries black) from a list of colours."""
    flat: list[int] = []
    for rgb in list(palette)[:256]:
        flat.extend(int(v) for v in rgb)
    flat.extend([0] * (768 - len(flat)))
    return flat


def write_mask_png(
    mask: np.ndarray, path: str | Path, palette, text: dict[str, str] | None = None
) -> Path:
    """Write class indices as an 8-bit palette PNG, atomically. ``text`` goes in tEXt chunks."""
    from PIL import Image, PngImagePlugin

    if mask.ndim != 2:
        raise ValueError("mask must be 2-D")
    if mask.size and int(mask.max()) > 255:
        raise ValueError("a palette PNG holds at most 256 classes")
    im = Image.fromarray(mask.astype(np.uint8), mode="P")
    im.putpalette(palette_bytes(palette))
    info = PngImagePlugin.PngInfo()
    for k, v in (text or {}).items():
        info.add_text(k, v)
    with atomic_path(path) as tmp:
        im.save(tmp, format="PNG", pnginfo=info, optimize=False)
    return Path(path)


def colorize(mask: np.ndarray, palette) -> np.ndarray:
    pal = np.zeros((256, 3), np.uint8)
    p = np.asarray(palette, np.uint8).reshape(-1, 3)[:256]
    pal[: len(p)] = p
    return pal[mask]


def write_overlay(
    image: np.ndarray,
    mask: np.ndarray,
    path: str | Path,
    palette,
    alpha: float = 0.5,
    comment: str | None = None,
) -> Path:
    """Write the mask's colours blended over the image (8-bit RGB, JPEG or PNG by suffix).

    ``comment`` (the provenance) goes in the JPEG comment or a PNG text chunk, so a later
    run can tell whether the overlay is up to date.
    """
    from PIL import Image, PngImagePlugin

    rgb = image
    if rgb.shape[2] == 1:
        rgb = np.repeat(rgb, 3, axis=2)
    rgb = (scale_to_unit(rgb[:, :, :3]) * 255.0).astype(np.float32)
    colours = colorize(mask, palette).astype(np.float32)
    out = np.clip((1 - alpha) * rgb + alpha * colours, 0, 255).astype(np.uint8)
    path = Path(path)
    im = Image.fromarray(out)
    with atomic_path(path) as tmp:
        if path.suffix.lower() in (".jpg", ".jpeg"):
            im.save(tmp, format="JPEG", **({"comment": comment} if comment else {}))
        else:
            info = PngImagePlugin.PngInfo()
            if comment:
                info.add_text("segnet", comment)
            im.save(tmp, format="PNG", pnginfo=info)
    return path


def is_image_path(path: Path) -> bool:
    return path.suffix.lower() in IMAGE_SUFFIXES

