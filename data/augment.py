"""Training augmentation shared by the CPU and the DALI loader: one parameter draw, two backends.

Steps, in arcface_torch's DALI order (``dataset.py`` with ``dali_aug``; probabilities as there):
random resized crop (p 0.1), low resolution (down- then up-sampling, the augmentation users ask
for in low-quality deployments), Gaussian blur (p 0.2), HSV jitter (p 0.2), grayscale (p 0.1).
The horizontal flip stays in the loaders (``data.loader.flip_mask``). Every probability is 0 by
default: the recipe is opt-in under ``data.augment`` (docs/data.md).

The parameters of a sample are a pure function of ``(seed, epoch, sample index)`` (splitmix64
hashes, as the flips), drawn on the host by ``sample_params`` for both loaders: the CPU loader
applies them with OpenCV (``apply_cpu``), the DALI loader feeds them to its operators as
per-sample argument inputs. So both loaders augment the same samples with the same parameters
and a resumed run repeats them. The colour step is DALI's ``fn.hsv``: a linear map along the grey
axis in YIQ space (hue rotates the I/Q plane, saturation scales it; grayscale is saturation 0),
which ``color_matrix`` reproduces to within 1 grey level.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields

import numpy as np

__all__ = ["AugmentSpec", "apply_cpu", "color_matrix", "sample_params", "splitmix64", "uniforms"]

_MASK64 = (1 << 64) - 1
_GOLDEN = 0x9E3779B97F4A7C15


def splitmix64(x: np.ndarray) -> np.ndarray:
    """Vectorized splitmix64 finalizer (Steele et al., 2014) on uint64 arrays."""
    with np.errstate(over="ignore"):
        x = (x + np.uint64(_GOLDEN)) & np.uint64(_MASK64)
        x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        out: np.ndarray = x ^ (x >> np.uint64(31))
        return out


def uniforms(indices: np.ndarray, seed: int, epoch: int, stream: int) -> np.ndarray:
    """float64 (N,) in [0, 1), a pure function of ``(seed, epoch, stream, index)``; different
    ``stream`` values give independent draws for the same samples."""
    idx = np.asarray(indices, dtype=np.int64).astype(np.uint64)
    key = splitmix64(np.array([seed & _MASK64], dtype=np.uint64))
    key = splitmix64(key ^ np.uint64(epoch & _MASK64))
    key = splitmix64(key ^ np.uint64(((stream + 1) * _GOLDEN) & _MASK64))
    return (splitmix64(idx ^ key) >> np.uint64(11)).astype(np.float64) * 2.0**-53


@dataclass(frozen=True)
class AugmentSpec:
    """Probabilities (per sample) and parameter ranges ``[low, high]`` of each step.

    Attributes:
        crop_p, crop_scale: square crop of ``crop_scale`` of the image area (fraction), at a
            uniform position, resized back to full size (bilinear).
        lowres_p, lowres_side: down-sample to a side in ``lowres_side`` pixels (antialiased),
            then up-sample back (bilinear).
        blur_p, blur_sigma: Gaussian blur, sigma in pixels; window ``2 * ceil(3 sigma) + 1``.
        hsv_p, hue, saturation: hue shift in degrees, saturation factor.
        gray_p: grayscale (saturation 0), as arcface_torch does it.

    Raises (``check``): ValueError naming the field.
    """

    crop_p: float = 0.0
    crop_scale: tuple[float, float] = (0.64, 1.0)
    lowres_p: float = 0.0
    lowres_side: tuple[float, float] = (56, 90)
    blur_p: float = 0.0
    blur_sigma: tuple[float, float] = (0.5, 1.5)
    hsv_p: float = 0.0
    hue: tuple[float, float] = (-20.0, 20.0)
    saturation: tuple[float, float] = (0.8, 1.2)
    gray_p: float = 0.0

    @property
    def enabled(self) -> bool:
        """Any step has a probability above 0."""
        return any(getattr(self, f.name) > 0 for f in fields(self) if f.name.endswith("_p"))

    def check(self, size: int = 112) -> None:
        """Raises ValueError ``"<field>: why"`` for a probability outside [0, 1] or a range
        that is not two finite numbers ``low <= high`` within the step's limits."""
        limits = {
            "crop_scale": (0.05, 1.0),
            "lowres_side": (4, size),
            "blur_sigma": (0.0, 10.0),
            "hue": (-180.0, 180.0),
            "saturation": (0.0, 4.0),
        }
        for f in fields(self):
            value = getattr(self, f.name)
            if f.name.endswith("_p"):
                if not 0.0 <= value <= 1.0:
                    raise ValueError(f"{f.name}: must be in [0, 1], got {value}")
                continue
            lo, hi = limits[f.name]
            ok = len(value) == 2 and all(
                isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
                for v in value
            )
            if not ok or not lo <= value[0] <= value[1] <= hi:
                raise ValueError(
                    f"{f.name}: must be [low, high] with {lo} <= low <= high <= {hi}, "
                    f"got {list(value)}"
                )


def _lerp(u: np.ndarray, bounds: tuple[float, float]) -> np.ndarray:
    return float(bounds[0]) + u * (float(bounds[1]) - float(bounds[0]))


def sample_params(
    spec: AugmentSpec, indices: np.ndarray, seed: int, epoch: int, size: int = 112
) -> dict[str, np.ndarray]:
    """The augmentation of samples ``indices`` in ``epoch`` (identity for steps not drawn).

    Returns:
        ``roi`` int64 (N, 4) crop box ``x0, y0, x1, y1`` (the full image without crop);
        ``side`` int64 (N,) intermediate side (``size`` without low resolution);
        ``sigma`` float32 (N,) and ``window`` int32 (N,) of the blur (0 and 1 without);
        ``hue`` float32 (N,) degrees, ``saturation`` float32 (N,) (0 and 1 without; 0 for
        grayscale); and the bool (N,) draws ``crop``, ``lowres``, ``blur``, ``hsv``, ``gray``.
    """
    idx = np.asarray(indices, dtype=np.int64)
    n = len(idx)

    def u(stream: int) -> np.ndarray:
        return uniforms(idx, seed, epoch, stream)

    crop, lowres, blur = u(0) < spec.crop_p, u(1) < spec.lowres_p, u(2) < spec.blur_p
    hsv, gray = u(3) < spec.hsv_p, u(4) < spec.gray_p
    crop_side = np.rint(size * np.sqrt(_lerp(u(5), spec.crop_scale))).astype(np.int64)
    crop_side = np.where(crop, np.clip(crop_side, 1, size), size)
    x0 = np.floor(u(6) * (size - crop_side + 1)).astype(np.int64)
    y0 = np.floor(u(7) * (size - crop_side + 1)).astype(np.int64)
    low = np.rint(_lerp(u(8), spec.lowres_side)).astype(np.int64)
    sigma = np.where(blur, _lerp(u(9), spec.blur_sigma), 0.0).astype(np.float32)
    window = np.where(blur, 2 * np.ceil(3 * sigma) + 1, 1).astype(np.int32)
    hue = np.where(hsv, _lerp(u(10), spec.hue), 0.0).astype(np.float32)
    saturation = np.where(hsv, _lerp(u(11), spec.saturation), 1.0)
    return {
        "roi": np.stack([x0, y0, x0 + crop_side, y0 + crop_side], axis=1).reshape(n, 4),
        "side": np.where(lowres, low, size).astype(np.int64),
        "sigma": sigma,
        "window": window,
        "hue": hue,
        "saturation": np.where(gray, 0.0, saturation).astype(np.float32),
        "crop": crop,
        "lowres": lowres,
        "blur": blur,
        "hsv": hsv,
        "gray": gray,
    }


# RGB -> YIQ (NTSC), the space DALI's fn.hsv works in
_YIQ = np.array([[0.299, 0.587, 0.114], [0.596, -0.274, -0.322], [0.211, -0.523, 0.312]])
_YIQ_INV = np.linalg.inv(_YIQ)


def color_matrix(hue: float, saturation: float) -> np.ndarray:
    """float64 (3, 3) M with ``rgb_out = M @ rgb``: DALI ``fn.hsv(hue, saturation)`` (hue in
    degrees, rotating I/Q by ``-hue``; saturation scaling I/Q)."""
    t = math.radians(-hue)
    c, s = saturation * math.cos(t), saturation * math.sin(t)
    rot = np.array([[1.0, 0.0, 0.0], [0.0, c, -s], [0.0, s, c]])
    return np.asarray(_YIQ_INV @ rot @ _YIQ)


def apply_cpu(image: np.ndarray, params: dict[str, np.ndarray], i: int) -> np.ndarray:
    """Augments one image with row ``i`` of ``sample_params`` (OpenCV; DALI's operators in the
    DALI loader).

    Args:
        image: uint8 (H, W, 3) RGB with H = W = the ``size`` of ``sample_params``.

    Returns:
        uint8 (H, W, 3); ``image`` itself when no step was drawn.
    """
    import cv2

    size = image.shape[0]
    x0, y0, x1, y1 = (int(v) for v in params["roi"][i])
    side = int(params["side"][i])
    out = image
    if (x0, y0, x1, y1) != (0, 0, size, size) or side != size:
        region = out[y0:y1, x0:x1]
        shrink = side < region.shape[0]
        out = cv2.resize(
            region, (side, side), interpolation=cv2.INTER_AREA if shrink else cv2.INTER_LINEAR
        )
        if side != size:
            out = cv2.resize(out, (size, size), interpolation=cv2.INTER_LINEAR)
    window = int(params["window"][i])
    if window > 1:
        sigma = float(params["sigma"][i])
        out = cv2.GaussianBlur(out, (window, window), sigma, borderType=cv2.BORDER_REFLECT_101)
    hue, saturation = float(params["hue"][i]), float(params["saturation"][i])
    if hue != 0.0 or saturation != 1.0:
        m = color_matrix(hue, saturation).astype(np.float32)
        mixed = cv2.transform(out.astype(np.float32), m)
        out = np.clip(np.rint(mixed), 0, 255).astype(np.uint8)
    return out
