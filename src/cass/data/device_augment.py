"""A method's augmentation run in batches on the training device, with the PIL path's random draws.

The PIL path (:class:`cass.data.dataset.ImageDataset` + the method's torchvision v2 transform) costs
a DataLoader worker about a millisecond per image per view; a GPU step wants thousands of images per
second. Here the same transform object is split in two:

* **host** (where the image is read, per image): under the dataset's (seed, epoch, index) seeding,
  the transform is called with each of its pipelines replaced by a walk (:func:`_draw`) that draws
  exactly the random numbers the PIL path draws (same ``RandomApply`` coins, same ``make_params``,
  same order) without touching pixels. Steps that change the image's size (``RandomResizedCrop``)
  then run for real, with torchvision's tensor kernel, on the cached uint8 image; every other step
  becomes one row of numbers.
* **device** (per batch): each remaining step runs once over the whole batch with per-image
  parameters, and the images whose step did not fire keep their values (a blend weight of 0), so
  the host never needs to know which images fired and the device never waits for the host.
  Colour and geometry follow torchvision's uint8 tensor kernels operation by operation (reusing its
  helpers where they take batches), so a batch equals torchvision's per-image output: bit for bit
  on the CPU (the tests check it), up to the GPU kernels' own float rounding on CUDA.

Against the PIL path the random parameters are identical for a given seed when the cached image
has the size the PIL pipeline sees at that point: always for CASS (its pipeline starts with the very
``Resize`` the cache applies). DINO's multi-crop draws its crops from a cached square larger than
the training size (``dino.source_size``, by default twice it) instead of the original file, so local
crops keep detail above the training size without decoding the originals every epoch; when the
originals are not square, crops are cut from that square resize (``data.path: pil`` keeps the
originals). Pixel kernels differ slightly from PIL's (tensor
vs PIL rounding and interpolation), as they do for any torchvision tensor pipeline.
"""

from __future__ import annotations

import copy
import functools
import math
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torchvision.transforms import v2

# torchvision's own helpers, shared so that batched output matches its per-image output.
from torchvision.transforms.v2._transform import _RandomApplyTransform
from torchvision.transforms.v2._utils import _get_fill
from torchvision.transforms.v2.functional._color import (
    _rgb_to_grayscale_image,
    _rgb_to_hsv,
)
from torchvision.transforms.v2.functional._geometry import (
    _affine_parse_args,
    _check_interpolation,
    _get_inverse_affine_matrix,
)

from cass.data.cache import cache_resize

Views = Any
"""One ``(uint8 images, params)`` pair per view: a tuple for one-view transforms, else a list of them."""


class UnsupportedAugmentation(ValueError):
    """The transform has a step the device path cannot run; the message names it (use ``data.path: pil``)."""


class DeviceOp(ABC):
    """One random step of a pipeline, applied to a batch with one row of parameters per image.

    Images travel between steps as float32 holding uint8 values (whole numbers 0..255), and each step
    rounds as torchvision's uint8 kernel does: the same numbers, without a dtype conversion per step.
    """

    width = 0
    """How many numbers describe the step for one image."""

    def __init__(self, leaf: v2.Transform) -> None:
        self.leaf = leaf

    def encode(self, params: dict[str, Any]) -> list[float]:
        """The numbers of ``params`` (what ``leaf.make_params`` drew) for one image."""
        return []

    def identity(self) -> list[float]:
        """Harmless numbers for images where the step did not fire (computed on a GPU, then discarded)."""
        return []

    @abstractmethod
    def apply(self, x: torch.Tensor, p: torch.Tensor, fired: torch.Tensor) -> torch.Tensor:
        """``x`` (B, C, H, W), ``p`` (B, width) float64, ``fired`` (B,) bool: the batch after the step."""


class _ImageStep(DeviceOp):
    """A step that transforms each image it fired on by itself (:meth:`step`)."""

    def apply(self, x: torch.Tensor, p: torch.Tensor, fired: torch.Tensor) -> torch.Tensor:
        return _on_active(fired, x, p, self.step)

    @abstractmethod
    def step(self, x: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
        """The step on every image of ``x``, with its row of ``p``."""


def _on_active(
    active: torch.Tensor, x: torch.Tensor, p: torch.Tensor, step: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
) -> torch.Tensor:
    """``step`` applied to the images where ``active``, the others unchanged.

    On an accelerator the step runs on the whole batch and a blend weight of exactly 0 or 1 keeps
    each image's result or its input: fixed shapes, and the host never needs to read ``active``, so
    nothing waits. On the CPU, where reading it costs nothing, only the active images are computed.
    """
    if _computes_subsets(x.device):
        rows = active.nonzero().squeeze(1)
        if len(rows) == 0:
            return x
        return x.index_copy(0, rows, step(x.index_select(0, rows), p.index_select(0, rows)))
    return torch.lerp(x, step(x, p), active.to(x.dtype).view(-1, 1, 1, 1))


def _computes_subsets(device: torch.device) -> bool:
    return device.type == "cpu"


class _HorizontalFlip(_ImageStep):
    def step(self, x: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
        return x.flip(-1)


class _VerticalFlip(_ImageStep):
    def step(self, x: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
        return x.flip(-2)


class _Grayscale(_ImageStep):
    def step(self, x: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
        return _grey(x).expand_as(x)


class _Solarize(_ImageStep):
    def step(self, x: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
        return torch.where(x >= self.leaf.threshold, 255 - x, x)


class _ToDtype(DeviceOp):
    """The final conversion to float in [0, 1] (``ToDtype(torch.float32, scale=True)``, the only one supported)."""

    def __init__(self, leaf: v2.Transform) -> None:
        if leaf.dtype != torch.float32 or not leaf.scale:
            raise UnsupportedAugmentation(f"{leaf!r}: only ToDtype(torch.float32, scale=True) is supported")
        super().__init__(leaf)

    def apply(self, x: torch.Tensor, p: torch.Tensor, fired: torch.Tensor) -> torch.Tensor:
        return x.mul(1.0 / 255)


def _grey(x: torch.Tensor) -> torch.Tensor:
    """(B, 1, H, W) luma, truncated to whole values as torchvision's uint8 grayscale is."""
    return _rgb_to_grayscale_image(x, num_output_channels=1, preserve_dtype=False).floor_()


class _ColorJitter(DeviceOp):
    """Brightness, contrast, saturation and hue in each image's own random order.

    Brightness, contrast and saturation are all ``x * f + other * (1 - f)`` (other = 0, the mean grey,
    the grey image), so in each of the four rounds they are one blend, and hue the other step.
    """

    width = 8
    """The order (4), then brightness, contrast, saturation and hue factors."""
    FACTORS = ("brightness_factor", "contrast_factor", "saturation_factor", "hue_factor")
    IDENTITY = (1.0, 1.0, 1.0, 0.0)

    def __init__(self, leaf: v2.Transform) -> None:
        super().__init__(leaf)
        configured = [leaf.brightness, leaf.contrast, leaf.saturation]
        self.blends = [kind for kind, value in enumerate(configured) if value is not None]
        self.hue = leaf.hue is not None

    def encode(self, params: dict[str, Any]) -> list[float]:
        factors = [none if params[k] is None else params[k] for k, none in zip(self.FACTORS, self.IDENTITY)]
        return [*params["fn_idx"].tolist(), *factors]

    def identity(self) -> list[float]:
        return [0.0, 1.0, 2.0, 3.0, *self.IDENTITY]

    def apply(self, x: torch.Tensor, p: torch.Tensor, fired: torch.Tensor) -> torch.Tensor:
        for r in range(4):
            kind = p[:, r]
            if self.blends:
                blending = fired & functools.reduce(torch.logical_or, [kind == k for k in self.blends])
                x = _on_active(blending, x, p, functools.partial(self.blend_round, r))
            if self.hue:
                x = _on_active(fired & (kind == 3), x, p, lambda xs, ps: _adjust_hue(xs, ps[:, 7]))
        return x

    def blend_round(self, r: int, x: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
        """Round ``r`` for images whose step in that round is brightness, contrast or saturation."""
        kind = p[:, r].view(-1, 1, 1, 1)
        factor = torch.gather(p[:, 4:7], 1, p[:, r : r + 1].long().clamp(max=2)).view(-1)
        if 1 in self.blends or 2 in self.blends:
            grey = _grey(x)
            mean_grey = grey.mean(dim=(-3, -2, -1), keepdim=True)
            other = torch.where(kind == 1, mean_grey, torch.where(kind == 2, grey, 0.0))
        else:
            other = torch.zeros((), device=x.device)
        return _blend(x, other, factor)


def _blend(x: torch.Tensor, other: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """torchvision's uint8 ``_blend`` with one ratio per image (a float32 ratio, as its scalar becomes)."""
    ratio = factor.float().view(-1, 1, 1, 1)
    complement = (1.0 - factor).float().view(-1, 1, 1, 1)
    # addcmul rounds like torchvision's add_(other, alpha=1 - ratio) (one rounding of x*r + other*(1-r)).
    return torch.addcmul(x.mul(ratio), other, complement).clamp_(0, 255).floor_()


def _adjust_hue(x: torch.Tensor, hue: torch.Tensor) -> torch.Tensor:
    """torchvision's uint8 ``adjust_hue_image`` with one hue shift per image."""
    h, s, v = _rgb_to_hsv(x.mul(1.0 / 255)).unbind(dim=-3)
    h = h.add(hue.float().view(-1, 1, 1)).remainder_(1.0)
    rgb = _hsv_to_rgb(h, s, v)
    return rgb.mul_(255 + 1.0 - 1e-3).floor_()  # torchvision's float -> uint8 conversion


def _hsv_to_rgb(h: torch.Tensor, s: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """torchvision's ``_hsv_to_rgb`` arithmetic; the channel pick reads a table kept on the device
    (torchvision copies its table from the host at every call) through one ``index_select``."""
    h6 = h.mul(6)
    i = torch.floor(h6)
    f = h6.sub_(i)
    sxf = s * f
    one_minus_s = 1.0 - s
    q = (1.0 - sxf).mul_(v).clamp_(0.0, 1.0)
    t = sxf.add_(one_minus_s).mul_(v).clamp_(0.0, 1.0)
    p = one_minus_s.mul_(v).clamp_(0.0, 1.0)
    sector = i.to(dtype=torch.int64).remainder_(6)
    vpqt = torch.stack((v, p, q, t), dim=-3)
    pick = _hsv_pick(vpqt.device).index_select(0, sector.reshape(-1)).view(*sector.shape, 3).movedim(-1, -3)
    return vpqt.gather(-3, pick)


@functools.cache
def _hsv_pick(device: torch.device) -> torch.Tensor:
    """(6, 3): for each hue sector, which of (v, p, q, t) is red, green and blue. Copied once per device."""
    return torch.tensor([[0, 3, 1], [2, 0, 1], [1, 0, 3], [1, 2, 0], [3, 1, 0], [0, 1, 2]], device=device)


class _GridOp(_ImageStep):
    """Warps whose per-image grid comes from a 2x3 (affine) or 8-coefficient (perspective) matrix."""

    def __init__(self, leaf: v2.Transform) -> None:
        self.fill = _get_fill(leaf._fill, torch.Tensor)
        if self.fill is not None and not isinstance(self.fill, (int, float)):
            raise UnsupportedAugmentation(f"{type(leaf).__name__} with a per-channel fill is not supported")
        self.mode = _check_interpolation(leaf.interpolation).value
        super().__init__(leaf)

    def step(self, x: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
        height, width = x.shape[-2:]
        return self.warp(x, self.grid(p.float(), width, height)).round_()

    def warp(self, x: torch.Tensor, grid: torch.Tensor) -> torch.Tensor:
        """torchvision's ``_apply_grid_transform`` (float images, scalar fill) with one grid per image."""
        sample = functools.partial(
            torch.nn.functional.grid_sample, grid=grid, mode=self.mode, padding_mode="zeros", align_corners=False
        )
        if self.fill is None:
            return sample(x)
        n, c, h, w = x.shape
        out, mask = sample(torch.cat((x, torch.ones((n, 1, h, w), device=x.device)), dim=1)).split([c, 1], dim=1)
        if self.mode == "nearest":
            return torch.where(mask < 0.5, self.fill, out)
        return out.sub_(self.fill).mul_(mask).add_(self.fill)

    @abstractmethod
    def grid(self, p: torch.Tensor, width: int, height: int) -> torch.Tensor:
        """(B, H, W, 2) sampling grid in [-1, 1]."""


def _to_unit(theta_t: torch.Tensor, width: int, height: int) -> torch.Tensor:
    """Divide the x and y output columns of a transposed (B, 3, 2) matrix by half the width and height.

    torchvision divides by a tensor it makes on the host; Python numbers keep the device from waiting.
    """
    return torch.stack((theta_t[..., 0] / (0.5 * width), theta_t[..., 1] / (0.5 * height)), dim=-1)


def _base_grid(xs: torch.Tensor, ys: torch.Tensor) -> torch.Tensor:
    """(1, H*W, 3) rows ``(x, y, 1)`` over pixel coordinates ``xs`` and ``ys``, as torchvision lays them out."""
    base = torch.empty(1, len(ys), len(xs), 3, device=xs.device)
    base[..., 0].copy_(xs)
    base[..., 1].copy_(ys.unsqueeze(-1))
    base[..., 2].fill_(1)
    return base.view(1, -1, 3)


class _Perspective(_GridOp):
    """torchvision's ``_perspective_grid``, one set of coefficients per image."""

    width = 8

    def encode(self, params: dict[str, Any]) -> list[float]:
        return list(params["coefficients"])

    def identity(self) -> list[float]:
        return [1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0]

    def grid(self, p: torch.Tensor, width: int, height: int) -> torch.Tensor:
        n = p.shape[0]
        theta1 = p[:, :6].view(n, 2, 3)
        theta2 = torch.cat([p[:, 6:8], torch.ones_like(p[:, :1])], dim=1).unsqueeze(1).expand(n, 2, 3)
        xs = torch.linspace(0.5, width - 0.5, steps=width, device=p.device)
        ys = torch.linspace(0.5, height - 0.5, steps=height, device=p.device)
        base = _base_grid(xs, ys).expand(n, -1, -1)
        grid = base.bmm(_to_unit(theta1.transpose(1, 2), width, height)).div_(base.bmm(theta2.transpose(1, 2)))
        return grid.sub_(1.0).view(n, height, width, 2)


class _Affine(_GridOp):
    """torchvision's ``affine_image`` (no ``center``), one inverse matrix per image."""

    width = 6

    def __init__(self, leaf: v2.Transform) -> None:
        if leaf.center is not None:
            raise UnsupportedAugmentation("RandomAffine with a center is not supported on the device path")
        super().__init__(leaf)

    def encode(self, params: dict[str, Any]) -> list[float]:
        interpolation = _check_interpolation(self.leaf.interpolation)
        angle, translate, shear, _ = _affine_parse_args(
            params["angle"], params["translate"], params["scale"], params["shear"], interpolation
        )
        return _get_inverse_affine_matrix([0.0, 0.0], angle, [float(t) for t in translate], params["scale"], shear)

    def identity(self) -> list[float]:
        return [1.0, 0.0, 0.0, 0.0, 1.0, 0.0]

    def grid(self, p: torch.Tensor, width: int, height: int) -> torch.Tensor:
        n = p.shape[0]
        theta = _to_unit(p.view(n, 2, 3).transpose(1, 2), width, height)
        xs = torch.linspace((1.0 - width) * 0.5, (width - 1.0) * 0.5, steps=width, device=p.device)
        ys = torch.linspace((1.0 - height) * 0.5, (height - 1.0) * 0.5, steps=height, device=p.device)
        return _base_grid(xs, ys).expand(n, -1, -1).bmm(theta).view(n, height, width, 2)


class _GaussianBlur(_ImageStep):
    """torchvision's ``gaussian_blur_image`` with one sigma per image: a grouped convolution."""

    width = 2

    def encode(self, params: dict[str, Any]) -> list[float]:
        return list(params["sigma"])

    def identity(self) -> list[float]:
        return [1.0, 1.0]

    def step(self, x: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
        kx, ky = self.leaf.kernel_size
        n, c, h, w = x.shape
        kernels = _gaussian_kernel1d(ky, p[:, 1]).unsqueeze(-1) * _gaussian_kernel1d(kx, p[:, 0]).unsqueeze(-2)
        weight = kernels.repeat_interleave(c, dim=0).unsqueeze(1)  # (n*c, 1, ky, kx)
        padded = torch.nn.functional.pad(x, [kx // 2, kx // 2, ky // 2, ky // 2], mode="reflect")
        blurred = torch.nn.functional.conv2d(padded.reshape(1, n * c, *padded.shape[-2:]), weight, groups=n * c)
        return blurred.view(n, c, h, w).round_()


def _gaussian_kernel1d(size: int, sigma: torch.Tensor) -> torch.Tensor:
    """(B, size): torchvision's ``_get_gaussian_kernel1d`` for a batch of sigmas."""
    lim = (size - 1) / (2.0 * math.sqrt(2.0))
    x = torch.linspace(-lim, lim, steps=size, device=sigma.device)
    return torch.softmax(x.div(sigma.float().unsqueeze(-1)).pow(2).neg(), dim=-1)


DEVICE_OPS: dict[type, type[DeviceOp]] = {
    v2.ColorJitter: _ColorJitter,
    v2.RandomPerspective: _Perspective,
    v2.RandomAffine: _Affine,
    v2.GaussianBlur: _GaussianBlur,
    v2.RandomHorizontalFlip: _HorizontalFlip,
    v2.RandomVerticalFlip: _VerticalFlip,
    v2.RandomGrayscale: _Grayscale,
    v2.RandomSolarize: _Solarize,
    v2.ToDtype: _ToDtype,
}
HOST_OPS = (v2.Resize, v2.RandomResizedCrop)
"""Steps that change the image's size: run per image, on the host, with torchvision's tensor kernel."""
PASSTHROUGH = (v2.ToImage,)


def _leaves(transform: v2.Transform) -> list[v2.Transform]:
    """The steps of a pipeline in order, through ``Compose`` and ``RandomApply``."""
    if isinstance(transform, (v2.Compose, v2.RandomApply)):
        return [leaf for child in transform.transforms for leaf in _leaves(child)]
    return [transform]


@dataclass
class _Plan:
    """One pipeline (one kind of view): its host steps and its device steps, by position in ``_leaves``."""

    host: dict[int, v2.Transform]
    device: dict[int, DeviceOp]

    @property
    def width(self) -> int:
        return 1 + max((op.width for op in self.device.values()), default=0)

    def encode(self, fired: dict[int, dict[str, Any]]) -> torch.Tensor:
        """(steps, width) float64: per device step, whether it fired and its numbers."""
        rows = []
        for slot, op in self.device.items():
            values = [1.0, *op.encode(fired[slot])] if slot in fired else [0.0, *op.identity()]
            rows.append(values + [0.0] * (self.width - len(values)))
        return torch.tensor(rows, dtype=torch.float64).reshape(len(rows), self.width)

    def run(self, images: torch.Tensor, params: torch.Tensor) -> torch.Tensor:
        x = images.float()
        for row, op in enumerate(self.device.values()):
            p = params[:, row]
            x = op.apply(x, p[:, 1 : 1 + op.width], p[:, 0] > 0)
        return x


def _plan(pipeline: v2.Transform, size: int) -> _Plan:
    host: dict[int, v2.Transform] = {}
    device: dict[int, DeviceOp] = {}
    for slot, leaf in enumerate(_leaves(pipeline)):
        if isinstance(leaf, HOST_OPS):
            if device:
                raise UnsupportedAugmentation(f"{type(leaf).__name__} after a pixel step is not supported")
            if isinstance(leaf, v2.Resize) and (slot != 0 or repr(leaf) != repr(cache_resize(size))):
                raise UnsupportedAugmentation(f"{leaf!r} is not the cache's {cache_resize(size)!r}")
            host[slot] = leaf
        elif type(leaf) in DEVICE_OPS:
            device[slot] = DEVICE_OPS[type(leaf)](leaf)
        elif not isinstance(leaf, PASSTHROUGH):
            raise UnsupportedAugmentation(f"{type(leaf).__name__} has no device implementation")
    return _Plan(host, device)


def _pipelines(transform: Any) -> list[tuple[str | None, v2.Transform]]:
    """The v2 pipelines a transform is made of: itself, or (multi-crop) the v2 pipelines it holds."""
    if isinstance(transform, v2.Transform):
        return [(None, transform)]
    found = [(name, value) for name, value in vars(transform).items() if isinstance(value, v2.Transform)]
    if not found:
        raise UnsupportedAugmentation(f"{type(transform).__name__} holds no torchvision v2 pipeline")
    return found


def _standin(height: int, width: int) -> torch.Tensor:
    """An image-shaped tensor with no memory behind it: ``make_params`` only looks at its shape."""
    return torch.empty((), dtype=torch.uint8).expand(3, height, width)


def _draw(
    transform: v2.Transform, size: tuple[int, int], fired: dict[int, dict[str, Any]], slot: int = 0
) -> tuple[int, tuple[int, int]]:
    """Draw what torchvision's ``forward`` of ``transform`` would draw for an image of ``size``, in its order.

    A coin per ``RandomApply`` and per random-apply step (flips, perspective...), then ``make_params`` of
    each step that runs, recorded in ``fired`` by step position (as :func:`_leaves` numbers them, from
    ``slot``). Returns the next position and the image size after the steps. Walking the pipeline
    here rather than calling it skips torchvision's per-call input handling, which costs more than
    the draws themselves; the tests compare the outcome with torchvision's own, seed for seed.
    """
    if isinstance(transform, (v2.Compose, v2.RandomApply)):
        if isinstance(transform, v2.RandomApply) and torch.rand(1) >= transform.p:
            return slot + len(_leaves(transform)), size
        for child in transform.transforms:
            slot, size = _draw(child, size, fired, slot)
        return slot, size
    if isinstance(transform, _RandomApplyTransform) and torch.rand(1) >= transform.p:
        return slot + 1, size
    fired[slot] = transform.make_params([_standin(*size)])
    return slot + 1, (tuple(transform.size) if isinstance(transform, HOST_OPS) else size)


class _Recorder:
    """Collects, per view, its pipeline's number and the parameters of the steps that fired."""

    def __init__(self) -> None:
        self.views: list[tuple[int, dict[int, dict[str, Any]]]] = []


class _View:
    """Stands for one pipeline in the recording copy of a transform: draws its parameters, touches no pixel."""

    def __init__(self, pipeline: v2.Transform, plan: int, recorder: _Recorder) -> None:
        self.pipeline = pipeline
        self.plan = plan
        self.recorder = recorder

    def __call__(self, image: torch.Tensor) -> torch.Tensor:
        fired: dict[int, dict[str, Any]] = {}
        _, size = _draw(self.pipeline, tuple(image.shape[-2:]), fired)
        self.recorder.views.append((self.plan, fired))
        return _standin(*size)


class DeviceAugment:
    """A method's train transform as a per-image host part (:meth:`host`) and a batched device part (``__call__``).

    ``size`` is the side of the cached images. Raises :class:`UnsupportedAugmentation` when a step
    has no device implementation.
    """

    def __init__(self, transform: Any, size: int) -> None:
        self.size = size
        self.plans = [_plan(pipeline, size) for _, pipeline in _pipelines(transform)]
        self._recorder = _Recorder()
        self._recording = self._recording_copy(transform)
        with torch.random.fork_rng(devices=[]):
            self.view_plans = [plan for plan, _ in self._record()]
        self.multi_view = not isinstance(transform, v2.Transform)

    def _recording_copy(self, transform: Any) -> Any:
        """``transform`` with each of its pipelines replaced by a :class:`_View` (its own call order is kept)."""
        pipelines = _pipelines(transform)
        if pipelines[0][0] is None:
            return _View(transform, 0, self._recorder)
        recording = copy.copy(transform)
        for plan, (name, pipeline) in enumerate(pipelines):
            setattr(recording, name, _View(pipeline, plan, self._recorder))
        return recording

    def _record(self) -> list[tuple[int, dict[int, dict[str, Any]]]]:
        self._recorder.views = []
        self._recording(_standin(self.size, self.size))
        return self._recorder.views

    def host(self, image: torch.Tensor) -> Views:
        """A cached (3, S, S) uint8 image -> its view(s) as ``(uint8 image, params)``, drawing from torch's RNG."""
        records = self._record()
        if [plan for plan, _ in records] != self.view_plans:
            raise RuntimeError("the transform changed its sequence of views; the device path needs a fixed one")
        views = []
        for plan_index, fired in records:
            plan = self.plans[plan_index]
            view = image
            for slot, leaf in plan.host.items():
                if slot in fired and not isinstance(leaf, v2.Resize):  # the cache holds the resized image
                    view = leaf.transform(view, fired[slot])
            views.append((view.contiguous(), plan.encode(fired)))
        return views if self.multi_view else views[0]

    def __call__(self, batch: Views) -> torch.Tensor | list[torch.Tensor]:
        """Batched :meth:`host` output, on the device -> the float views the method's forward takes.

        Views cut by the same pipeline (DINO's local crops) go through it as one batch.
        """
        if not self.multi_view:
            images, params = batch
            return self.plans[self.view_plans[0]].run(images, params)
        out: list[torch.Tensor | None] = [None] * len(batch)
        for plan_index, plan in enumerate(self.plans):
            positions = [i for i, p in enumerate(self.view_plans) if p == plan_index]
            if not positions:
                continue
            images = torch.cat([batch[i][0] for i in positions])
            params = torch.cat([batch[i][1] for i in positions])
            for i, view in zip(positions, plan.run(images, params).chunk(len(positions)), strict=True):
                out[i] = view
        return out

