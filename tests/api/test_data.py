"""Offline datasets: glyphs from matplotlib's fonts, sklearn digits, ImageFolder, synthetic."""
import numpy as np
import pytest
import torch

from bct_fast import data


def test_glyph_dataset_shapes_and_distinct_classes():
    pytest.importorskip("matplotlib")
    x, y, fonts, names = data.glyph_dataset(size=24, augment=1, seed=0)
    n_fonts = len(data.matplotlib_fonts())
    assert n_fonts >= 12 and len(names) == len(data.GLYPH_CHARS) == 135
    assert x.shape == (n_fonts * 135 * 2, 1, 24, 24) and x.min() >= 0 and x.max() <= 1
    assert torch.bincount(y).tolist() == [2 * n_fonts] * 135
    clean = x[::2, 0].flatten(1)
    assert (clean.sum(1) > 5).all()  # every glyph draws ink (no empty / missing glyphs)
    # "o" and "O" stay distinct on the fixed em box (case is not normalized away)
    o, O = names.index("o"), names.index("O")
    ink = lambda c: clean[(y[::2] == c)].sum(1).mean()  # noqa: E731
    assert ink(O) > 1.3 * ink(o)


def test_digits_and_synthetic():
    pytest.importorskip("sklearn")
    x, y, names = data.digits_dataset()
    assert x.shape == (1797, 1, 8, 8) and len(names) == 10 and 0 <= float(x.min()) and float(x.max()) <= 1
    v, l, _ = data.synthetic_dataset(num_classes=7, per_class=3, dim=5)
    assert v.shape == (21, 5) and l.max() == 6


def test_image_folder(tmp_path):
    from PIL import Image
    for cls in ("cat", "dog"):
        (tmp_path / cls).mkdir()
        for i in range(3):
            Image.fromarray(np.full((10, 12), 40 * i, np.uint8)).save(tmp_path / cls / f"{i}.png")
    x, y, classes = data.image_folder(tmp_path, size=8)
    assert classes == ["cat", "dog"] and x.shape == (6, 1, 8, 8) and y.tolist() == [0, 0, 0, 1, 1, 1]
    with pytest.raises(FileNotFoundError, match="root"):
        data.image_folder(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="root"):
        data.image_folder(tmp_path / "empty")


def test_cjk_without_setup_says_what_to_run(tmp_path):
    with pytest.raises(FileNotFoundError, match="cjk-setup"):
        data.cjk_glyph_dataset(cache=tmp_path)


def test_cjk_character_set_is_the_common_level1_intersection():
    chars = data._cjk_chars()
    assert 1400 < len(chars) < 1700 and len(set(chars)) == len(chars)
    assert "日" in chars and "中" in chars


def test_distinct_designs_drops_copies_of_a_font(tmp_path):
    """Copies of one design (Takao = IPA renamed, in the CJK packages) are kept once; different
    designs stay. Checked on matplotlib's fonts: two DejaVu styles and a renamed copy of one."""
    pytest.importorskip("matplotlib")
    fonts = {p.stem: p for p in data.matplotlib_fonts()}
    sans, serif = fonts["DejaVuSans"], fonts["DejaVuSerif"]
    copy = tmp_path / "RenamedSans.ttf"
    copy.write_bytes(sans.read_bytes())
    kept = data.distinct_designs([sans, serif, copy], data.GLYPH_CHARS, 32)
    assert kept == [sans, serif]


def test_fonts_freetype_cannot_render_are_skipped(tmp_path):
    pytest.importorskip("matplotlib")
    bad = tmp_path / "broken.ttf"
    bad.write_bytes(b"not a font")
    assert not data._renders(bad, "A", 32)
    assert data._renders(data.matplotlib_fonts()[0], "A", 32)
