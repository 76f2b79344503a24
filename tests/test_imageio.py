"""Reading images by the documented rules; writing palette masks atomically."""

from __future__ import annotations

import os

import numpy as np
import pytest
import tifffile
from PIL import Image

from segnet_cli.errors import ImageReadError, ImageTooLargeError, OutputError
from segnet_cli.io.files import TMP_PREFIX
from segnet_cli.io.images import (
    match_channels,
    read_image,
    read_mask,
    scale_to_unit,
    to_model_input,
    write_mask_png,
)


def test_formats_modes_and_depths(tmp_path):
    rgb = (np.arange(6 * 5 * 3) % 256).astype(np.uint8).reshape(6, 5, 3)
    cases = {
        "a.png": Image.fromarray(rgb),
        "b.bmp": Image.fromarray(rgb),
        "c.png": Image.fromarray(rgb[:, :, 0]),  # L
        "d.png": Image.fromarray(np.dstack([rgb, np.full((6, 5), 255, np.uint8)])),  # RGBA
        "e.png": Image.fromarray(rgb).convert("P"),
        "f.png": Image.fromarray(rgb[:, :, 0].astype(np.uint16) * 257),  # 16-bit
    }
    for name, im in cases.items():
        im.save(tmp_path / name)
    for name in cases:
        arr = read_image(tmp_path / name)
        assert arr.shape[:2] == (6, 5), name
        x = to_model_input(arr, 3, name)
        assert x.shape == (6, 5, 3) and x.dtype == np.float32
        assert 0.0 <= x.min() and x.max() <= 1.0
    # 16-bit and 8-bit versions of the same picture scale to the same values.
    a = to_model_input(read_image(tmp_path / "c.png"), 1)
    b = to_model_input(read_image(tmp_path / "f.png"), 1)
    np.testing.assert_allclose(a, b, atol=1e-6)


def test_tiff_float_and_multiband(tmp_path):
    import tifffile

    f = np.linspace(-0.5, 1.5, 40, dtype=np.float32).reshape(5, 8)
    tifffile.imwrite(tmp_path / "f.tif", f)
    x = to_model_input(read_image(tmp_path / "f.tif"), 3)
    assert x.shape == (5, 8, 3) and x.min() == 0.0 and x.max() == 1.0  # floats clipped
    six = np.zeros((4, 4, 6), np.uint16)
    tifffile.imwrite(tmp_path / "six.tif", six, photometric="minisblack", planarconfig="contig")
    assert read_image(tmp_path / "six.tif").shape == (4, 4, 6)
    with pytest.raises(ImageReadError, match="6 channels but the model takes 3"):
        match_channels(read_image(tmp_path / "six.tif"), 3, "six.tif")


def test_exif_orientation_applied(tmp_path):
    arr = np.zeros((10, 20, 3), np.uint8)
    arr[:, :10] = 255
    im = Image.fromarray(arr)
    exif = im.getexif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise when displayed
    im.save(tmp_path / "r.jpg", exif=exif, quality=95)
    out = read_image(tmp_path / "r.jpg")
    assert out.shape[:2] == (20, 10)


def test_image_dpi_from_headers_with_exif_rotation(tmp_path):
    from segnet_cli.io.images import image_dpi

    im = Image.fromarray(np.zeros((10, 20, 3), np.uint8))
    exif = im.getexif()
    exif[0x0112] = 6  # a quarter turn: the pixels are read rotated, so are the axes
    im.save(tmp_path / "r.jpg", exif=exif, dpi=(300, 150))
    assert image_dpi(tmp_path / "r.jpg") == pytest.approx((150, 300))
    tifffile.imwrite(tmp_path / "cm.tif", np.zeros((4, 4), np.uint8), resolution=(100, 100),
                     resolutionunit=3)  # 100 pixels per centimetre
    assert image_dpi(tmp_path / "cm.tif") == pytest.approx((254, 254))
    im.save(tmp_path / "none.png")
    (tmp_path / "junk.png").write_bytes(b"not an image")
    assert image_dpi(tmp_path / "none.png") is None and image_dpi(tmp_path / "junk.png") is None


def test_channel_rules():
    rgb = np.array([[[255, 0, 0]]], np.uint8)
    assert match_channels(rgb, 1)[0, 0, 0] == 76  # ITU-R 601 luma
    assert match_channels(rgb[:, :, :1], 3).shape == (1, 1, 3)
    # Gray is repeated into colour only: a 4-band model's fourth band may be infrared.
    with pytest.raises(ImageReadError, match="image has 1 channels but the model takes 4"):
        match_channels(rgb[:, :, :1], 4)
    rgba = match_channels(rgb, 4)
    assert rgba.shape == (1, 1, 4) and rgba[0, 0, 3] == 255
    assert scale_to_unit(np.array([65535], np.uint16))[0] == 1.0


def test_bad_inputs_name_file_and_cause(tmp_path):
    (tmp_path / "empty.png").write_bytes(b"")
    (tmp_path / "text.jpg").write_text("hello")
    good = tmp_path / "good.png"
    Image.fromarray(np.zeros((64, 64, 3), np.uint8)).save(good)
    (tmp_path / "trunc.png").write_bytes(good.read_bytes()[:60])
    (tmp_path / "folder.png").mkdir()
    os.symlink(tmp_path / "missing.png", tmp_path / "link.png")
    for name, why in [
        ("empty.png", "empty"),
        ("text.jpg", "not an image"),
        ("trunc.png", "cannot decode"),
        ("folder.png", "folder"),
        ("link.png", "not found"),
    ]:
        with pytest.raises(ImageReadError, match=why) as e:
            read_image(tmp_path / name)
        assert name in str(e.value)


def test_decompression_bomb_guard_and_limit(tmp_path):
    p = tmp_path / "big.png"
    Image.fromarray(np.zeros((100, 100), np.uint8)).save(p)
    # 10,000 pixels: over twice the limit (Pillow refuses outright) and between 1x and 2x
    # (Pillow only warns): the message quotes the limit as given, in both cases.
    for limit in (4000, 5000, 9999):
        with pytest.raises(ImageTooLargeError, match=f"10,000 pixels is over the pixel limit of {limit:,} "):
            read_image(p, max_pixels=limit)
    assert read_image(p, max_pixels=20000).shape == (100, 100, 1)


def test_palette_mask_png_round_trip(tmp_path):
    mask = np.random.default_rng(0).integers(0, 3, (37, 53)).astype(np.uint8)
    out = tmp_path / "sub" / "m.png"
    write_mask_png(mask, out, [(0, 0, 0), (255, 0, 0), (0, 255, 0)], {"k": "v"})
    im = Image.open(out)
    assert im.mode == "P" and im.size == (53, 37) and im.info["k"] == "v"
    assert im.getpalette()[:9] == [0, 0, 0, 255, 0, 0, 0, 255, 0]
    np.testing.assert_array_equal(read_mask(out), mask)  # numpy reads the indices
    assert not [p for p in out.parent.iterdir() if p.name.startswith(TMP_PREFIX)]
    assert oct(out.stat().st_mode & 0o777) != oct(0o600)  # not mkstemp's private mode


def test_unwritable_folder_is_a_clear_error(tmp_path):
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o500)
    try:
        if os.access(ro, os.W_OK):  # root ignores permissions
            pytest.skip("running as root: permissions are not enforced")
        with pytest.raises(OutputError):
            write_mask_png(np.zeros((2, 2), np.uint8), ro / "m.png", [(0, 0, 0)])
        assert list(ro.iterdir()) == []
    finally:
        ro.chmod(0o700)


def test_pixel_limit_of_one_read_does_not_leak(tmp_path):
    from segnet_cli.io.images import pixel_limit

    p = tmp_path / "img.png"
    Image.fromarray(np.zeros((300, 300), np.uint8)).save(p)
    with pytest.raises(ImageTooLargeError):
        read_image(p, max_pixels=1000)
    default = pixel_limit(None)
    assert default is not None and default > 300 * 300
    assert read_image(p).shape == (300, 300, 1)  # the next default read is not limited to 1000
