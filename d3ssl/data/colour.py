"""SoCo's colour augmentation (BYOL's recipe) on uint8 RGB images, in NumPy/OpenCV.

Per view: colour jitter (brightness 0.4, contrast 0.4, saturation 0.2, hue 0.1, in random order) with
probability 0.8; grayscale with probability 0.2; Gaussian blur with sigma ~ U(0.1, 2.0) pixels of a
224-pixel view (the recipe's size; scaled by S/224 for S-pixel views, so that a small view is blurred
as much relative to its content as a 224-pixel one) with probability 1.0 on view 1 and 0.1 on view 2;
solarize (invert pixels >= 128) with probability 0.2 on view 2 only. The operations follow
torchvision's definitions (factors drawn the same way, grayscale with ITU-R 601 weights, hue as a
rotation of the HSV hue circle), each done with a lookup table or one OpenCV call per image. The
parameters are drawn first (:func:`sample_colour`) and applied after (:func:`apply_colour`), so the
draw is independent of the pixels.
"""
from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np

from .batch import IMAGENET_MEAN, IMAGENET_STD


@dataclass
class ColourConfig:
    enabled: bool = True                 # False: views keep their colours (tests, debugging)
    jitter_p: float = 0.8                # probability of the colour jitter, per view
    brightness: float = 0.4              # factor ~ U(1-b, 1+b)
    contrast: float = 0.4                # factor ~ U(1-c, 1+c)
    saturation: float = 0.2              # factor ~ U(1-s, 1+s)
    hue: float = 0.1                     # shift ~ U(-h, h) of the hue circle
    grayscale_p: float = 0.2             # probability of converting to gray, per view
    blur_p: tuple[float, float] = (1.0, 0.1)       # Gaussian blur probability (view 1, view 2)
    blur_sigma: tuple[float, float] = (0.1, 2.0)   # sigma ~ U(lo, hi), pixels of a blur_reference_size view
    # The view size blur_sigma is measured in: an S-pixel view is blurred with sigma * S / this. The
    # recipe's sigmas are for 224-pixel views; unscaled, a 64-pixel view would be blurred 3.5x as much
    # relative to its content (enough to wipe out textures a few pixels across).
    blur_reference_size: int = 224
    solarize_p: tuple[float, float] = (0.0, 0.2)   # solarize probability (view 1, view 2)
    solarize_threshold: int = 128        # solarize inverts pixels at or above this level

    def __post_init__(self):
        if not 0 <= self.hue <= 0.5:
            raise ValueError(f"ColourConfig.hue must be in [0, 0.5] (half the hue circle), got {self.hue}")
        if self.blur_reference_size <= 0:
            raise ValueError(f"ColourConfig.blur_reference_size must be > 0, got {self.blur_reference_size}")
        lo, hi = self.blur_sigma
        if not 0 <= lo <= hi:
            raise ValueError(f"ColourConfig.blur_sigma must satisfy 0 <= min <= max, got {self.blur_sigma}")


@dataclass
class ColourParams:
    """One view's draw. Factors are 1 / shift 0 when the jitter is off."""
    order: tuple[int, ...] = (0, 1, 2, 3)   # 0 brightness, 1 contrast, 2 saturation, 3 hue
    brightness: float = 1.0
    contrast: float = 1.0
    saturation: float = 1.0
    hue: float = 0.0
    grayscale: bool = False
    blur_sigma: float = 0.0                 # 0: no blur
    solarize: bool = False
    jitter: bool = False


def sample_colour(rng: np.random.Generator, cfg: ColourConfig, view: int, size: int) -> ColourParams:
    """Draws the colour augmentation of view 1 (`view`=0) or view 2 (`view`=1) of `size` x `size`
    pixels (the blur's sigma is scaled to it, see ColourConfig.blur_reference_size)."""
    p = ColourParams()
    if not cfg.enabled:
        return p
    if rng.random() < cfg.jitter_p:
        p.jitter = True
        p.order = tuple(int(i) for i in rng.permutation(4))
        p.brightness = float(rng.uniform(max(0.0, 1 - cfg.brightness), 1 + cfg.brightness))
        p.contrast = float(rng.uniform(max(0.0, 1 - cfg.contrast), 1 + cfg.contrast))
        p.saturation = float(rng.uniform(max(0.0, 1 - cfg.saturation), 1 + cfg.saturation))
        p.hue = float(rng.uniform(-cfg.hue, cfg.hue))
    p.grayscale = bool(rng.random() < cfg.grayscale_p)
    if rng.random() < cfg.blur_p[view]:
        p.blur_sigma = float(rng.uniform(*cfg.blur_sigma)) * (size / cfg.blur_reference_size)
    p.solarize = bool(rng.random() < cfg.solarize_p[view])
    return p


_RAMP = np.arange(256, dtype=np.float32)


def _lut(values: np.ndarray) -> np.ndarray:
    return np.clip(np.rint(values), 0, 255).astype(np.uint8)


def _gray(img: np.ndarray) -> np.ndarray:
    return cv2.cvtColor(img, cv2.COLOR_RGB2GRAY)


def apply_colour(img: np.ndarray, p: ColourParams, threshold: int = 128) -> np.ndarray:
    """Applies a draw to a uint8 RGB image [H,W,3]; returns a uint8 RGB image (maybe the same array)."""
    if p.jitter:
        for op in p.order:
            if op == 0 and p.brightness != 1.0:
                img = cv2.LUT(img, _lut(_RAMP * p.brightness))
            elif op == 1 and p.contrast != 1.0:
                mean = float(_gray(img).mean())
                img = cv2.LUT(img, _lut(_RAMP * p.contrast + (1 - p.contrast) * mean))
            elif op == 2 and p.saturation != 1.0:
                gray = cv2.cvtColor(_gray(img), cv2.COLOR_GRAY2RGB)
                img = cv2.addWeighted(img, p.saturation, gray, 1 - p.saturation, 0)
            elif op == 3 and p.hue != 0.0:
                hsv = cv2.cvtColor(img, cv2.COLOR_RGB2HSV_FULL)     # hue in [0, 256)
                shift = int(round(p.hue * 256))
                hsv[..., 0] = ((hsv[..., 0].astype(np.int16) + shift) % 256).astype(np.uint8)
                img = cv2.cvtColor(hsv, cv2.COLOR_HSV2RGB_FULL)
    if p.grayscale:
        img = cv2.cvtColor(_gray(img), cv2.COLOR_GRAY2RGB)
    if p.blur_sigma > 0:
        img = cv2.GaussianBlur(img, (0, 0), p.blur_sigma)
    if p.solarize:
        img = cv2.LUT(img, np.where(_RAMP >= threshold, 255 - _RAMP, _RAMP).astype(np.uint8))
    return img


_MEAN255 = np.array(IMAGENET_MEAN, np.float32) * 255
_INV_STD255 = 1.0 / (np.array(IMAGENET_STD, np.float32) * 255)


def normalize(images: np.ndarray) -> np.ndarray:
    """uint8 [..., 3] RGB -> float32 [..., 3] normalised with ImageNet mean/std."""
    out = images.astype(np.float32)
    out -= _MEAN255
    out *= _INV_STD255
    return out
