"""Reading images of every kind."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from amortized_cartoonx.errors import InputError
from amortized_cartoonx.images import MAX_SIZE, list_images, load_image, resize_center_crop


def test_rgb_jpeg_and_resize(tmp_path):
    arr = (np.random.default_rng(0).random((40, 60, 3)) * 255).astype(np.uint8)
    Image.fromarray(arr).save(tmp_path / "a.png")
    x = load_image(tmp_path / "a.png", 32)
    assert x.shape == (3, 32, 32) and x.dtype == torch.float32
    assert 0 <= x.min() and x.max() <= 1
    assert load_image(tmp_path / "a.png", None).shape == (3, 40, 60)


@pytest.mark.parametrize("mode", ["L", "P", "RGBA", "LA", "CMYK", "1"])
def test_modes_are_converted(tmp_path, mode):
    img = Image.fromarray((np.random.default_rng(1).random((16, 16, 3)) * 255).astype(np.uint8)).convert(mode)
    img.save(tmp_path / f"x.{'jpg' if mode == 'CMYK' else 'png'}")
    x = load_image(next(tmp_path.iterdir()), 16)
    assert x.shape == (3, 16, 16) and 0 <= x.min() and x.max() <= 1


def test_transparent_pixels_become_white(tmp_path):
    rgba = np.zeros((8, 8, 4), dtype=np.uint8)  # black, fully transparent
    Image.fromarray(rgba, "RGBA").save(tmp_path / "t.png")
    torch.testing.assert_close(load_image(tmp_path / "t.png", None), torch.ones(3, 8, 8))


def test_16_bit_greyscale_is_scaled_not_clipped(tmp_path):
    arr = np.full((8, 8), 32768, dtype=np.uint16)
    Image.fromarray(arr).save(tmp_path / "g16.png")
    x = load_image(tmp_path / "g16.png", None)
    torch.testing.assert_close(x, torch.full((3, 8, 8), 32768 / 65535))


def test_missing_and_corrupt_files(tmp_path):
    with pytest.raises(InputError, match="not found"):
        load_image(tmp_path / "nope.png")
    (tmp_path / "bad.jpg").write_bytes(b"not an image at all")
    with pytest.raises(InputError, match="cannot read image"):
        load_image(tmp_path / "bad.jpg")
    good = tmp_path / "trunc.png"
    Image.fromarray(np.zeros((64, 64, 3), dtype=np.uint8)).save(good)
    good.write_bytes(good.read_bytes()[:60])
    with pytest.raises(InputError):
        load_image(good)


def test_keep_aspect_resizes_the_shorter_side_and_crops_nothing(tmp_path):
    arr = (np.random.default_rng(0).random((40, 60, 3)) * 255).astype(np.uint8)
    Image.fromarray(arr).save(tmp_path / "a.png")
    whole = load_image(tmp_path / "a.png", 32, crop=False)
    assert whole.shape == (3, 32, 48)
    assert torch.equal(whole[:, :, 8:40], load_image(tmp_path / "a.png", 32))  # the square is its centre
    Image.fromarray(arr.transpose(1, 0, 2)).save(tmp_path / "tall.png")
    assert load_image(tmp_path / "tall.png", 32, crop=False).shape == (3, 48, 32)


def test_a_strip_is_cropped_before_it_is_resized_or_refused_whole(tmp_path):
    # 8 x 400 px at 256: 12800 px long once resized (8 x 8 million px, allowed by MAX_PIXELS, needed 200 GB)
    pixels = np.zeros((8, 400), dtype=np.uint8)
    pixels[:, 196:204] = 255  # the centre square is white, the rest black
    Image.fromarray(pixels).save(tmp_path / "strip.png")
    square = load_image(tmp_path / "strip.png", 256)
    assert square.shape == (3, 256, 256) and float(square.min()) == 1.0  # its centre square only
    with pytest.raises(InputError, match=f"12800x256 .* more than {MAX_SIZE} px"):
        load_image(tmp_path / "strip.png", 256, crop=False)
    assert load_image(tmp_path / "strip.png", 16, crop=False).shape == (3, 16, 800)
    Image.fromarray(np.zeros((60, 2100), dtype=np.uint8)).save(tmp_path / "pano.png")  # 8960 px at 256: cropped
    assert load_image(tmp_path / "pano.png", 256).shape == (3, 256, 256)


def test_center_crop_keeps_the_centre():
    x = torch.zeros(1, 10, 30)
    x[:, :, 10:20] = 1.0
    y = resize_center_crop(x, 10)
    assert y.shape == (1, 10, 10) and torch.allclose(y, torch.ones(1, 10, 10))


def test_list_images(tmp_path):
    with pytest.raises(InputError, match="no images"):
        list_images(tmp_path)
    for name in ("b.png", "a.JPG", "notes.txt"):
        (tmp_path / name).write_bytes(b"x")
    assert [p.name for p in list_images(tmp_path)] == ["a.JPG", "b.png"]
    (tmp_path / "._b.png").write_bytes(b"\x00\x05\x16\x07")  # macOS metadata beside b.png: not an image
    (tmp_path / "sub").mkdir()
    assert [p.name for p in list_images(tmp_path)] == ["a.JPG", "b.png"]
    with pytest.raises(InputError, match="subfolders are not searched"):
        list_images(tmp_path / "sub")


@pytest.mark.parametrize("size", ["32", 32.0, 2.5, True])
def test_a_size_that_is_no_integer_is_refused(tmp_path, size):
    """A string or float size reached PIL or torch.interpolate and failed there with a TypeError."""
    path = tmp_path / "a.png"
    Image.fromarray(np.zeros((16, 16, 3), dtype=np.uint8)).save(path)
    with pytest.raises(InputError, match=r"image size must be an integer in 1\.\.8192, got"):
        load_image(path, size)
    assert load_image(path, np.int64(8)).shape == (3, 8, 8)


@pytest.mark.parametrize("mode", ["P", "1"])
def test_large_palette_and_one_bit_images_load(tmp_path, mode):
    """A palette or 1-bit image at least 4x the size was refused ('image has wrong mode' from PIL's reduce)."""
    picture = Image.new("RGB", (200, 150), (255, 255, 255)).convert(mode)
    picture.save(tmp_path / "big.png")
    x = load_image(tmp_path / "big.png", 32)
    assert x.shape == (3, 32, 32) and torch.allclose(x, torch.ones_like(x))


def test_a_dark_16_bit_pgm_stays_dark(tmp_path):
    """PIL opens 16-bit PGM as mode 'I': its scale was guessed from the content (200/65535 read as 0.78)."""
    data = np.full((20, 20), 200, dtype=">u2")
    (tmp_path / "dark.pgm").write_bytes(b"P5 20 20 65535\n" + data.tobytes())
    x = load_image(tmp_path / "dark.pgm", None)
    assert abs(float(x.mean()) - 200 / 65535) < 1e-4


def test_the_exif_orientation_is_applied(tmp_path):
    """A phone photo tagged 'rotate 90' (Orientation 6) was loaded and explained on its side."""
    picture = Image.new("RGB", (40, 20), (10, 20, 30))
    exif = Image.Exif()
    exif[0x0112] = 6
    picture.save(tmp_path / "phone.jpg", exif=exif)
    assert load_image(tmp_path / "phone.jpg", None).shape == (3, 40, 20)


def test_a_labels_file_with_a_byte_order_mark(tmp_path):
    from amortized_cartoonx.images import read_class_names

    (tmp_path / "labels.txt").write_bytes("\ufeffzero\none\n".encode())
    assert read_class_names(tmp_path / "labels.txt") == ["zero", "one"]
