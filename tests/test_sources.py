import logging

import pytest
from PIL import Image

from vlfm.data.sources import load_image_text, read_caption_file
from vlfm.data.transforms import Preprocess


def write_images(folder, n):
    for i in range(n):
        Image.new("RGB", (40, 30), (i * 40, 0, 0)).save(folder / f"{i}.png")


def test_caption_csv_skips_and_counts_corrupt_images(tmp_path, caplog):
    write_images(tmp_path, 3)
    (tmp_path / "bad.png").write_bytes(b"not an image at all")
    (tmp_path / "captions.csv").write_text("filepath,caption\n0.png,zero\nbad.png,broken\n1.png,one\nmissing.png,gone\n2.png,two\n")
    rows = read_caption_file(tmp_path / "captions.csv")
    with caplog.at_level(logging.WARNING, logger="vlfm"):
        data = load_image_text(rows, Preprocess(image_size=16))
    assert data.images.shape == (3, 3, 16, 16) and data.captions == [["zero"], ["one"], ["two"]]
    assert data.skipped == 2 and "skipped 2 of 5 images" in caplog.text


def test_jsonl_and_tsv(tmp_path):
    write_images(tmp_path, 2)
    (tmp_path / "c.jsonl").write_text('{"image": "0.png", "text": "zero"}\n{"image": "1.png", "text": "one"}\n')
    assert [c for _, c in read_caption_file(tmp_path / "c.jsonl", "image", "text")] == ["zero", "one"]
    (tmp_path / "c.tsv").write_text("filepath\tcaption\n0.png\ta, b\n")
    assert read_caption_file(tmp_path / "c.tsv")[0][1] == "a, b"


def test_missing_columns_and_nothing_decodable(tmp_path):
    (tmp_path / "c.csv").write_text("path,text\nx.png,hello\n")
    with pytest.raises(ValueError, match="lacks column.*filepath, caption"):
        read_caption_file(tmp_path / "c.csv")
    (tmp_path / "d.csv").write_text("filepath,caption\nnope.png,hello\n")
    with pytest.raises(ValueError, match="none of the 1 images could be decoded"):
        load_image_text(read_caption_file(tmp_path / "d.csv"), Preprocess(image_size=16))
