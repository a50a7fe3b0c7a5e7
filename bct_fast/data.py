"""Offline datasets for demos and tests: nothing is downloaded at run time.

- :func:`glyph_dataset`: characters rendered from the fonts matplotlib ships (DejaVu Sans /
  Sans Mono / Serif and STIX General, 4 styles each = 16 fonts) -- 135 Latin, Greek and
  Cyrillic character classes whose shapes differ. Class = character, sample = font (+ small
  random affine jitter): a real many-class, few-shot set, like face identities.
- :func:`cjk_glyph_dataset`: the same from Debian's CJK font packages, prepared once by
  ``bct-fast data cjk-setup`` (needs network at setup time only).
- :func:`digits_dataset`: scikit-learn's bundled 8x8 digits (fastest CI runs).
- :func:`image_folder`: any ``root/<class>/<image>`` directory (torchvision's ImageFolder layout).
- :func:`synthetic_dataset`: class-structured vectors of any size, for scale tests.

All return ``(images [n, 1, H, W] float32 in [0, 1] (or vectors [n, d]), labels [n] int64,
class names)``.
"""
from __future__ import annotations

import math
import os
import subprocess
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from torch import Tensor

__all__ = ["GLYPH_CHARS", "glyph_dataset", "cjk_glyph_dataset", "setup_cjk_fonts", "digits_dataset",
           "image_folder", "synthetic_dataset", "matplotlib_fonts"]

# Shapes that differ from each other: Greek and Cyrillic letters drawn like a Latin letter (or
# like each other: Greek Pi / Cyrillic Pe, ...) are left out, so no two classes share a glyph.
GLYPH_CHARS = ("0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"
               "ΓΔΘΛΞΠΣΦΨΩ" "αβγδεζηθκλμξπρσςτυφχψω"
               "БДЖЗИЙЛЦЧШЩЪЫЬЭЮЯ" "бвгджзийклмнптцчшщъыьэюя")

# mpl-data fonts that draw placeholder boxes or symbols at letter code points, or lack the
# Greek / Cyrillic coverage.
_EXCLUDED_FONTS = ("LastResort", "STIXNonUni", "STIXSiz", "cmex", "cmsy", "Display")


def matplotlib_fonts(chars: str = GLYPH_CHARS) -> list[Path]:
    """matplotlib's bundled .ttf fonts that cover every character of ``chars``."""
    import matplotlib
    from fontTools.ttLib import TTFont

    folder = Path(matplotlib.get_data_path()) / "fonts" / "ttf"
    fonts = []
    for path in sorted(folder.glob("*.ttf")):
        if any(x in path.name for x in _EXCLUDED_FONTS):
            continue
        cmap = TTFont(path, lazy=True).getBestCmap() or {}
        if all(ord(c) in cmap for c in chars):
            fonts.append(path)
    return fonts


def _glyph_font(path: Path, size: int):
    """The font at the point size every rendering uses on a ``size`` em box."""
    from PIL import ImageFont

    return ImageFont.truetype(str(path), size=int(0.72 * size))


def _render(font, char: str, size: int) -> np.ndarray:
    """One glyph on a fixed em box: baseline and font size fixed, so case and size survive."""
    from PIL import Image, ImageDraw

    img = Image.new("L", (size, size), 0)
    ImageDraw.Draw(img).text((size / 2, 0.78 * size), char, fill=255, font=font, anchor="ms")
    return np.asarray(img, dtype=np.float32) / 255.0


def _jitter(img: np.ndarray, rng: np.random.Generator, strength: float) -> np.ndarray:
    """Small random rotation / scale / shear / shift (PIL affine, bilinear)."""
    from PIL import Image

    size = img.shape[0]
    angle = math.radians(rng.uniform(-8, 8) * strength)
    scale = 1 + rng.uniform(-0.1, 0.1) * strength
    shear = rng.uniform(-0.15, 0.15) * strength
    tx, ty = rng.uniform(-0.08, 0.08, 2) * size * strength
    c, s = math.cos(angle) / scale, math.sin(angle) / scale
    a, b, d, e = c, s + shear * c, -s, c - shear * s  # inverse map, output -> input
    cx = cy = size / 2
    coeffs = (a, b, cx - a * cx - b * cy - tx, d, e, cy - d * cx - e * cy - ty)
    out = Image.fromarray((img * 255).astype(np.uint8)).transform(
        (size, size), Image.AFFINE, coeffs, resample=Image.BILINEAR)
    return np.asarray(out, dtype=np.float32) / 255.0


def _glyphs_from_fonts(fonts: Sequence[Path], chars: str, size: int, augment: int, seed: int,
                       progress: bool) -> tuple[Tensor, Tensor, Tensor, list[str]]:
    from tqdm.auto import tqdm

    rng = np.random.default_rng(seed)
    images, labels, font_ids = [], [], []
    for f_id, path in enumerate(tqdm(fonts, desc="render glyphs", disable=not progress, leave=False)):
        font = _glyph_font(path, size)
        for label, ch in enumerate(chars):
            base = _render(font, ch, size)
            images.append(base)
            labels.append(label)
            font_ids.append(f_id)
            for _ in range(augment):
                images.append(_jitter(base, rng, 1.0))
                labels.append(label)
                font_ids.append(f_id)
    x = torch.from_numpy(np.stack(images))[:, None]
    return x, torch.tensor(labels), torch.tensor(font_ids), list(chars)


def glyph_dataset(size: int = 32, augment: int = 0, seed: int = 0, progress: bool = False):
    """Rendered glyphs from matplotlib's fonts.

    Args:
        size: image side in pixels (the em box).
        augment: jittered copies per (character, font) besides the clean rendering.
    Returns:
        ``(images [n, 1, size, size], labels [n], font_ids [n], class_names)``; labels index
        :data:`GLYPH_CHARS`. Clean renderings come first within each (font, character).
    """
    fonts = matplotlib_fonts()
    if len(fonts) < 2:
        raise RuntimeError("glyph_dataset: matplotlib's bundled fonts were not found")
    return _glyphs_from_fonts(fonts, GLYPH_CHARS, size, augment, seed, progress)


# ---- CJK --------------------------------------------------------------------------------------
CJK_PACKAGES = ("fonts-ipafont-gothic", "fonts-ipafont-mincho", "fonts-ipaexfont-gothic",
                "fonts-ipaexfont-mincho", "fonts-arphic-ukai", "fonts-arphic-uming",
                "fonts-arphic-bkai00mp", "fonts-arphic-bsmi00lp", "fonts-arphic-gbsn00lp",
                "fonts-arphic-gkai00mp", "fonts-wqy-microhei", "fonts-wqy-zenhei",
                "fonts-vlgothic", "fonts-takao-gothic", "fonts-takao-mincho",
                "fonts-noto-cjk", "fonts-hanazono", "fonts-komatuna", "fonts-horai-umefont")


def default_cache() -> Path:
    return Path(os.environ.get("BCT_FAST_CACHE", Path.home() / ".cache" / "bct_fast"))


def setup_cjk_fonts(cache: str | os.PathLike | None = None, packages: Sequence[str] = CJK_PACKAGES) -> Path:
    """Fetch Debian's CJK font packages with ``apt-get download`` and unpack them (``dpkg-deb
    -x``) into ``cache/cjk_fonts``. No root and no system install; run once, with network."""
    dest = Path(cache or default_cache()) / "cjk_fonts"
    debs = dest / "debs"
    debs.mkdir(parents=True, exist_ok=True)
    for pkg in packages:
        r = subprocess.run(["apt-get", "download", pkg], cwd=debs, capture_output=True, text=True)
        if r.returncode != 0:
            print(f"skip {pkg}: {r.stderr.strip().splitlines()[-1] if r.stderr.strip() else 'apt-get failed'}")
    for deb in sorted(debs.glob("*.deb")):
        subprocess.run(["dpkg-deb", "-x", str(deb), str(dest / "root")], check=True)
    n = len(_cjk_font_files(dest))
    if n == 0:
        raise RuntimeError(f"setup_cjk_fonts: no font could be fetched into {dest} (network? apt sources?)")
    print(f"{n} CJK font files in {dest}")
    return dest


def _cjk_font_files(dest: Path) -> list[Path]:
    return sorted(p for ext in ("*.ttf", "*.otf", "*.ttc") for p in (dest / "root").rglob(ext))


def _cjk_chars() -> str:
    """Characters in all three of JIS X 0208 level 1, GB2312 level 1 and Big5 level 1."""
    def decodable(codec: str, rows, cols) -> set[str]:
        out = set()
        for r in rows:
            for c in cols:
                try:
                    out.add(bytes([r, c]).decode(codec))
                except UnicodeDecodeError:
                    pass
        return out
    jis = decodable("euc_jp", range(0xB0, 0xD0), range(0xA1, 0xFF))      # JIS level 1: rows 16-47
    gb = decodable("gb2312", range(0xB0, 0xD8), range(0xA1, 0xFF))       # GB2312 level 1
    big5 = decodable("big5", range(0xA4, 0xC7), list(range(0x40, 0x7F)) + list(range(0xA1, 0xFF)))
    return "".join(sorted(c for c in jis & gb & big5 if "\u4e00" <= c <= "\u9fff"))


def _renders(path: Path, char: str, size: int) -> bool:
    """FreeType rejects some fonts' hinting programs ("invalid opcode"): those are skipped."""
    try:
        _render(_glyph_font(path, size), char, size)
        return True
    except OSError:
        return False


def distinct_designs(fonts: Sequence[Path], chars: str, size: int, min_distance: float = 0.04,
                     sample: int = 64) -> list[Path]:
    """Drop fonts that draw (nearly) the same glyphs as an earlier one.

    Font packages repeat designs: Takao is IPA renamed, the proportional and fixed-pitch variants
    of a family share their CJK glyphs, Ume ships one design under many names. Two copies of a
    design on both sides of a query/gallery split make retrieval trivial. Distance: the mean
    absolute pixel difference over ``sample`` characters (0 = identical; distinct designs here are
    0.05-0.12 apart, copies 0.00-0.035).
    """
    picked = chars[:: max(1, len(chars) // sample)][:sample]
    kept: list[Path] = []
    kept_img: list[np.ndarray] = []
    for path in fonts:
        font = _glyph_font(path, size)
        img = np.stack([_render(font, c, size) for c in picked])
        if all(np.abs(img - k).mean() >= min_distance for k in kept_img):
            kept.append(path)
            kept_img.append(img)
    return kept


def cjk_glyph_dataset(size: int = 32, augment: int = 0, seed: int = 0, cache: str | os.PathLike | None = None,
                      max_classes: int | None = None, progress: bool = True):
    """CJK glyphs from the fonts :func:`setup_cjk_fonts` unpacked (same return as
    :func:`glyph_dataset`). Only fonts covering every selected character are used."""
    from fontTools.ttLib import TTFont

    dest = Path(cache or default_cache()) / "cjk_fonts"
    files = _cjk_font_files(dest)
    if not files:
        raise FileNotFoundError(f"cjk_glyph_dataset: no fonts under {dest}; run `bct-fast data cjk-setup` "
                                "once (it downloads Debian's CJK font packages)")
    chars = _cjk_chars()[:max_classes] if max_classes else _cjk_chars()
    fonts = []
    for path in files:
        try:
            cmap = TTFont(path, lazy=True, fontNumber=0).getBestCmap() or {}
        except Exception:  # noqa: BLE001 - unreadable font files are skipped
            continue
        if all(ord(c) in cmap for c in chars) and _renders(path, chars[0], size):
            fonts.append(path)
    fonts = distinct_designs(fonts, chars, size)
    if len(fonts) < 2:
        raise RuntimeError(f"cjk_glyph_dataset: fewer than 2 distinct fonts in {dest} cover the character set")
    return _glyphs_from_fonts(fonts, chars, size, augment, seed, progress)


# ---- small and synthetic ------------------------------------------------------------------------
def digits_dataset():
    """scikit-learn's bundled 8x8 digits: ``(images [1797, 1, 8, 8] in [0, 1], labels, names)``."""
    from sklearn.datasets import load_digits

    d = load_digits()
    x = torch.from_numpy(d.images.astype(np.float32) / 16.0)[:, None]
    return x, torch.from_numpy(d.target.astype(np.int64)), [str(i) for i in range(10)]


_IMAGE_EXT = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp"}


def image_folder(root: str | os.PathLike, size: int = 32, grayscale: bool = True):
    """Load ``root/<class name>/<image>`` into memory, resized to ``size`` x ``size``.
    Classes are the sorted sub-folder names (as torchvision's ImageFolder)."""
    from PIL import Image

    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"root: {root} is not a directory")
    classes = sorted(p.name for p in root.iterdir() if p.is_dir())
    if not classes:
        raise ValueError(f"root: {root} has no class sub-folders")
    images, labels = [], []
    for label, name in enumerate(classes):
        for path in sorted((root / name).rglob("*")):
            if path.suffix.lower() in _IMAGE_EXT:
                img = Image.open(path).convert("L" if grayscale else "RGB").resize((size, size), Image.BILINEAR)
                a = np.asarray(img, dtype=np.float32) / 255.0
                images.append(a[None] if grayscale else a.transpose(2, 0, 1))
                labels.append(label)
    if not images:
        raise ValueError(f"root: no images found under {root}")
    return torch.from_numpy(np.stack(images)), torch.tensor(labels), classes


def synthetic_dataset(num_classes: int = 300, per_class: int = 24, dim: int = 64, latent: int = 24,
                      noise: float = 0.6, seed: int = 0):
    """Class prototypes in a latent space, a fixed random nonlinear map to ``dim``, per-sample
    noise: ``(vectors [n, dim], labels [n], names)``. Any size, for scale tests."""
    g = torch.Generator().manual_seed(seed)
    protos = torch.randn(num_classes, latent, generator=g)
    labels = torch.arange(num_classes).repeat_interleave(per_class)
    z = protos[labels] + noise * torch.randn(len(labels), latent, generator=g)
    a = torch.randn(dim, latent, generator=g) / latent ** 0.5
    b = torch.randn(dim, dim, generator=g) / dim ** 0.5
    x = torch.tanh(z @ a.T) @ b.T + 0.05 * torch.randn(len(labels), dim, generator=g)
    return x, labels, [str(i) for i in range(num_classes)]
