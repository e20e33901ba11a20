"""Image sources and the MTTT preprocessing (Sun et al. 2024, "Learning to (learn at test time)",
Sec. 5 and App. C, which follow big_vision's ViT recipe), implemented with numpy and PIL.

Train: Inception crop (random area in [5%, 100%], aspect ratio in [3/4, 4/3]) resized to
`image_size`, random horizontal flip, and -- for patch models only -- optional RandAugment
(`randaug=(num_ops, magnitude)`). Raw-pixel models get no RandAugment. Mixup is not done here but
in the train step (`config.train.mixup_alpha`), where the loss sees the mixed labels. Eval: resize
the shorter side to image_size / crop_frac, centre crop.
Pixels are scaled to [-1, 1].

Embedded default "digits": scikit-learn's bundled copy of the UCI optical digits (1797 images,
8x8 grey levels 0..16, 10 classes; sklearn/datasets/data/digits.csv.gz, 57 KB, read
directly; 0.46 MB as float32). A fixed
permutation (seed 0) puts 1497 in train and the last 300 in validation.
"""

from __future__ import annotations

import functools
import gzip
import importlib.util
import math
import pathlib

import numpy as np
from PIL import Image, ImageEnhance, ImageOps

from ttt.data.errors import DataConfigError

DIGITS_NUM_VALIDATION = 300


@functools.lru_cache(maxsize=1)
def _digits_arrays():
    # Read sklearn's bundled CSV directly (57 KB gzip): same data as load_digits() without
    # paying for importing scikit-learn.
    spec = importlib.util.find_spec("sklearn")
    if spec is None or not spec.submodule_search_locations:
        raise DataConfigError("data.name='digits' needs scikit-learn: pip install scikit-learn")
    path = pathlib.Path(spec.submodule_search_locations[0]) / "datasets" / "data" / "digits.csv.gz"
    with gzip.open(path, "rt") as f:
        table = np.loadtxt(f, delimiter=",", dtype=np.float32)  # (1797, 65): 64 pixels, label
    order = np.random.default_rng(0).permutation(len(table))
    images = table[order, :64].reshape(-1, 8, 8, 1) / 16.0 * 2.0 - 1.0  # (1797, 8, 8, 1)
    return images.astype(np.float32), table[order, 64].astype(np.int32)


def digits(split: str):
    """(images (n, 8, 8, 1) float32 in [-1, 1], labels (n,) int32) for train/validation."""
    images, labels = _digits_arrays()
    cut = len(labels) - DIGITS_NUM_VALIDATION
    sl = slice(0, cut) if split == "train" else slice(cut, None)
    return images[sl], labels[sl]


class ArraySource:
    """Random-access records {"image", "label"} over in-memory arrays."""

    def __init__(self, images: np.ndarray, labels: np.ndarray):
        self.images, self.labels = images, labels

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> dict:
        return {"image": self.images[i], "label": self.labels[i]}


# --------------------------------------------------------------------------- geometry


def _to_pil(image: np.ndarray) -> Image.Image:
    image = np.asarray(image)
    if image.ndim == 3 and image.shape[-1] == 1:
        return Image.fromarray(image[..., 0].astype(np.uint8), mode="L")
    return Image.fromarray(image.astype(np.uint8))


def _from_pil(img: Image.Image, channels: int) -> np.ndarray:
    a = np.asarray(img, dtype=np.float32)
    return a.reshape(a.shape[0], a.shape[1], channels)


def inception_crop_box(rng: np.random.Generator, h: int, w: int, area_min: float = 0.05,
                       ratio=(3 / 4, 4 / 3)) -> tuple[int, int, int, int]:
    """Random (top, left, height, width) covering area_min..100% of the image (Szegedy 2015)."""
    for _ in range(10):
        area = h * w * rng.uniform(area_min, 1.0)
        aspect = math.exp(rng.uniform(math.log(ratio[0]), math.log(ratio[1])))
        ch = int(round(math.sqrt(area / aspect)))
        cw = int(round(math.sqrt(area * aspect)))
        if 0 < ch <= h and 0 < cw <= w:
            return int(rng.integers(0, h - ch + 1)), int(rng.integers(0, w - cw + 1)), ch, cw
    return 0, 0, h, w  # fall back to the whole image


def train_geometry(image: np.ndarray, size: int, rng: np.random.Generator,
                   flip: bool = True) -> Image.Image:
    """uint8 (H, W, C) -> PIL image (size, size): Inception crop, resize, random flip."""
    img = _to_pil(image)
    top, left, ch, cw = inception_crop_box(rng, img.height, img.width)
    img = img.resize((size, size), Image.BILINEAR, box=(left, top, left + cw, top + ch))
    if flip and rng.random() < 0.5:
        img = img.transpose(Image.FLIP_LEFT_RIGHT)
    return img


def eval_geometry(image: np.ndarray, size: int, crop_frac: float = 1.0) -> Image.Image:
    """uint8 (H, W, C) -> PIL (size, size): shorter side to size / crop_frac, centre crop."""
    img = _to_pil(image)
    scale = size / crop_frac / min(img.height, img.width)
    rh, rw = max(size, round(img.height * scale)), max(size, round(img.width * scale))
    img = img.resize((rw, rh), Image.BILINEAR)
    top, left = (rh - size) // 2, (rw - size) // 2
    return img.crop((left, top, left + size, top + size))


def to_float(img: Image.Image, channels: int) -> np.ndarray:
    """PIL uint8 -> (H, W, C) float32 in [-1, 1]."""
    return _from_pil(img, channels) / 127.5 - 1.0


# --------------------------------------------------------------------------- RandAugment


def _level(magnitude: float, hi: float, rng) -> float:
    v = magnitude / 30.0 * hi  # magnitude scale 0..30 as in the RandAugment paper
    return -v if rng.random() < 0.5 else v


def _affine(img, rng, kind, magnitude):
    fill = (128,) * len(img.getbands())
    if kind == "rotate":
        return img.rotate(_level(magnitude, 30.0, rng), fillcolor=fill)
    if kind == "shear_x":
        return img.transform(img.size, Image.AFFINE, (1, _level(magnitude, 0.3, rng), 0, 0, 1, 0),
                             fillcolor=fill)
    if kind == "shear_y":
        return img.transform(img.size, Image.AFFINE, (1, 0, 0, _level(magnitude, 0.3, rng), 1, 0),
                             fillcolor=fill)
    shift = _level(magnitude, 0.45, rng) * img.size[0]
    mat = (1, 0, shift, 0, 1, 0) if kind == "translate_x" else (1, 0, 0, 0, 1, shift)
    return img.transform(img.size, Image.AFFINE, mat, fillcolor=fill)


def _enhance(cls, img, rng, magnitude):
    return cls(img).enhance(1.0 + _level(magnitude, 0.9, rng))


_RANDAUG_OPS = {
    "identity": lambda img, rng, m: img,
    "auto_contrast": lambda img, rng, m: ImageOps.autocontrast(img),
    "equalize": lambda img, rng, m: ImageOps.equalize(img),
    "invert": lambda img, rng, m: ImageOps.invert(img),
    "rotate": lambda img, rng, m: _affine(img, rng, "rotate", m),
    "posterize": lambda img, rng, m: ImageOps.posterize(img, max(1, 8 - int(m / 30 * 4))),
    "solarize": lambda img, rng, m: ImageOps.solarize(img, 256 - int(m / 30 * 256)),
    "color": lambda img, rng, m: _enhance(ImageEnhance.Color, img, rng, m),
    "contrast": lambda img, rng, m: _enhance(ImageEnhance.Contrast, img, rng, m),
    "brightness": lambda img, rng, m: _enhance(ImageEnhance.Brightness, img, rng, m),
    "sharpness": lambda img, rng, m: _enhance(ImageEnhance.Sharpness, img, rng, m),
    "shear_x": lambda img, rng, m: _affine(img, rng, "shear_x", m),
    "shear_y": lambda img, rng, m: _affine(img, rng, "shear_y", m),
    "translate_x": lambda img, rng, m: _affine(img, rng, "translate_x", m),
    "translate_y": lambda img, rng, m: _affine(img, rng, "translate_y", m),
}


def randaugment(img: Image.Image, rng: np.random.Generator, num_ops: int,
                magnitude: float) -> Image.Image:
    """RandAugment (Cubuk et al. 2020): `num_ops` ops drawn uniformly, each at `magnitude`/30."""
    names = list(_RANDAUG_OPS)
    for i in rng.integers(0, len(names), size=num_ops):
        img = _RANDAUG_OPS[names[i]](img, rng, magnitude)
    return img
