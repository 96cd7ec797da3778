"""The one guarded image decoder (io.read_image) and every path through it: pixel caps checked from the header,
odd modes (16-bit, palette, transparency, CMYK, EXIF orientation), truncated files; never a traceback."""

import io
import json
import logging
import struct
import zlib

import numpy as np
import pytest
from PIL import Image

from vlfm.cli import main
from vlfm.data.shards import decode_sample
from vlfm.data.sources import load_image_text, read_caption_file
from vlfm.data.transforms import Preprocess
from vlfm.io import BACKGROUND, MAX_PIXELS, ImageError, UsageError, decode_image, open_image, read_image


def claimed_png(width: int, height: int) -> bytes:
    """A real 1 x 1 PNG whose header (IHDR) claims width x height: a decompression bomb's header, in 70 bytes."""
    out = io.BytesIO()
    Image.new("L", (1, 1), 128).save(out, format="PNG")
    data = bytearray(out.getvalue())
    data[16:24] = struct.pack(">II", width, height)
    data[29:33] = struct.pack(">I", zlib.crc32(bytes(data[12:29])))
    return bytes(data)


def jpeg(image: Image.Image, **options) -> bytes:
    out = io.BytesIO()
    image.save(out, format="JPEG", quality=95, **options)
    return out.getvalue()


def noise(size: int, seed: int = 0) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8))


def test_a_bomb_is_refused_from_its_header(tmp_path):
    (tmp_path / "bomb.png").write_bytes(claimed_png(30000, 30000))
    with pytest.raises(ImageError, match="bomb.png is 900,000,000 pixels, over the cap") as error:
        read_image(tmp_path / "bomb.png")
    assert error.value.kind == "oversized" and "\n" not in str(error.value)
    assert decode_image(tmp_path / "bomb.png") is None
    assert decode_sample({"__key__": "0", "png": claimed_png(30000, 30000), "txt": b"x"})[0] == "oversized"


def test_the_cap_is_configurable_and_checked_before_decoding(tmp_path):
    (tmp_path / "big.png").write_bytes(claimed_png(9400, 9400))  # under PIL's own limit: only our cap stops it
    with pytest.raises(ImageError, match=r"big.png is 9400 x 9400 = 88,360,000 pixels, over the cap of 80,000,000") as error:
        read_image(tmp_path / "big.png", max_pixels=80_000_000)
    assert error.value.kind == "oversized"  # the body is missing: decoding it would say 'undecodable'
    assert MAX_PIXELS == 50_000_000 and decode_image(tmp_path / "big.png") is None
    Image.new("RGB", (100, 100), "red").save(tmp_path / "small.png")
    assert decode_image(tmp_path / "small.png", max_pixels=5000) is None
    assert decode_image(tmp_path / "small.png").size == (100, 100)


def test_16_and_32_bit_greyscale_keep_their_grey(tmp_path):
    Image.fromarray(np.full((4, 6), 32768, dtype=np.uint16)).save(tmp_path / "grey16.png")
    assert np.asarray(read_image(tmp_path / "grey16.png")).tolist()[0][0] == [128, 128, 128]
    as_int = Image.fromarray(np.array([[0, 32768, 65535]], dtype=np.int32), "I")
    assert np.asarray(open_image(as_int))[0, :, 0].tolist() == [0, 128, 255]
    as_float = Image.fromarray(np.array([[0.0, 0.5, 1.0]], dtype=np.float32), "F")
    assert np.asarray(open_image(as_float))[0, :, 0].tolist() == [0, 128, 255]


def test_transparency_composites_onto_the_background(tmp_path):
    rgba = Image.new("RGBA", (8, 8), (255, 0, 0, 255))
    rgba.paste((0, 0, 255, 0), (0, 0, 4, 8))  # left half transparent (blue underneath)
    rgba.save(tmp_path / "rgba.png")
    pixels = np.asarray(read_image(tmp_path / "rgba.png"))
    assert BACKGROUND == (255, 255, 255)
    assert tuple(pixels[0, 0]) == BACKGROUND and tuple(pixels[0, 7]) == (255, 0, 0)
    la = Image.new("LA", (2, 1), (0, 0))
    la.putpixel((1, 0), (0, 255))
    assert np.asarray(open_image(la))[0, :, 0].tolist() == [255, 0]


def test_palette_transparency(tmp_path):
    palette = Image.new("P", (4, 4), 1)
    palette.putpalette([0, 0, 0, 0, 255, 0] + [0] * 762)
    palette.paste(0, (0, 0, 2, 4))  # index 0 (black) is the transparent one
    palette.save(tmp_path / "p.png", transparency=0)
    palette.save(tmp_path / "p.gif", transparency=0)
    for name in ("p.png", "p.gif"):
        pixels = np.asarray(read_image(tmp_path / name))
        assert tuple(pixels[0, 0]) == BACKGROUND and tuple(pixels[0, 3]) == (0, 255, 0), name


def test_exif_orientation_is_applied(tmp_path):
    image = Image.new("RGB", (40, 20), (255, 0, 0))
    image.paste((0, 0, 255), (20, 0, 40, 20))  # left red, right blue
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 degrees clockwise to display"
    (tmp_path / "rotated.jpg").write_bytes(jpeg(image, exif=exif))
    upright = read_image(tmp_path / "rotated.jpg")
    assert upright.size == (20, 40)
    top, bottom = np.asarray(upright)[2, 10], np.asarray(upright)[-3, 10]
    assert top[0] > 200 > top[2] and bottom[2] > 200 > bottom[0]


def test_cmyk_and_large_jpegs(tmp_path):
    cmyk = Image.new("CMYK", (8, 8), (0, 255, 255, 0))  # red in ink
    red = np.asarray(read_image(jpeg(cmyk)))[4, 4]
    assert red[0] > 200 and red[1] < 60 and red[2] < 60
    big = jpeg(noise(512))
    assert read_image(big).size == (512, 512)
    assert read_image(big, target=64).size == (64, 64)  # decoded at 1/8 scale: never below the target
    assert read_image(big, target=(100, 70)).size == (128, 128)


def test_truncated_and_undecodable_files(tmp_path, caplog):
    data = jpeg(noise(64))
    (tmp_path / "cut.jpg").write_bytes(data[: len(data) // 2])
    (tmp_path / "text.png").write_text("hello")
    for name in ("cut.jpg", "text.png"):
        with pytest.raises(UsageError, match=f"{name} is not a readable image") as error:
            open_image(tmp_path / name)
        assert error.value.kind == "undecodable" and "\n" not in str(error.value)
        assert decode_image(tmp_path / name) is None
    assert decode_sample({"__key__": "0", "jpg": data[:200], "txt": b"x"})[0] == "undecodable"


def test_caption_files_skip_and_count_bombs_and_truncated_files(tmp_path, caplog):
    Image.new("RGB", (40, 30), "red").save(tmp_path / "good.png")
    (tmp_path / "bomb.png").write_bytes(claimed_png(30000, 30000))
    data = jpeg(noise(64))
    (tmp_path / "cut.jpg").write_bytes(data[: len(data) // 2])
    Image.new("RGB", (200, 200), "blue").save(tmp_path / "large.png")
    (tmp_path / "c.csv").write_text("filepath,caption\ngood.png,good\nbomb.png,bomb\ncut.jpg,cut\nlarge.png,large\n")
    rows = read_caption_file(tmp_path / "c.csv")
    with caplog.at_level(logging.WARNING, logger="vlfm"):
        data = load_image_text(rows, Preprocess(image_size=16))
    assert data.captions == [["good"], ["large"]] and data.skipped == 2 and "skipped 2 of 4 images" in caplog.text
    assert load_image_text(rows, Preprocess(image_size=16), max_pixels=10_000).captions == [["good"]]


def test_data_max_pixels_reaches_training_data(tmp_path):
    from conftest import tiny_config
    from vlfm.train.contrastive import load_training_data

    for i, size in enumerate((32, 40, 300)):
        Image.new("RGB", (size, size), "red").save(tmp_path / f"{i}.png")
    (tmp_path / "c.csv").write_text("filepath,caption\n0.png,a\n1.png,b\n2.png,c\n")
    config = tiny_config(tmp_path, f"data.source={tmp_path / 'c.csv'}", "data.max_pixels=2000")
    assert load_training_data(config, Preprocess(image_size=32)).captions == [["a"], ["b"]]


def test_llava_json_skips_and_counts_bombs(tmp_path):
    from vlfm.data.stage_data import llava_pairs

    Image.new("RGB", (40, 40), "red").save(tmp_path / "ok.png")
    (tmp_path / "bomb.png").write_bytes(claimed_png(30000, 30000))
    turns = [{"from": "human", "value": "<image>\nwhat colour?"}, {"from": "gpt", "value": "red"}]
    records = [{"id": str(i), "image": name, "conversations": turns} for i, name in enumerate(("ok.png", "bomb.png"))]
    (tmp_path / "chat.json").write_text(json.dumps(records))
    pixels, pairs = llava_pairs(str(tmp_path / "chat.json"), None, Preprocess(image_size=16))
    assert pixels.shape == (1, 3, 16, 16) and len(pairs) == 1
    assert len(llava_pairs(str(tmp_path / "chat.json"), None, Preprocess(image_size=16), max_pixels=100)[1]) == 0


def test_preprocess_converts_open_images_the_same_way():
    preprocess = Preprocess(image_size=4)
    assert tuple(np.asarray(preprocess.resize_crop(Image.new("RGBA", (8, 8), (255, 0, 0, 0))))[0, 0]) == BACKGROUND
    grey = Image.fromarray(np.full((8, 8), 32768, dtype=np.uint16))
    assert np.asarray(preprocess.resize_crop(grey))[0, 0].tolist() == [128, 128, 128]


def one_line_error(capsys, argv, match):
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err and match in err, err


def test_classify_refuses_bombs_and_broken_files_in_one_line(capsys, tmp_path, trained_run):
    (tmp_path / "bomb.png").write_bytes(claimed_png(30000, 30000))
    data = jpeg(noise(64))
    (tmp_path / "cut.jpg").write_bytes(data[: len(data) // 2])
    Image.new("RGB", (64, 64), "red").save(tmp_path / "ok.png")
    labels = ["--labels", "a red circle,a blue square"]
    one_line_error(capsys, ["classify", str(trained_run), str(tmp_path / "bomb.png"), *labels], "over the cap")
    one_line_error(capsys, ["classify", str(trained_run), str(tmp_path / "cut.jpg"), *labels], "cut.jpg is not a readable image")
    one_line_error(capsys, ["classify", str(trained_run), str(tmp_path / "ok.png"), *labels, "--max-pixels", "1000"],
                   "ok.png is 64 x 64 = 4,096 pixels, over the cap of 1,000")  # fmt: skip
    assert main(["classify", str(trained_run), str(tmp_path / "ok.png"), *labels]) == 0


def test_index_build_skips_and_counts_bombs(capsys, tmp_path, trained_run):
    images = tmp_path / "images"
    images.mkdir()
    for i in range(3):
        Image.new("RGB", (48, 48), (80 * i, 0, 0)).save(images / f"{i}.png")
    (images / "bomb.png").write_bytes(claimed_png(30000, 30000))
    (images / "cut.jpg").write_bytes(jpeg(noise(64))[:300])
    assert main(["index", "build", str(trained_run), "--images", str(images), "--out", str(tmp_path / "idx")]) == 0
    stats = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert stats["added"] == 3 and stats["skipped"] == 2
    one_line_error(capsys, ["search", str(tmp_path / "idx"), "--image", str(images / "bomb.png")], "over the cap")
    assert main(["search", str(tmp_path / "idx"), "--image", str(images / "0.png"), "-k", "1"]) == 0
