"""A pretrained backbone a user can take away: one network's plain timm weights without a head, in a
safetensors file whose metadata say how to rebuild that network (``cass export`` writes them; ``cass embed``
and ``cass finetune --from FILE`` read them).

The tensors are exactly the state dict of ``timm.create_model(timm_name, num_classes=0, **timm_kwargs)``
(:meth:`BackboneInfo.timm_kwargs`: a Transformer's ``img_size`` and ``patch_size``), so timm loads the file
itself with ``pretrained=True, pretrained_cfg_overlay=dict(file=path)``: the key names are timm's own and
there is no head to drop. A CNN with cass's small stem (``cnn_stem`` ``small``: a 3x3 stride-1 first
convolution, no max-pool) has a shape timm cannot build from a name; :func:`load_backbone` builds any of them.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cass.models.factory import Network, WeightsUnavailableError, create_network, shape_options
from cass.utils.checkpoint import CheckpointError, read_info, save_weights

BACKBONE_FORMAT = "cass-backbone/1"
"""The ``format`` metadata of an exported backbone file."""


@dataclass(frozen=True)
class BackboneInfo:
    """What rebuilds an exported network: its timm name and the shape options cass gave it."""

    timm_name: str
    arch: str
    """``cnn`` or ``vit``: the network's role in the pretraining run."""
    img_size: int
    """The input size it was pretrained at (a Transformer's position embeddings are made for it)."""
    cnn_stem: str = "timm"
    patch_size: int | None = None

    @classmethod
    def of(cls, net: Network, arch: str) -> BackboneInfo:
        return cls(net.name, arch, net.input_size, net.cnn_stem, net.patch_size)

    def timm_kwargs(self) -> dict[str, Any]:
        """The arguments of ``timm.create_model``, beside the name and ``num_classes``, that rebuild its shape."""
        if self.arch != "vit":
            return {}
        return {"img_size": self.img_size, **({"patch_size": self.patch_size} if self.patch_size else {})}

    def metadata(self) -> dict[str, str]:
        return {"format": BACKBONE_FORMAT, "timm_name": self.timm_name, "arch": self.arch,
                "img_size": str(self.img_size), "cnn_stem": self.cnn_stem, "patch_size": str(self.patch_size or ""),
                "timm_kwargs": json.dumps(self.timm_kwargs())}


def backbone_info(path: str | Path) -> BackboneInfo | None:
    """The :class:`BackboneInfo` of an exported backbone file; None for any other file."""
    path = Path(path)
    if path.suffix != ".safetensors" or not path.is_file():
        return None
    try:
        meta = read_info(path)
    except CheckpointError:
        return None
    if meta.get("format") != BACKBONE_FORMAT:
        return None
    return BackboneInfo(meta["timm_name"], meta["arch"], int(meta["img_size"]), meta["cnn_stem"],
                        int(meta["patch_size"]) if meta["patch_size"] else None)


def save_backbone(net: Network, arch: str, path: str | Path, info: dict[str, str]) -> BackboneInfo:
    """Write a headless ``net`` (built with ``num_outputs=0``) as an exported backbone (``info``: more metadata,
    e.g. its provenance).

    Headless because a user's task needs a new head, not the pretraining objective's outputs, and because
    the file then holds exactly what ``timm.create_model(..., num_classes=0)`` has.
    """
    if net.num_outputs:
        raise ValueError(f"{net.name} has a head of {net.num_outputs} outputs; export it built with num_outputs=0")
    described = BackboneInfo.of(net, arch)
    save_weights(path, net.model.state_dict(), {**info, **described.metadata(), "num_features": str(net.num_features),
                               "mean": json.dumps(net.mean.flatten().tolist()),
                               "std": json.dumps(net.std.flatten().tolist())})
    return described


def load_backbone(path: str | Path) -> Network:
    """The network of an exported backbone file, without a head (its outputs are its pooled features)."""
    info = backbone_info(path)
    if info is None:
        raise WeightsUnavailableError(f"{path}: not a backbone exported by cass export (no {BACKBONE_FORMAT} "
                                      "metadata); a fine-tuned model is a directory, give that instead")
    return create_network(info.timm_name, init=str(path), num_outputs=0, img_size=info.img_size, role=info.arch,
                          **shape_options(info.arch, info.cnn_stem, info.patch_size))
