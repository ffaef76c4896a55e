"""One factory over timm for every network in cass (CNN or Transformer, any timm name).

Initialisation is always one of ``scratch``, ``imagenet`` or a path:

* ``scratch``: random init with a fresh head of ``num_outputs`` (CASS compares head outputs).
* ``imagenet``: timm's pretrained weights, from ``weights`` (a local safetensors / state-dict file)
  when given, else timm's download. Offline without a file this fails with a message saying how.
* a path: a cass run directory (its ``<role>.safetensors``), or a safetensors / state-dict file.
  Tensors whose shape does not match (typically the head) are dropped and reported.

Small images (28-64 px, MedMNIST) need two adaptations, both options of every run:

* ``cnn_stem="small"``: a ResNet's 7x7 stride-2 first convolution and its max-pool shrink a 28 px image
  to 7x7 before the first block; MedMNIST v2's "ResNet-18 (28)" uses a 3x3 stride-1 convolution and no
  max-pool instead. ImageNet or stand-in weights of the 7x7 kernel are resampled to 3x3 on load.
* ``patch_size`` (Transformers): a ViT/16 sees 4 patches at 32 px; a smaller patch keeps at least 16.
  Patch-embedding and position-embedding weights are resampled on load (timm's ViT filter).
"""

from __future__ import annotations

import logging
from pathlib import Path

import timm
import torch
import torch.nn.functional as F
from torch import nn

from cass.config import ConfigError
from cass.models.weights import load_state_dict_file

log = logging.getLogger(__name__)


class WeightsUnavailableError(RuntimeError):
    """Pretrained weights were asked for but cannot be loaded (offline, missing file, bad file)."""


CNN_STEMS = ("timm", "small")
"""``timm``: the network's own stem; ``small``: 3x3 stride-1 first convolution, no max-pool (28-64 px inputs)."""


class Network(nn.Module):
    """A timm model that normalises its own input with the mean and std of its timm config.

    Inputs are float images in [0, 1], so one tensor can be fed to networks with different
    normalisations (SPEC §1: use each model's own mean/std).
    """

    def __init__(self, model: nn.Module, name: str, img_size: int | None = None, cnn_stem: str = "timm",
                 patch_size: int | None = None) -> None:
        super().__init__()
        self.model = model
        self.name = name
        self.cnn_stem = cnn_stem
        self.patch_size = patch_size
        cfg = timm.data.resolve_model_data_config(model)
        self.input_size: int = img_size or int(cfg["input_size"][-1])
        self.register_buffer("mean", torch.tensor(cfg["mean"]).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(cfg["std"]).view(1, 3, 1, 1), persistent=False)

    @property
    def num_features(self) -> int:
        return int(self.model.num_features)

    @property
    def num_outputs(self) -> int:
        return int(self.model.num_classes)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Pooled backbone features (what probes, k-NN and ``cass embed`` use)."""
        x = (x - self.mean) / self.std
        return self.model.forward_head(self.model.forward_features(x), pre_logits=True)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Return (pooled features, head outputs) from one pass."""
        feats = self.features(x)
        return feats, self.model.get_classifier()(feats)

    def reset_head(self, num_outputs: int) -> None:
        """Replace the head by a fresh linear layer (fine-tuning to C classes)."""
        self.model.reset_classifier(num_outputs)

    def shape_info(self) -> dict[str, str]:
        """What, besides the timm name and size, rebuilds this network (stored in weight files' metadata)."""
        return {"cnn_stem": self.cnn_stem, "patch_size": str(self.patch_size or "")}


def shape_options(role: str, cnn_stem: str = "timm", vit_patch_size: int | None = None) -> dict[str, object]:
    """The small-image options that apply to a network of ``role`` (``cnn`` or ``vit``), for :func:`create_network`."""
    return {"cnn_stem": cnn_stem} if role == "cnn" else {"patch_size": vit_patch_size}


def _use_small_stem(model: nn.Module, name: str) -> None:
    """Replace a ResNet's stem by a 3x3 stride-1 convolution without max-pool (MedMNIST v2's ResNet (28))."""
    conv, pool = getattr(model, "conv1", None), getattr(model, "maxpool", None)
    if not isinstance(conv, nn.Conv2d) or pool is None:
        raise ConfigError(f"cnn_stem 'small' needs a timm ResNet-family CNN with a single conv1 and a maxpool; "
                          f"{name} has none (use cnn_stem 'timm')")
    model.conv1 = nn.Conv2d(conv.in_channels, conv.out_channels, 3, stride=1, padding=1, bias=conv.bias is not None)
    model.maxpool = nn.Identity()


def adapt_state_dict(state: dict[str, torch.Tensor], model: nn.Module) -> dict[str, torch.Tensor]:
    """Resample weights made for another input geometry so that they fit ``model`` (timm's filter-on-load idea).

    A ViT's patch and position embeddings go through timm's own ViT filter; a first convolution whose kernel
    differs (7x7 ImageNet stem into the small 3x3 stem) is resampled, scaled so that a flat image gives the
    same response (each filter's sum preserved: resampled, scaled by the area ratio, then shifted by the
    small remainder the interpolation's borders leave).
    """
    if isinstance(model, timm.models.vision_transformer.VisionTransformer):
        state = timm.models.vision_transformer.checkpoint_filter_fn(dict(state), model)
    own = model.state_dict()
    kernel = state.get("conv1.weight")
    if kernel is not None and "conv1.weight" in own and kernel.shape[-2:] != own["conv1.weight"].shape[-2:] \
            and kernel.shape[:2] == own["conv1.weight"].shape[:2]:
        size = tuple(own["conv1.weight"].shape[-2:])
        resized = F.interpolate(kernel.float(), size=size, mode="bilinear", antialias=True, align_corners=False)
        resized = resized * (kernel.shape[-1] * kernel.shape[-2]) / (size[0] * size[1])
        remainder = kernel.float().sum(dim=(2, 3), keepdim=True) - resized.sum(dim=(2, 3), keepdim=True)
        state = {**state, "conv1.weight": (resized + remainder / (size[0] * size[1])).to(kernel.dtype)}
    return state


def _timm_create(name: str, img_size: int | None, dynamic_img_size: bool = False, **kwargs) -> nn.Module:
    """Create a timm model; the size arguments reach only models built for a fixed size (ViTs)."""
    if name.split(".")[0] not in timm.list_models():
        raise ConfigError(f"unknown timm model {name!r} (see timm.list_models())")
    size_kwargs = {"img_size": img_size} if img_size is not None else {}
    if dynamic_img_size:
        size_kwargs["dynamic_img_size"] = True
    if size_kwargs:
        try:
            return timm.create_model(name, **size_kwargs, **kwargs)
        except TypeError:
            pass  # convolutional networks take any input size and no size arguments
    return timm.create_model(name, **kwargs)


def create_network(
    name: str,
    *,
    init: str = "scratch",
    weights: str | None = None,
    num_outputs: int = 1000,
    img_size: int | None = None,
    role: str | None = None,
    dynamic_img_size: bool = False,
    cnn_stem: str = "timm",
    patch_size: int | None = None,
) -> Network:
    """Build a timm network for cass.

    ``role`` (``cnn``, ``vit``) picks ``<role>.safetensors`` when ``init`` is a run directory.
    ``dynamic_img_size`` lets a ViT take inputs of several sizes (DINO's local crops). ``cnn_stem`` and
    ``patch_size`` adapt a CNN or a Transformer to small images (module docstring); weights made for the
    standard geometry are resampled on load.
    """
    if cnn_stem not in CNN_STEMS:
        raise ConfigError(f"cnn_stem must be one of {', '.join(CNN_STEMS)}, got {cnn_stem!r}")
    create_kwargs: dict[str, object] = {"dynamic_img_size": dynamic_img_size}
    if patch_size is not None:
        create_kwargs["patch_size"] = patch_size
    if init == "scratch":
        if weights:
            raise WeightsUnavailableError(f"weights file {weights} given with init 'scratch'; use init 'imagenet'")
        model = _timm_create(name, img_size, pretrained=False, num_classes=num_outputs, **create_kwargs)
        if cnn_stem == "small":
            _use_small_stem(model, name)
    elif init == "imagenet":
        model = _create_imagenet(name, weights, num_outputs, img_size, cnn_stem, **create_kwargs)
    else:
        model = _timm_create(name, img_size, pretrained=False, num_classes=num_outputs, **create_kwargs)
        if cnn_stem == "small":
            _use_small_stem(model, name)
        _load_checkpoint_into(model, _resolve_init_path(Path(init), role))
    return Network(model, name, img_size, cnn_stem, patch_size)


def _create_imagenet(name: str, weights: str | None, num_outputs: int, img_size: int | None, cnn_stem: str,
                     **kwargs) -> nn.Module:
    """ImageNet weights (file or download); with the small stem, the 7x7 stem kernel is resampled into it."""
    model = _create_imagenet_standard(name, weights, num_outputs, img_size, **kwargs)
    if cnn_stem == "small":
        state = model.state_dict()
        _use_small_stem(model, name)
        model.load_state_dict(adapt_state_dict(state, model))
    return model


def _create_imagenet_standard(name: str, weights: str | None, num_outputs: int, img_size: int | None,
                              **kwargs) -> nn.Module:
    if weights is not None:
        path = Path(weights)
        if not path.is_file():
            raise WeightsUnavailableError(f"weights file not found: {path}")
        try:
            return _timm_create(
                name, img_size, pretrained=True, num_classes=num_outputs, pretrained_cfg_overlay={"file": str(path)},
                **kwargs,
            )
        except Exception as err:  # timm raises many kinds; the user needs the file and the reason
            raise WeightsUnavailableError(f"cannot load ImageNet weights for {name} from {path}: {err}") from err
    try:
        return _timm_create(name, img_size, pretrained=True, num_classes=num_outputs, **kwargs)
    except Exception as err:
        raise WeightsUnavailableError(
            f"cannot download ImageNet weights for {name} ({type(err).__name__}: {err}). Offline, download them "
            f"on a machine with internet (python -c \"import timm; timm.create_model('{name}', pretrained=True)\", "
            "then copy the model.safetensors from the Hugging Face cache) and pass it with --cnn-weights/"
            "--vit-weights PATH, or use --init scratch"
        ) from err


def _resolve_init_path(path: Path, role: str | None) -> Path:
    if path.is_dir():
        candidate = path / f"{role}.safetensors" if role else None
        if candidate is None or not candidate.is_file():
            found = sorted(p.name for p in path.glob("*.safetensors"))
            raise WeightsUnavailableError(
                f"init directory {path} has no weights for role {role!r} (found: {', '.join(found) or 'none'})"
            )
        return candidate
    if not path.is_file():
        raise WeightsUnavailableError(
            f"init {str(path)!r} is neither 'scratch', 'imagenet' nor an existing checkpoint file or run directory"
        )
    return path


def _load_checkpoint_into(model: nn.Module, path: Path) -> None:
    """Load matching tensors of ``path``; mismatched heads are expected and only reported."""
    state = adapt_state_dict(load_state_dict_file(path), model)
    own = model.state_dict()
    usable = {k: v for k, v in state.items() if k in own and own[k].shape == v.shape}
    dropped = sorted(set(state) - set(usable))
    missing = sorted(set(own) - set(usable))
    if not usable:
        raise WeightsUnavailableError(f"{path}: no tensor matches the model (is it the same architecture?)")
    model.load_state_dict(usable, strict=False)
    if dropped or missing:
        log.info("%s: loaded %d tensors, kept fresh %s, ignored %s", path, len(usable), missing, dropped)
