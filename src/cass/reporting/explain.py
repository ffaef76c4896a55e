"""Where a fine-tuned network looks: attention maps of a Transformer, Grad-CAM of a CNN.

Both return one map per image, upsampled to the input size and scaled to [0, 1], so the report
can lay them over the images side by side. They explain a *classifier* (a ``cass finetune`` model
directory), which is the thing the results tables score.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from pytorch_grad_cam import GradCAM
from timm.utils import AttentionExtract
from torch import nn

from cass.models.factory import Network


def _unit_range(maps: torch.Tensor) -> torch.Tensor:
    """Scale each map to [0, 1] (a constant map becomes all zeros)."""
    flat = maps.flatten(1)
    low, high = flat.min(1, keepdim=True).values, flat.max(1, keepdim=True).values
    return ((flat - low) / (high - low).clamp_min(1e-12)).view_as(maps)


@torch.no_grad()
def vit_attention_maps(net: Network, images: torch.Tensor) -> np.ndarray:
    """Attention of the class token to every patch in the last block, averaged over heads: (N, H, W).

    The attention probabilities are read by timm's :class:`~timm.utils.AttentionExtract` at the last
    block's ``attn_drop`` (the identity in eval mode), which sees them only on timm's unfused attention
    path, so the fused kernel is switched off for the duration. Models without a class token are
    summarised by the attention every token pays to each patch.
    """
    model = net.model
    attention = model.blocks[-1].attn
    fused = attention.fused_attn
    attention.fused_attn = False
    try:
        extractor = AttentionExtract(net, names=[f"model.blocks.{len(model.blocks) - 1}.attn.attn_drop"],
                                     method="hook")
        probs = next(iter(extractor(images).values()))  # (N, heads, tokens, tokens)
    finally:
        attention.fused_attn = fused
    prefix = model.num_prefix_tokens
    to_patches = probs[:, :, 0, prefix:] if model.cls_token is not None else probs[:, :, prefix:, prefix:].mean(2)
    grid = model.patch_embed.grid_size
    maps = to_patches.mean(1).reshape(len(images), 1, *grid)
    maps = F.interpolate(maps, size=images.shape[-2:], mode="bilinear", align_corners=False)[:, 0]
    return _unit_range(maps).cpu().numpy()


class _Logits(nn.Module):
    """The classifier's scores alone: what Grad-CAM differentiates (a Network returns features too)."""

    def __init__(self, net: Network) -> None:
        super().__init__()
        self.net = net

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)[1]


def grad_cam_maps(net: Network, images: torch.Tensor) -> np.ndarray:
    """Grad-CAM (``pytorch-grad-cam``) of each image's predicted class at the CNN's last stage: (N, H, W).

    The last stage is found through timm's ``feature_info``, so any timm CNN works, not just ResNets.
    """
    stage = net.model.get_submodule(net.model.feature_info[-1]["module"])
    with GradCAM(model=_Logits(net).eval(), target_layers=[stage]) as cam:
        maps = cam(input_tensor=images, targets=None)
    return np.clip(np.nan_to_num(maps), 0.0, 1.0)
