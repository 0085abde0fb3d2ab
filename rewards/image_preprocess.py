"""The resize / center-crop / normalise of a transformers image processor, in torch.

transformers' processors work on PIL or numpy images, which cuts the autograd graph and costs a
device round trip. `ImagePreprocess` reads the same preprocessor_config.json and does the same steps
on a float [B, 3, H, W] batch, on the batch's device, differentiably. It follows the processors'
geometry exactly (output sizes, crop offsets) and their resampling closely: torch's antialiased
bicubic/bilinear use PIL's kernels and the two passes are clipped like PIL's, so the results differ
from the PIL path only by PIL's 8-bit rounding (tests/unit/rewards/test_image_preprocess.py bounds it).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.nn.functional as F

# PIL.Image.Resampling values, as processors store them in "resample".
RESAMPLE = {2: "bilinear", 3: "bicubic"}


def _size(value, what: str) -> dict:
    """A processor size entry as {"shortest_edge": n} or {"height": h, "width": w}. A bare int is a
    shortest edge for "size" (CLIP and BiT processors resize with default_to_square=False) and a
    square for "crop_size"."""
    if isinstance(value, int):
        return {"shortest_edge": value} if what == "size" else {"height": value, "width": value}
    if set(value) in ({"shortest_edge"}, {"height", "width"}):
        return {k: int(v) for k, v in value.items()}
    raise ValueError(f"unsupported {what} {value!r} in preprocessor_config.json: expected an int, shortest_edge, or height+width")


def resized_shape(height: int, width: int, size: dict) -> tuple[int, int]:
    """(height, width) after resizing to `size`, as transformers' get_resize_output_image_size computes
    it: the short side becomes shortest_edge and the long side int(shortest_edge * long / short)."""
    if "height" in size:
        return size["height"], size["width"]
    short_edge = size["shortest_edge"]
    if width <= height:
        return int(short_edge * height / width), short_edge
    return short_edge, int(short_edge * width / height)


class ImagePreprocess:
    """images [B, 3, H, W] in [0, 1] -> model input [B, 3, h, w], as the processor would make it.

    mean, std: per-channel normalisation (None: none). size: resize target (see `_size`; None: no
    resize). crop: (height, width) of the center crop (None: no crop). resample: "bicubic" or "bilinear".
    """

    def __init__(self, mean=None, std=None, size: dict | None = None, crop: tuple[int, int] | None = None, resample: str = "bicubic"):
        if resample not in RESAMPLE.values():
            raise ValueError(f"resample must be one of {sorted(RESAMPLE.values())}, got {resample!r}")
        self.mean = None if mean is None else torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1)
        self.std = None if std is None else torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1)
        self.size = size
        self.crop = crop
        self.resample = resample

    @classmethod
    def from_folder(cls, folder: Path) -> ImagePreprocess:
        """Read folder/preprocessor_config.json (any transformers image processor with the usual
        do_resize/size/resample/do_center_crop/crop_size/do_normalize/image_mean/image_std keys)."""
        file = Path(folder) / "preprocessor_config.json"
        if not file.is_file():
            raise FileNotFoundError(
                f"{file} is missing: the model's image processor config gives the input size and normalisation. "
                f"Copy it from the model this checkpoint was fine-tuned from (the reward's processor_path can "
                f"point at that folder instead)"
            )
        cfg = json.loads(file.read_text())
        resample = cfg.get("resample", 3)
        if resample not in RESAMPLE:
            raise ValueError(f"{file}: resample={resample} is not supported (only PIL bilinear=2 and bicubic=3)")
        return cls(
            mean=cfg["image_mean"] if cfg.get("do_normalize", True) else None,
            std=cfg["image_std"] if cfg.get("do_normalize", True) else None,
            size=_size(cfg["size"], "size") if cfg.get("do_resize", True) else None,
            crop=tuple(_size(cfg["crop_size"], "crop_size").values()) if cfg.get("do_center_crop", False) else None,
            resample=RESAMPLE[resample],
        )

    @property
    def output_size(self) -> tuple[int, int] | None:
        """(height, width) of every output when fixed by a crop or a height+width resize, else None."""
        if self.crop is not None:
            return self.crop
        return (self.size["height"], self.size["width"]) if self.size and "height" in self.size else None

    def resize(self, x: torch.Tensor, shape: tuple[int, int]) -> torch.Tensor:
        """PIL's resize of an 8-bit RGB image, in float: width first, then height, each pass clipped
        to [0, 1] as PIL clips its 8-bit intermediate. Without the intermediate clip, cubic overshoot
        at hard edges (common in saturated generations) differs from the processors by up to ~17/255."""
        # antialias=True selects torch's PIL-compatible kernels (PIL's a=-0.5 cubic, support widened when
        # shrinking); on float data they match PIL's float resize to ~1e-6.
        x = F.interpolate(x, size=(x.shape[-2], shape[1]), mode=self.resample, antialias=True, align_corners=False).clamp(0, 1)
        return F.interpolate(x, size=shape, mode=self.resample, antialias=True, align_corners=False).clamp(0, 1)

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        """Differentiable in `images`; float32 output on images.device."""
        if images.ndim != 4 or images.shape[1] != 3 or not images.is_floating_point():
            raise ValueError(f"images must be float [B, 3, H, W], got {images.dtype} {tuple(images.shape)}")
        # The processors see 8-bit images, so values outside [0, 1] (decoder overshoot) never reach the
        # model there; clamping here keeps the two paths the same.
        x = images.float().clamp(0, 1)
        if self.size is not None:
            shape = resized_shape(x.shape[-2], x.shape[-1], self.size)
            if shape != tuple(x.shape[-2:]):
                x = self.resize(x, shape)
        if self.crop is not None:
            height, width = x.shape[-2:]
            ch, cw = self.crop
            if ch > height or cw > width:
                raise ValueError(f"center crop {self.crop} is larger than the resized image {(height, width)}")
            top, left = (height - ch) // 2, (width - cw) // 2
            x = x[..., top : top + ch, left : left + cw]
        if self.mean is not None:
            x = (x - self.mean.to(x.device)) / self.std.to(x.device)
        return x
