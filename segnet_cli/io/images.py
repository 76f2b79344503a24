"""Reading images and writing masks, by documented rules, with nothing half-written.

Reading rules (what ``to_model_input`` does to reach the model's channel count):

* Pixels are scaled by their dtype: integers divided by the dtype's maximum (uint8 / 255,
  uint16 / 65535, ...), floats taken as already in [0, 1] and clipped. The rule depends only on
  the dtype, never on image statistics, so a tile and its whole image agree.
* Palette (P) images are expanded to RGB(A) first; JPEGs get their EXIF orientation applied.
* 1 channel -> C channels: repeated. RGB(A) -> 1: ITU-R 601 luma. RGBA -> 3 and LA -> 1 or 3:
  alpha dropped (colour channels kept as stored). RGB -> 4: an opaque alpha band added.
  A band is dropped only when the file says it is alpha (Pillow modes LA, RGBA, PA; TIFF
  ExtraSamples); a 2-band or 4-band image without one is multi-band data, and like any other
  mismatch (say a 6-band scene for a 3-band model) an error naming both counts.
* One image per file: a TIFF with more than one full-resolution page is refused (reduced-
  resolution overviews and transparency masks are not images of their own).

Decompression bombs: a read is refused, before any pixel is decoded, when the image has more
pixels than the limit (``pixel_limit``: Pillow's default, about 89.5 Mpx, or ``--max-pixels``)
or when its decoded pixels would take more bytes than ``byte_limit``: 4 bytes per pixel of
the limit, an 8-bit RGBA image at the limit (about 341 MiB by default). Raising
``--max-pixels`` raises both. The byte budget catches what a pixel count misses: a small
3000 x 3000 TIFF of 32 float64 bands decodes to 2.1 GiB.

Masks are written as 8-bit palette PNGs: the pixel values are class indices (numpy reads
them directly) and the palette holds the class colours, so any viewer shows readable colours.
Every file is written through ``io.files.atomic_path``: nothing half-written, ever.
"""

from __future__ import annotations

import re
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

#: Pillow modes whose last band is alpha (after ``_pil_to_array``'s conversions).
ALPHA_MODES = frozenset({"LA", "La", "RGBA", "RGBa", "PA"})
#: TIFF ExtraSamples values that mean alpha (associated, unassociated).
TIFF_ALPHA_SAMPLES = (1, 2)


class Pixels(np.ndarray):
    """An image as read: a plain ``(H, W, C)`` array that also knows whether its last band
    is alpha (``alpha``), so the channel rules drop a band only when the file says so.

    Views and copies keep the flag; everything else treats it as an ``ndarray``.
    """

    alpha: bool = False

    def __array_finalize__(self, obj) -> None:
        self.alpha = bool(getattr(obj, "alpha", False))


def as_pixels(arr: np.ndarray, alpha: bool) -> Pixels:
    """``arr`` (no copy) marked with whether its last band is alpha."""
    out = np.asarray(arr).view(Pixels)
    out.alpha = bool(alpha)
    return out


def read_image(path: str | Path, max_pixels: int | None = None) -> Pixels:
    """Read an image file as an ``(H, W, C)`` array in its stored dtype.

    TIFFs are read with tifffile (any bit depth and band count); everything else with Pillow
    (EXIF orientation applied, palette expanded). The result's ``alpha`` says whether the
    file marks its last band as alpha.

    Raises:
        ImageReadError: the file is missing, empty, truncated, not an image, or a TIFF with
            several images.
        ImageTooLargeError: the image is over the pixel limit, or would decode to more bytes
            than the byte limit (checked before decoding).
    """
    path = Path(path)
    try:
        if path.is_dir():
            raise ImageReadError("is a folder, not an image", path)
        if not path.exists():
            raise ImageReadError(
                "a symbolic link loop" if _is_link_loop(path) else "file not found (or a broken link)",
                path,
            )
        size = path.stat().st_size
        if size == 0:
            raise ImageReadError("empty file (0 bytes)", path)
    except PermissionError:
        raise ImageReadError("permission denied", path) from None
    if path.suffix.lower() in TIFF_SUFFIXES:
        arr, alpha = _read_tiff(path, max_pixels)
    else:
        arr, alpha = _read_pillow(path, max_pixels)
    if arr.ndim == 2:
        arr = arr[:, :, None]
    if arr.ndim != 3:
        raise ImageReadError(f"unsupported image shape {arr.shape}", path)
    if arr.shape[0] < 1 or arr.shape[1] < 1:
        raise ImageTooSmallError(f"image has no pixels ({arr.shape[1]}x{arr.shape[0]})", path)
    return as_pixels(arr, alpha and arr.shape[2] in (2, 4))


def _is_link_loop(path: Path) -> bool:
    """Whether resolving ``path`` fails with ELOOP (a symbolic link loop)."""
    import errno
    import os

    try:
        os.stat(path)
    except OSError as exc:
        return exc.errno == errno.ELOOP
    return False


EXIF_ORIENTATION = 0x0112
#: EXIF orientations that swap width and height (a 90 or 270 degree turn).
EXIF_TRANSPOSED = (5, 6, 7, 8)
#: Pillow's own default limit (``1024 ** 3 // 4 // 3``, about 89.5 Mpx): the fallback when
#: something disabled Pillow's guard (``MAX_IMAGE_PIXELS = None``) before segnet looked.
PILLOW_DEFAULT_PIXELS = 1024**3 // 4 // 3
#: Decoded bytes a read may hold per pixel of the pixel limit: an 8-bit RGBA image.
BYTES_PER_LIMIT_PIXEL = 4


def _capture_default_limit() -> int:
    from PIL import Image

    value = Image.MAX_IMAGE_PIXELS
    return int(value) if value else PILLOW_DEFAULT_PIXELS


#: The default pixel limit, captured once when this module is first imported (before any of
#: segnet's reads set Pillow's process-wide guard), so no call order can change it.
DEFAULT_PIXEL_LIMIT = _capture_default_limit()


def pixel_limit(max_pixels: int | None) -> int:
    """The decompression-bomb pixel limit of a read: ``max_pixels``, else the default.

    Never ``None``: the guard is never off, whatever ran before.
    """
    return int(max_pixels) if max_pixels is not None else DEFAULT_PIXEL_LIMIT


def byte_limit(max_pixels: int | None) -> int:
    """The most bytes a read may decode: ``BYTES_PER_LIMIT_PIXEL`` per pixel of the limit."""
    return pixel_limit(max_pixels) * BYTES_PER_LIMIT_PIXEL


def check_decoded_size(
    width: int, height: int, bytes_per_pixel: int, max_pixels: int | None, path, hint: str = ""
) -> None:
    """Refuse, before decoding, an image over the pixel limit or the byte limit.

    Args:
        width, height: the image's size.
        bytes_per_pixel: what one pixel takes once decoded (all bands).
        max_pixels: the run's ``--max-pixels`` (``None``: the default).
        path: named in the error.
        hint: what the user can do instead, appended to the message.

    Raises:
        ImageTooLargeError: over either limit.
    """
    limit = pixel_limit(max_pixels)
    hint = hint or "raise the limit with --max-pixels"
    if width * height > limit:
        raise ImageTooLargeError(
            f"{width}x{height} is over the pixel limit of {limit:,}; {hint}", path
        )
    need, budget = width * height * bytes_per_pixel, byte_limit(max_pixels)
    if need > budget:
        raise ImageTooLargeError(
            f"{width}x{height} at {bytes_per_pixel} bytes per pixel decodes to "
            f"{_mib(need)}, over the limit of {_mib(budget)} "
            f"({BYTES_PER_LIMIT_PIXEL} bytes per pixel of the {limit:,}-pixel limit); {hint}",
            path,
        )


def _mib(n: int) -> str:
    """A byte count for a message: MiB, or KiB below one (a small ``--max-pixels`` would
    otherwise read as "over the limit of 0 MiB")."""
    if n >= 10 * 2**20:
        return f"{n / 2**20:,.0f} MiB"
    return f"{n / 2**20:.1f} MiB" if n >= 2**20 else f"{n / 2**10:,.1f} KiB"


def pillow_bytes_per_pixel(mode: str) -> int:
    """Bytes per pixel of the array ``_pil_to_array`` makes of a Pillow ``mode``."""
    if mode.startswith("I;16"):
        return 2
    if mode in ("P", "PA", "RGBA", "RGBa", "CMYK", "I", "F", "RGBX"):
        return 4  # a palette may expand to RGBA; I and F are 32-bit
    if mode in ("1", "L"):
        return 1
    if mode in ("LA", "La"):
        return 2
    return 3


def oriented_size(im) -> tuple[int, int]:
    """``(width, height)`` of a Pillow image as ``read_image`` returns it (EXIF applied)."""
    try:
        turned = im.getexif().get(EXIF_ORIENTATION, 1) in EXIF_TRANSPOSED
    except Exception:  # a broken EXIF block: read_image ignores it the same way
        turned = False
    return (im.height, im.width) if turned else (im.width, im.height)


def _bomb_error(exc: Exception, limit: int, path) -> ImageTooLargeError:
    """Pillow's decompression-bomb refusal, in segnet's words and with the run's limit.

    Pillow's own message quotes twice the limit for the images it refuses outright (its
    error threshold is 2x ``MAX_IMAGE_PIXELS``), which would contradict ``--max-pixels``.
    """
    found = re.search(r"\((\d+) pixels\)", str(exc))
    size = f"{int(found.group(1)):,} pixels" if found else "the image"
    return ImageTooLargeError(
        f"{size} is over the pixel limit of {limit:,} (decompression bomb guard); "
        "raise the limit with --max-pixels",
        path,
    )


def open_pillow(path: Path, max_pixels: int | None):
    """Open an image with Pillow under the run's limits, its header read and checked.

    Pillow's own guard is armed with the run's limit (a bomb between 1x and 2x the limit,
    which Pillow only warns about, is refused too), and the decoded size is checked against
    the byte limit, all before a pixel is decoded. The caller closes the image.

    Raises:
        ImageTooLargeError: over a limit.
        ImageReadError: not an image Pillow can read.
    """
    from PIL import Image, UnidentifiedImageError

    limit = pixel_limit(max_pixels)
    # Pillow's guard is a process-wide setting. It is set, never restored (and never to
    # None): reader threads of one run share one limit, and a save/restore pair would race
    # between threads.
    Image.MAX_IMAGE_PIXELS = limit
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            im = Image.open(path)
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise _bomb_error(exc, limit, path) from None
    except UnidentifiedImageError:
        raise ImageReadError("not an image Pillow can read (wrong content or format)", path) from None
    except PermissionError:
        raise ImageReadError("permission denied", path) from None
    except (OSError, SyntaxError, ValueError, EOFError) as exc:
        raise ImageReadError(f"cannot decode ({exc})", path) from None
    try:
        check_decoded_size(im.width, im.height, pillow_bytes_per_pixel(im.mode), max_pixels, path)
    except BaseException:
        im.close()
        raise
    return im


def _read_pillow(path: Path, max_pixels: int | None) -> tuple[np.ndarray, bool]:
    from PIL import Image, ImageOps

    im = open_pillow(path, max_pixels)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with im:
                im.load()
                # Only an EXIF orientation other than "normal" needs a transpose (which copies).
                if im.getexif().get(EXIF_ORIENTATION, 1) != 1:
                    im = ImageOps.exif_transpose(im)
                return _pil_to_array(im)
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise _bomb_error(exc, pixel_limit(max_pixels), path) from None
    except PermissionError:
        raise ImageReadError("permission denied", path) from None
    except (OSError, SyntaxError, ValueError, EOFError) as exc:
        raise ImageReadError(f"cannot decode ({exc})", path) from None


def _pil_to_array(im) -> tuple[np.ndarray, bool]:
    """Pixels of a loaded Pillow image, and whether the last band is alpha."""
    arr = _pil_pixels(im)
    mode = im.mode
    alpha = mode in ALPHA_MODES or (mode == "P" and "transparency" in im.info)
    return arr, alpha


def _pil_pixels(im) -> np.ndarray:
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


def tiff_alpha(page) -> bool:
    """Whether a TIFF page's ExtraSamples mark its last band as alpha."""
    extra = tuple(getattr(page, "extrasamples", ()) or ())
    return bool(extra) and int(extra[-1]) in TIFF_ALPHA_SAMPLES


def check_single_image(tif, path) -> None:
    """Refuse a TIFF holding more than one full-resolution image (pages of a scan, a stack).

    Reduced-resolution pages (overviews of a pyramid or a COG) and transparency masks
    (NewSubfileType bits 1 and 4) belong to the first image and are fine.

    Raises:
        ImageReadError: naming how many images the file holds.
    """
    images = 0
    for page in tif.pages:
        if not int(getattr(page, "subfiletype", 0) or 0) & 0b101:
            images += 1
            if images > 1:
                break
    if images > 1:
        raise ImageReadError(
            f"the TIFF holds {len(tif.pages)} pages, more than one full-resolution image; "
            "segnet reads one image per file: split it first (e.g. `tiffsplit IN.tif page-`)",
            path,
        )


def tiff_bytes_per_pixel(page) -> int:
    """Bytes per pixel of the array ``_read_tiff`` makes of a page (palette expanded)."""
    itemsize = page.dtype.itemsize if page.dtype is not None else 1
    size = int(page.samplesperpixel) * itemsize
    if page.photometric == 3 and page.colormap is not None:  # PALETTE: indices + RGB
        size += 3
    return size


def _read_tiff(path: Path, max_pixels: int | None) -> tuple[np.ndarray, bool]:
    import tifffile

    try:
        with tifffile.TiffFile(path) as tif:
            if len(tif.pages) == 0:
                raise ImageReadError("the TIFF holds no image (truncated or empty)", path)
            check_single_image(tif, path)
            page = tif.pages[0]
            h, w = int(page.imagelength), int(page.imagewidth)
            check_decoded_size(
                w, h, tiff_bytes_per_pixel(page), max_pixels, path,
                "use `segnet tile` for huge TIFFs or raise the limit with --max-pixels",
            )
            arr = page.asarray()
            if page.photometric == tifffile.PHOTOMETRIC.PALETTE and page.colormap is not None:
                cmap = np.asarray(page.colormap)
                scale = 257 if cmap.max() > 255 else 1
                arr = (cmap[:, arr].transpose(1, 2, 0) // scale).astype(np.uint8)
                return arr, False
            if arr.ndim == 3 and page.planarconfig == tifffile.PLANARCONFIG.SEPARATE:
                arr = np.moveaxis(arr, 0, -1)
            return arr, tiff_alpha(page)
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


def match_channels(
    arr: np.ndarray, channels: int, path: str | Path | None = None, alpha: bool | None = None
) -> np.ndarray:
    """Convert an ``(H, W, c)`` array to ``channels`` bands by the documented rules.

    Args:
        arr: the pixels.
        channels: the model's input channels.
        path: named in errors.
        alpha: whether the last band is alpha; ``None``: as ``arr`` says (``Pixels.alpha``
            of an array ``read_image`` returned; a plain array has none). Only an alpha band
            is ever dropped.

    Raises:
        ImageReadError: the counts cannot be matched (naming both).
    """
    c = arr.shape[2]
    if alpha is None:
        alpha = bool(getattr(arr, "alpha", False))
    if c == channels:
        return arr
    if c == 1 and channels == 3:  # gray for a colour model; never into other bands (NIR)
        return np.repeat(arr, channels, axis=2)
    if c == 2 and channels in (1, 3) and alpha:  # LA: drop alpha
        return match_channels(arr[:, :, :1], channels, path, alpha=False)
    if c == 4 and channels == 3 and alpha:  # RGBA: drop alpha
        return arr[:, :, :3]
    if (c == 3 or (c == 4 and alpha)) and channels == 1:
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
    why = (
        f" (band {c} is not marked as alpha, so it is not dropped)"
        if c in (2, 4) and not alpha and channels < c
        else ""
    )
    raise ImageReadError(f"image has {c} channels but the model takes {channels}{why}", path)


def to_model_input(arr: np.ndarray, channels: int, path=None, alpha: bool | None = None) -> np.ndarray:
    """Stored pixels -> float32 ``(H, W, channels)`` in [0, 1], ready for the model.

    ``alpha``: see ``match_channels``. The result is a plain array.
    """
    return np.asarray(scale_to_unit(match_channels(arr, channels, path, alpha)))


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


def image_dpi(path: str | Path) -> tuple[float, float] | None:
    """The resolution an image's header records, in dots per inch, or None.

    A mask or overlay carries its input's resolution, so a slide's or a scan's mask measures
    as the image does. Only the header is read; an image Pillow cannot open has none. An
    EXIF rotation by a quarter turn swaps the axes, as the pixels are read rotated.
    """
    from PIL import Image

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # a large image's bomb warning: no pixels are read
            with Image.open(path) as im:
                dpi = im.info.get("dpi")
                orientation = im.getexif().get(0x0112, 1)
        x, y = (float(v) for v in dpi)
    except Exception:  # no resolution, or an image Pillow cannot open: none to keep
        return None
    if not (np.isfinite(x) and np.isfinite(y) and x > 0 and y > 0):
        return None
    return (y, x) if orientation in (5, 6, 7, 8) else (x, y)


def write_mask_png(
    mask: np.ndarray,
    path: str | Path,
    palette,
    text: dict[str, str] | None = None,
    dpi: tuple[float, float] | None = None,
) -> Path:
    """Write class indices as an 8-bit palette PNG, atomically.

    ``text`` goes in tEXt chunks, ``dpi`` (the input's resolution) in the pHYs chunk.
    """
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
        im.save(tmp, format="PNG", pnginfo=info, optimize=False, **({"dpi": dpi} if dpi else {}))
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
    dpi: tuple[float, float] | None = None,
) -> Path:
    """Write the mask's colours blended over the image (8-bit RGB, JPEG or PNG by suffix).

    ``comment`` (the provenance) goes in the JPEG comment or a PNG text chunk, so a later
    run can tell whether the overlay is up to date; ``dpi`` is the input's resolution.
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
        extra = {"dpi": dpi} if dpi else {}
        if path.suffix.lower() in (".jpg", ".jpeg"):
            im.save(tmp, format="JPEG", **({"comment": comment} if comment else {}), **extra)
        else:
            info = PngImagePlugin.PngInfo()
            if comment:
                info.add_text("segnet", comment)
            im.save(tmp, format="PNG", pnginfo=info, **extra)
    return path


def is_image_path(path: Path) -> bool:
    return path.suffix.lower() in IMAGE_SUFFIXES

