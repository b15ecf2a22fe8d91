"""Differentiable siamese augmentation (DSA, Zhao & Bilen 2021), batched over networks and classes.

Every transform is differentiable with respect to the images, so a distillation loss can be
backpropagated through it to the synthetic pixels. ``DSA`` draws the transform of one call:

- mode 'S': one group per call, chosen uniformly from the strategy string (default
  ``color_crop_cutout_flip_scale_rotate``; ``color`` is brightness, saturation and contrast
  applied in turn);
- the ranges of DSA's ``ParamDiffAug``: flip with p = 0.5; scale x and y each by U(1/1.2, 1.2);
  rotate by U(-15, 15) degrees; crop = translate by up to 12.5% of the side with zero padding;
  cutout of a square half the side; brightness + U(-0.5, 0.5); saturation x U(0, 2); contrast
  x U(0.5, 1.5);
- ``sample(shape)`` draws one parameter set per entry of ``shape`` (e.g. ``(K, classes, 1)``:
  one per network and class) and returns a ``Transform`` that applies them to images
  ``[*lead, C, H, W]`` whose leading dimensions ``lead`` the parameters broadcast to. Applying
  one ``Transform`` to the real and to the synthetic batch of a matching step is what makes the
  augmentation siamese: both see the same flip, the same angle, the same crop.

The group of a call comes from a CPU generator and the parameters from a generator on the
images' device, so drawing them never synchronises a GPU. Scale and rotation resample with
``affine_grid`` / ``grid_sample`` (bilinear, zero padding, ``align_corners=True`` as DSA does);
crop is two index gathers with the outside zeroed, flip a ``where``, cutout a multiplicative mask.

Example::

    dsa = DSA(seed=0, device="cuda")
    transform = dsa.sample((num_networks, num_classes, 1))     # one draw per network and class
    real = transform(real_images)          # [K, classes, 256, C, H, W]
    syn = transform(syn_images)            # [K, classes, 10, C, H, W]: the same draws, siamese
    one_per_image = dsa(batch)             # [B, C, H, W]: an independent draw per image
"""
from __future__ import annotations

import dataclasses
import math

import torch
import torch.nn.functional as F
from torch import Tensor


STRATEGY = "color_crop_cutout_flip_scale_rotate"
GROUPS = ("color", "crop", "cutout", "flip", "scale", "rotate")


@dataclasses.dataclass(frozen=True)
class DSARanges:
    """The ranges of the transforms (DSA's ``ParamDiffAug`` defaults)."""

    flip: float = 0.5  # probability of a horizontal flip
    scale: float = 1.2  # x and y scaled independently by U(1/scale, scale)
    rotate: float = 15.0  # degrees, U(-rotate, rotate)
    crop: float = 0.125  # translation of up to this fraction of the side (rounded), zero padding
    cutout: float = 0.5  # side of the zeroed square as a fraction of the image side (rounded)
    brightness: float = 1.0  # added U(-brightness/2, brightness/2)
    saturation: float = 2.0  # each pixel's distance to its mean over channels scaled by U(0, saturation)
    contrast: float = 0.5  # distance to the image mean scaled by U(1 - contrast, 1 + contrast)

    def __post_init__(self):
        if not 0 <= self.flip <= 1:
            raise ValueError(f"flip must be a probability in [0, 1], got {self.flip}")
        if not self.scale >= 1:
            raise ValueError(f"scale must be >= 1, got {self.scale}")
        for name in ("rotate", "crop", "cutout", "brightness", "saturation", "contrast"):
            if not getattr(self, name) >= 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        if self.crop > 1 or self.cutout > 1:
            raise ValueError(f"crop and cutout are fractions of the side (<= 1), got {self.crop}, {self.cutout}")


def parse_strategy(strategy: str) -> tuple[str, ...]:
    """The groups of a strategy string such as ``"color_crop_cutout_flip_scale_rotate"``."""
    if not isinstance(strategy, str) or not strategy:
        raise ValueError(f"strategy must be a non-empty string of groups joined by '_', got {strategy!r}")
    groups = tuple(strategy.split("_"))
    unknown = [g for g in groups if g not in GROUPS]
    if unknown:
        raise ValueError(f"strategy {strategy!r} names unknown group(s) {unknown}; groups are {GROUPS}")
    return groups


def _side_fraction(side: int, fraction: float) -> int:
    """``int(side * fraction + 0.5)``: DSA's rounding of the crop shift and the cutout side."""
    return int(side * fraction + 0.5)


@dataclasses.dataclass(eq=False)
class Transform:
    """One group's parameters: tensors ``params[name]`` of one shape ``S`` that broadcasts to the
    leading dimensions of the images it is applied to (see the module docstring), and the
    integer ``sizes`` the group needs (the cutout square)."""

    group: str
    params: dict[str, Tensor]
    sizes: dict[str, int] = dataclasses.field(default_factory=dict)

    @property
    def shape(self) -> torch.Size:
        return next(iter(self.params.values())).shape

    def __call__(self, images: Tensor) -> Tensor:
        if not isinstance(images, Tensor) or not images.is_floating_point() or images.dim() < 3:
            raise TypeError(f"images must be a floating tensor [..., C, H, W], got {type(images).__name__} "
                            f"of shape {tuple(getattr(images, 'shape', ()))}")
        lead = images.shape[:-3]
        try:
            fits = torch.broadcast_shapes(self.shape, lead) == lead
        except RuntimeError:
            fits = False
        if not fits:
            raise ValueError(f"images: the transform's parameters of shape {tuple(self.shape)} do not broadcast "
                             f"to the leading dimensions {tuple(lead)} of the images")
        params = {name: p.expand(lead) for name, p in self.params.items()}
        return _APPLY[self.group](images, **params, **self.sizes)


class DSA:
    """Draws DSA transforms: one group per call (mode 'S'), parameters from ``seed``.

    Args:
        strategy: groups joined by ``_`` (see ``GROUPS``).
        seed: seeds the CPU generator of the group choice and the device generator of the parameters.
        device: where the parameters are drawn (the images' device).
        ranges: the transforms' ranges (``DSARanges``).
    """

    def __init__(self, strategy: str = STRATEGY, *, seed: int = 0, device: str | torch.device = "cpu",
                 ranges: DSARanges = DSARanges()):
        self.groups = parse_strategy(strategy)
        self.strategy = strategy
        if not isinstance(ranges, DSARanges):
            raise TypeError(f"ranges must be a DSARanges, got {type(ranges).__name__}")
        self.ranges = ranges
        self.device = torch.device(device)
        self._choice = torch.Generator().manual_seed(seed)
        self._params = torch.Generator(self.device).manual_seed(seed)

    def sample(self, shape, image_size: tuple[int, int]) -> Transform:
        """One group chosen for this call and its parameters for every entry of ``shape``.

        ``image_size`` ``(H, W)`` sets the integer ranges of crop and cutout.
        """
        group = self.groups[int(torch.randint(len(self.groups), (1,), generator=self._choice))]
        return self.sample_group(group, shape, image_size)

    def sample_group(self, group: str, shape, image_size: tuple[int, int]) -> Transform:
        """Parameters of the named ``group`` for every entry of ``shape``."""
        if group not in GROUPS:
            raise ValueError(f"group must be one of {GROUPS}, got {group!r}")
        shape, r, height, width = tuple(shape), self.ranges, *image_size

        def uniform(low: float, high: float) -> Tensor:
            return torch.rand(shape, generator=self._params, device=self.device) * (high - low) + low

        def integers(low: int, high: int) -> Tensor:  # [low, high]
            return torch.randint(low, high + 1, shape, generator=self._params, device=self.device)

        if group == "color":
            params = {"brightness": uniform(-r.brightness / 2, r.brightness / 2),
                      "saturation": uniform(0, r.saturation),
                      "contrast": uniform(1 - r.contrast, 1 + r.contrast)}
        elif group == "crop":
            shift_y, shift_x = _side_fraction(height, r.crop), _side_fraction(width, r.crop)
            params = {"dy": integers(-shift_y, shift_y), "dx": integers(-shift_x, shift_x)}
        elif group == "cutout":
            size_y, size_x = _side_fraction(height, r.cutout), _side_fraction(width, r.cutout)
            # DSA's centre range: [0, side] for an even square, [0, side - 1] for an odd one.
            centre_y, centre_x = integers(0, height - size_y % 2), integers(0, width - size_x % 2)
            params = {"top": centre_y - size_y // 2, "left": centre_x - size_x // 2}
            return Transform(group, params, {"height": size_y, "width": size_x})
        elif group == "flip":
            params = {"flip": uniform(0, 1) < r.flip}
        elif group == "scale":
            params = {"sx": uniform(1 / r.scale, r.scale), "sy": uniform(1 / r.scale, r.scale)}
        else:
            params = {"angle": uniform(-r.rotate, r.rotate) * (math.pi / 180)}
        return Transform(group, params)

    def __call__(self, images: Tensor) -> Tensor:
        """``images`` ``[*lead, C, H, W]`` with an independent draw per image (one group for all)."""
        return self.sample(images.shape[:-3], tuple(images.shape[-2:]))(images)


# ---------------------------------------------------------------------------------------------- the transforms


def _per_image(t: Tensor) -> Tensor:
    return t[..., None, None, None]


def color(images: Tensor, brightness: Tensor, saturation: Tensor, contrast: Tensor) -> Tensor:
    """Add ``brightness``; scale each pixel's channels' distances to their mean by ``saturation``;
    scale the distances to the image mean by ``contrast``."""
    x = images + _per_image(brightness)
    mean = x.mean(-3, keepdim=True)
    x = (x - mean) * _per_image(saturation) + mean
    mean = x.mean((-3, -2, -1), keepdim=True)
    return (x - mean) * _per_image(contrast) + mean


def translate(images: Tensor, dy: Tensor, dx: Tensor) -> Tensor:
    """Shift by ``(dy, dx)`` whole pixels, zeros coming in: ``out[i, j] = in[i + dy, j + dx]``.

    Two gathers at clamped indices, then the rows and columns that came from outside are zeroed.
    """
    lead, (channels, height, width) = images.shape[:-3], images.shape[-3:]
    flat = images.reshape(-1, channels, height, width)
    count = flat.shape[0]
    rows = torch.arange(height, device=images.device) + dy.reshape(-1, 1)  # [count, H]
    columns = torch.arange(width, device=images.device) + dx.reshape(-1, 1)  # [count, W]
    out = flat.gather(2, rows.clamp(0, height - 1)[:, None, :, None].expand(count, channels, height, width))
    out = out.gather(3, columns.clamp(0, width - 1)[:, None, None, :].expand(count, channels, height, width))
    inside = ((rows >= 0) & (rows < height))[:, :, None] & ((columns >= 0) & (columns < width))[:, None, :]
    return (out * inside[:, None].to(out.dtype)).view(*lead, channels, height, width)


def cutout(images: Tensor, top: Tensor, left: Tensor, height: int, width: int) -> Tensor:
    """Zero the rows [top, top + height) x columns [left, left + width) (clipped to the image)."""
    rows = torch.arange(images.shape[-2], device=images.device)
    columns = torch.arange(images.shape[-1], device=images.device)
    in_rows = (rows >= top[..., None]) & (rows < top[..., None] + height)
    in_columns = (columns >= left[..., None]) & (columns < left[..., None] + width)
    keep = ~(in_rows[..., :, None] & in_columns[..., None, :])
    return images * keep.unsqueeze(-3).to(images.dtype)


def flip(images: Tensor, flip: Tensor) -> Tensor:
    """Mirror left-right where ``flip``."""
    return torch.where(_per_image(flip), images.flip(-1), images)


def affine(images: Tensor, theta: Tensor) -> Tensor:
    """Resample with the affine maps ``theta`` ``[*lead, 2, 3]`` (output -> input coordinates in
    [-1, 1], ``align_corners=True``), bilinear, zero outside."""
    lead, chw = images.shape[:-3], images.shape[-3:]
    flat = images.reshape(-1, *chw)
    grid = F.affine_grid(theta.reshape(-1, 2, 3).to(images.dtype), list(flat.shape), align_corners=True)
    return F.grid_sample(flat, grid, mode="bilinear", padding_mode="zeros", align_corners=True).view(*lead, *chw)


def scale(images: Tensor, sx: Tensor, sy: Tensor) -> Tensor:
    """Scale the sampling grid by ``sx``, ``sy`` (a factor above 1 zooms out)."""
    zero = torch.zeros_like(sx)
    theta = torch.stack([torch.stack([sx, zero, zero], -1), torch.stack([zero, sy, zero], -1)], -2)
    return affine(images, theta)


def rotate(images: Tensor, angle: Tensor) -> Tensor:
    """Rotate the sampling grid by ``angle`` radians about the image centre."""
    cos, sin, zero = angle.cos(), angle.sin(), torch.zeros_like(angle)
    theta = torch.stack([torch.stack([cos, sin, zero], -1), torch.stack([-sin, cos, zero], -1)], -2)
    return affine(images, theta)


_APPLY = {"color": color, "crop": translate, "cutout": cutout, "flip": flip, "scale": scale, "rotate": rotate}
