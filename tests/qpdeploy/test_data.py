"""Instance images of every kind a user may bring, prompts, and the class-image cache."""

import warnings

import numpy as np
import pytest
import torch
from PIL import Image

from qpdeploy.data import (MASK_FOLDER, check_prompt, class_cache_dir, class_images, latent_masks,
                           load_instance_images, prepare_image, read_rgb)
from qpdeploy.errors import QPDeployError

from .conftest import write_images

RED, BLUE = (255, 0, 0), (0, 0, 255)


def halves(size, top=RED, bottom=BLUE):
    """An RGB image (W, H) whose top half is ``top`` and bottom half ``bottom``."""
    w, h = size
    pixels = np.zeros((h, w, 3), np.uint8)
    pixels[: h // 2] = top
    pixels[h // 2:] = bottom
    return Image.fromarray(pixels)


@pytest.mark.parametrize("suffix", [".png", ".jpg", ".webp"])
def test_common_formats_read_as_the_same_pixels(tmp_path, suffix):
    path = tmp_path / f"a{suffix}"
    halves((32, 32)).save(path, quality=95) if suffix != ".png" else halves((32, 32)).save(path)
    rgb = np.asarray(read_rgb(path), dtype=np.int16)
    assert rgb.shape == (32, 32, 3)
    assert np.abs(rgb - np.asarray(halves((32, 32)), dtype=np.int16))[2:14].max() <= 8  # lossy codecs: small error
    assert np.abs(rgb - np.asarray(halves((32, 32)), dtype=np.int16))[18:30].max() <= 8


@pytest.mark.parametrize("suffix", [".png", ".jpg"])
def test_exif_orientation_is_applied(tmp_path, suffix):
    upright = halves((20, 30))  # portrait, red on top
    stored = upright.transpose(Image.Transpose.ROTATE_90)  # what the camera wrote: landscape
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 degrees clockwise to display"
    stored.save(tmp_path / f"rot{suffix}", exif=exif, quality=95)
    rgb = read_rgb(tmp_path / f"rot{suffix}")
    assert rgb.size == (20, 30)
    pixels = np.asarray(rgb, dtype=np.int16)
    assert np.abs(pixels[2:12] - RED).max() <= 8 and np.abs(pixels[18:28] - BLUE).max() <= 8


def test_rgba_is_composited_on_white(tmp_path):
    pixels = np.zeros((8, 8, 4), np.uint8)
    pixels[:4] = (255, 0, 0, 255)  # opaque red on top, fully transparent below
    Image.fromarray(pixels, "RGBA").save(tmp_path / "a.png")
    rgb = np.asarray(read_rgb(tmp_path / "a.png"))
    assert (rgb[:4] == RED).all() and (rgb[4:] == 255).all()


def test_palette_with_transparency_is_composited_on_white(tmp_path):
    image = Image.new("P", (4, 4), 0)
    image.putpalette([0, 0, 0, 0, 255, 0] + [0] * 762)
    image.putpixel((0, 0), 1)
    image.save(tmp_path / "p.png", transparency=0)
    rgb = np.asarray(read_rgb(tmp_path / "p.png"))
    assert tuple(rgb[0, 0]) == (0, 255, 0) and (rgb[1:] == 255).all()


def test_grayscale_becomes_three_equal_channels(tmp_path):
    Image.fromarray(np.full((6, 6), 77, np.uint8), "L").save(tmp_path / "g.png")
    rgb = np.asarray(read_rgb(tmp_path / "g.png"))
    assert rgb.shape == (6, 6, 3) and (rgb == 77).all()


def test_16_bit_grayscale_is_rescaled_not_clipped(tmp_path):
    values = np.array([[0, 16384], [32768, 65535]], np.uint16).repeat(4, 0).repeat(4, 1)
    Image.fromarray(values).save(tmp_path / "g16.png")
    assert Image.open(tmp_path / "g16.png").mode == "I;16"
    rgb = np.asarray(read_rgb(tmp_path / "g16.png"))[::4, ::4, 0]
    assert rgb.tolist() == [[0, 64], [128, 255]]  # a plain convert("RGB") would give 255 everywhere but 0


@pytest.mark.parametrize("size", [(37, 23), (23, 37), (5, 7), (300, 16)])
def test_any_size_is_resized_and_cropped_to_the_resolution(size):
    pixels, (top, left) = prepare_image(halves(size).convert("RGB"), 16)
    assert pixels.shape == (3, 16, 16)
    assert pixels.min() >= -1 and pixels.max() <= 1
    w, h = size
    scaled = (max(16, round(w * 16 / min(w, h))), max(16, round(h * 16 / min(w, h))))
    assert (top, left) == ((scaled[1] - 16) // 2, (scaled[0] - 16) // 2)  # centered


@pytest.mark.filterwarnings("ignore:1 instance image")
def test_random_crops_are_seeded(tmp_path):
    write_images(tmp_path / "i", count=1, size=(40, 16))
    a = load_instance_images(tmp_path / "i", 16, "random", crops_per_image=4, seed=3)
    b = load_instance_images(tmp_path / "i", 16, "random", crops_per_image=4, seed=3)
    c = load_instance_images(tmp_path / "i", 16, "random", crops_per_image=4, seed=4)
    assert len(a) == 4
    assert [x.crop_top_left for x in a] == [x.crop_top_left for x in b]
    assert [x.crop_top_left for x in a] != [x.crop_top_left for x in c]
    assert all(torch.equal(x.pixels, y.pixels) for x, y in zip(a, b))


def test_mixed_folder_loads_every_kind(tmp_path):
    folder = tmp_path / "mixed"
    folder.mkdir()
    halves((30, 20)).save(folder / "a.jpg")
    halves((20, 30)).convert("RGBA").save(folder / "b.png")
    halves((25, 25)).convert("L").save(folder / "c.webp")
    Image.fromarray(np.full((9, 13), 40000, np.uint16)).save(folder / "d.png")
    images = load_instance_images(folder, 16)
    assert [im.source for im in images] == ["a.jpg", "b.png", "c.webp", "d.png"]
    assert [im.original_size for im in images] == [(20, 30), (30, 20), (25, 25), (9, 13)]
    assert all(im.pixels.shape == (3, 16, 16) for im in images)


def test_an_unreadable_file_among_good_ones_is_skipped_with_a_warning(tmp_path):
    folder = write_images(tmp_path / "i", count=3)
    (folder / "broken.png").write_bytes(b"not an image at all")
    with pytest.warns(UserWarning, match="broken.png"):
        images = load_instance_images(folder, 16)
    assert sorted(im.source for im in images) == ["00.png", "01.png", "02.png"]


def test_non_image_files_are_ignored_with_a_warning(tmp_path):
    folder = write_images(tmp_path / "i", count=3)
    (folder / "notes.txt").write_text("hello")
    (folder / ".DS_Store").write_bytes(b"\0")
    with pytest.warns(UserWarning, match="notes.txt"):
        assert len(load_instance_images(folder, 16)) == 3


def test_too_few_images_warn_but_load(tmp_path):
    with pytest.warns(UserWarning, match="3-10"):
        assert len(load_instance_images(write_images(tmp_path / "i", count=2), 16)) == 2


@pytest.mark.parametrize("case, message", [
    ("empty", "no images in"),
    ("missing", "image folder not found"),
    ("file", "must be a folder"),
    ("only-broken", "no readable image"),
])
def test_bad_folders_fail_with_one_line(tmp_path, case, message):
    folder = tmp_path / "x"
    if case == "empty":
        folder.mkdir()
    elif case == "file":
        folder.write_bytes(b"")
    elif case == "only-broken":
        folder.mkdir()
        (folder / "a.jpg").write_bytes(b"\xff\xd8 truncated")
    with pytest.raises(QPDeployError, match=message) as info:
        load_instance_images(folder, 16)
    assert "\n" not in str(info.value)


def test_prompt_without_identifier_warns():
    with pytest.warns(UserWarning, match="identifier 'sks'"):
        check_prompt("a photo of a dog", "sks")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        check_prompt("a photo of sks dog", "sks")


def test_prompt_with_unknown_words_warns(tiny_pipe):
    tokenizer = tiny_pipe("sd1").tokenizer
    with pytest.warns(UserWarning, match="does not know"):
        check_prompt("a photo of sks xylophone", "sks", tokenizer)


class CountingPipe:
    """Stands in for a pipeline: counts calls and returns a flat image."""

    def __init__(self):
        self.calls = 0

    def set_progress_bar_config(self, **_):
        pass

    def __call__(self, prompt, height, width, generator, **_):
        self.calls += 1
        value = int(torch.randint(0, 255, (1,), generator=generator))
        return type("Out", (), {"images": [Image.new("RGB", (width, height), (value, value, value))]})


def test_class_images_are_cached_by_base_and_prompt_and_reused(tmp_path):
    pipe = CountingPipe()
    first = class_images(pipe, "hash-a", "a photo of a dog", 3, 16, root=tmp_path)
    assert pipe.calls == 3 and len(first) == 3
    again = class_images(pipe, "hash-a", "a photo of a dog", 3, 16, root=tmp_path)
    assert pipe.calls == 3  # all reused
    assert all(torch.equal(a.pixels, b.pixels) for a, b in zip(first, again))
    more = class_images(pipe, "hash-a", "a photo of a dog", 5, 16, root=tmp_path)
    assert pipe.calls == 5 and len(more) == 5  # only the two missing ones were generated
    class_images(pipe, "hash-b", "a photo of a dog", 1, 16, root=tmp_path)
    class_images(pipe, "hash-a", "a photo of a cat", 1, 16, root=tmp_path)
    assert pipe.calls == 7  # another base or prompt is another cache folder
    folder = class_cache_dir(tmp_path, "hash-a", "a photo of a dog", 16, 25, 7.5, 0)
    assert sorted(p.name for p in folder.glob("*.png")) == [f"{i:05d}.png" for i in range(5)]


# ------------------------------------------------------------------------------------
# Subject masks (--background-weight)
# ------------------------------------------------------------------------------------

def write_masked(folder, count=3, size=(40, 16)):
    """Instance images whose left half is the subject: the image red there, the mask white."""
    folder.mkdir(parents=True)
    (folder / MASK_FOLDER).mkdir()
    w, h = size
    for i in range(count):
        pixels = np.zeros((h, w, 3), np.uint8)
        pixels[:, : w // 2] = RED
        Image.fromarray(pixels).save(folder / f"{i:02d}.png")
        mask = np.zeros((h, w), np.uint8)
        mask[:, : w // 2] = 255
        Image.fromarray(mask).save(folder / MASK_FOLDER / f"{i:02d}.png")
    return folder


def test_masks_follow_their_images_through_resize_and_random_crop(tmp_path):
    folder = write_masked(tmp_path / "i")
    images = load_instance_images(folder, 16, "random", crops_per_image=4, seed=3, masks=True)
    assert len(images) == 12 and len({im.crop_top_left for im in images}) > 1
    for im in images:
        assert im.mask.shape == (1, 16, 16) and im.mask.min() >= 0 and im.mask.max() <= 1
        red = (im.pixels[0] > 0.5) & (im.pixels[1] < -0.5)  # (16, 16): where the crop shows the subject
        subject = im.mask[0] > 0.5
        assert torch.equal(red, subject)  # same crop, same resize: the mask lies exactly on the subject
    plain = load_instance_images(folder, 16, "random", crops_per_image=4, seed=3)
    assert all(p.mask is None and torch.equal(p.pixels, m.pixels) for p, m in zip(plain, images))


def test_an_alpha_channel_is_the_mask(tmp_path):
    folder = write_images(tmp_path / "i", count=3, size=(16, 16))
    (folder / MASK_FOLDER).mkdir()
    for i in range(3):
        rgba = np.zeros((16, 16, 4), np.uint8)
        rgba[:8, :, 3] = 255  # opaque top half; colour channels say nothing
        Image.fromarray(rgba, "RGBA").save(folder / MASK_FOLDER / f"{i:02d}.webp", lossless=True)
    images = load_instance_images(folder, 16, masks=True)
    assert all(im.mask[0, :8].min() == 1 and im.mask[0, 8:].max() == 0 for im in images)


def test_latent_masks_are_area_averages_and_ones_for_class_images(tmp_path):
    images = load_instance_images(write_masked(tmp_path / "i", size=(16, 16)), 16, masks=True)
    masks = latent_masks(images, 2, (4, 4))
    assert masks.shape == (5, 1, 4, 4)
    assert torch.equal(masks[:3, 0, :, :2], torch.ones(3, 4, 2)) and torch.equal(masks[:3, 0, :, 2:], torch.zeros(3, 4, 2))
    assert torch.equal(masks[3:], torch.ones(2, 1, 4, 4))
    assert latent_masks(load_instance_images(tmp_path / "i", 16), 2, (4, 4)) is None


@pytest.mark.parametrize("case, message", [
    ("missing", r"no subject mask for 01\.png: expected .*masks/01\.png"),
    ("size", r"mask .*01\.png is 8x8, its image 40x16"),
    ("broken", r"cannot read mask .*01\.png"),
])
def test_bad_masks_fail_with_one_line(tmp_path, case, message):
    folder = write_masked(tmp_path / "i")
    mask = folder / MASK_FOLDER / "01.png"
    if case == "missing":
        mask.unlink()
    elif case == "size":
        Image.new("L", (8, 8)).save(mask)
    else:
        mask.write_bytes(b"not a png")
    with pytest.raises(QPDeployError, match=message) as info:
        load_instance_images(folder, 16, masks=True)
    assert "\n" not in str(info.value)
    assert len(load_instance_images(folder, 16)) == 3  # without masks asked, the folder still loads
