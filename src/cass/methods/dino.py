"""DINO (Caron et al. 2021), the baseline the CASS paper compares against, with its standard recipe.

A student sees 2 global and N local crops of each image; an EMA copy of it, the teacher, sees only the
2 global crops. The student is trained to match the teacher's centred, sharpened softmax over
``out_dim`` prototypes. Either a ViT or a CNN (``--arch vit|cnn``) is the backbone of both.

Pieces, each usable alone: :class:`DINOHead` (projection head), :class:`DINOLoss` (cross-entropy with
centering), :class:`MultiCropTransform` (views), :func:`ema_update` and :func:`clip_gradients_per_tensor`
(the teacher update and DINO's clipping), and the :class:`DINO` method that wires them into the engine.
"""

from __future__ import annotations

import copy
import dataclasses
import itertools
import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from functools import partial

import torch
import torch.distributed as dist
import torch.nn.functional as F
from timm.models.vision_transformer import VisionTransformer
from torch import nn
from torch.nn.utils.parametrizations import weight_norm
from torch.optim import SGD, AdamW, Optimizer
from torch.optim.lr_scheduler import LambdaLR, LRScheduler
from torchvision.transforms import v2

from cass.config import ConfigError, PretrainConfig
from cass.data.transforms import TO_FLOAT
from cass.methods.base import PretrainMethod, Progress, StepOutput
from cass.methods.registry import register_method
from cass.models.factory import Network, create_network, shape_options
from cass.utils.schedules import cosine, cosine_lambda


class DINOHead(nn.Module):
    """3-layer MLP, L2-normalised bottleneck, then a weight-normalised linear layer onto the prototypes.

    With ``norm_last_layer`` the weight norm ``g`` is fixed to 1, so every prototype is a unit vector
    and the logits are cosines: DINO found this stabilises training (only the directions are learnt).
    ``use_bn`` puts a BatchNorm after each hidden layer (DINO's ``--use_bn_in_head``): it removes the
    component all images share, which dominates the pooled features of a randomly initialised CNN.
    """

    def __init__(
        self,
        in_dim: int,
        out_dim: int = 65536,
        hidden_dim: int = 2048,
        bottleneck_dim: int = 256,
        norm_last_layer: bool = True,
        use_bn: bool = False,
    ) -> None:
        super().__init__()

        def hidden(width_in: int) -> list[nn.Module]:
            return [nn.Linear(width_in, hidden_dim), *([nn.BatchNorm1d(hidden_dim)] if use_bn else []), nn.GELU()]

        self.mlp = nn.Sequential(*hidden(in_dim), *hidden(hidden_dim), nn.Linear(hidden_dim, bottleneck_dim))
        for layer in self.mlp:
            if isinstance(layer, nn.Linear):
                nn.init.trunc_normal_(layer.weight, std=0.02)
                nn.init.zeros_(layer.bias)
        self.last_layer = weight_norm(nn.Linear(bottleneck_dim, out_dim, bias=False))
        norm = self.last_layer.parametrizations.weight.original0
        norm.data.fill_(1.0)
        norm.requires_grad = not norm_last_layer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.last_layer(F.normalize(self.mlp(x), dim=-1))


def linear_warmup(epoch: int, start: float, end: float, warmup_epochs: int) -> float:
    """``start`` at epoch 0 rising linearly to ``end`` at epoch ``warmup_epochs - 1``, then ``end``.

    The same values as DINO's ``np.linspace(start, end, warmup_epochs)`` followed by a constant.
    """
    if epoch >= warmup_epochs:
        return end
    return start + (end - start) * epoch / max(warmup_epochs - 1, 1)


NEAR_CHANCE_MARGIN = 1.0
"""Nats. A DINO loss that ends within this of ln K (the cross-entropy of a uniform teacher and student) after
warm-up is reported as "not learning": the student predicts the teacher's prototypes barely better than a
uniform guess (less than e times). At 0.1 this missed the blood-cell runs that ended 0.21 and 0.48 nats below
ln K while their readouts stayed at their starting point (README, blood-cell results). It judges DINO's own
objective: on a budget of a few hundred steps it also names runs whose k-NN rose a little (the short-budget
check in tests/test_dino.py), which the k-NN curve then shows."""

RISE_MARGIN = 1.0
"""Nats. A DINO loss or teacher entropy that ends more than this above its lowest value of the run has given
back what it learned: the teacher drifting back towards uniform, the failure of short runs (the brain-MRI
search, results/dino_small_budget_search: entropy 3.67 -> 4.81 nats in three epochs, loss 4.16 -> 5.25 for
the ViT). One nat is e times more prototypes in use, far above the epoch-to-epoch noise of these epoch means."""


def entropy_of(probs: torch.Tensor) -> torch.Tensor:
    """Mean over the batch of the entropy (nats) of each row of probabilities: ln K for a uniform row."""
    return -(probs * probs.clamp_min(1e-12).log()).sum(-1).mean()


class DINOLoss(nn.Module):
    """Cross-entropy between the teacher's centred, sharpened softmax and the student's, over crop pairs.

    Every teacher (global) crop is matched to every student crop except the same view; the loss is the
    mean over those pairs. Centering (subtracting an EMA of the teacher's mean output) stops one
    prototype from dominating, sharpening (a low teacher temperature) stops the uniform output: the
    two together are what keeps DINO from collapsing. The centre is a buffer, so it is checkpointed.
    """

    center: torch.Tensor

    def __init__(
        self,
        out_dim: int,
        teacher_temp: Callable[[int], float],
        student_temp: float = 0.1,
        center_momentum: float = 0.9,
    ) -> None:
        """``teacher_temp`` maps the epoch to the teacher temperature (see :func:`linear_warmup`)."""
        super().__init__()
        self.teacher_temp = teacher_temp
        self.student_temp = student_temp
        self.center_momentum = center_momentum
        self.register_buffer("center", torch.zeros(1, out_dim))

    def forward(
        self, student_out: Sequence[torch.Tensor], teacher_out: Sequence[torch.Tensor], epoch: int
    ) -> torch.Tensor:
        """Student crops in the teacher's order first (the global ones); the centre is updated after."""
        return self.loss_and_statistics(student_out, teacher_out, epoch)[0]

    def loss_and_statistics(
        self, student_out: Sequence[torch.Tensor], teacher_out: Sequence[torch.Tensor], epoch: int
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The loss, and what shows whether DINO learns: the teacher's entropy (ln K when its output is
        uniform: nothing to teach) and the mean KL from teacher to student (the part of the loss the
        student can still reduce). Both detached; the centre is updated after."""
        temp = self.teacher_temp(epoch)
        targets = [F.softmax((t.float() - self.center) / temp, dim=-1) for t in teacher_out]
        log_probs = [F.log_softmax(s.float() / self.student_temp, dim=-1) for s in student_out]
        # Summing over all student crops and removing the same view gives every pair in one pass per target.
        all_log_probs = torch.stack(log_probs).sum(0)
        total = sum(-(q * (all_log_probs - log_probs[i])).sum(-1).mean() for i, q in enumerate(targets))
        pairs = len(targets) * len(log_probs) - len(targets)
        loss = total / pairs
        with torch.no_grad():
            entropy = torch.stack([entropy_of(q) for q in targets]).mean()
            # Every teacher crop meets the same number of student crops, so mean CE - mean H(q) = mean KL.
            stats = {"teacher_entropy": entropy, "teacher_student_kl": loss.detach() - entropy}
        self.update_center(torch.cat(list(teacher_out)))
        return loss, stats

    @torch.no_grad()
    def update_center(self, teacher_out: torch.Tensor) -> None:
        """EMA of the teacher's batch mean, over all processes so every replica keeps the same centre."""
        batch_sum = teacher_out.float().sum(0, keepdim=True)
        count = teacher_out.shape[0]
        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(batch_sum)
            count *= dist.get_world_size()
        self.center.mul_(self.center_momentum).add_(batch_sum / count, alpha=1 - self.center_momentum)


def local_crop_size(img_size: int, fraction: float, multiple: int = 1) -> int:
    """Local crops are ``fraction`` of the global size (96 px at 224), in whole ``multiple``s.

    ``multiple`` is the ViT's patch size: timm ViTs take any input size only in whole patches. The floor
    of one patch and 8 px keeps tiny images usable.
    """
    return max(8, multiple * max(1, round(img_size * fraction / multiple)))


class MultiCropTransform:
    """PIL image -> [2 global crops at ``img_size``, ``n_local`` crops at ``local_size``], floats in [0, 1].

    DINO's augmentations (flip, colour jitter p=0.8, grayscale p=0.2, Gaussian blur p=1.0 / 0.1 on the
    two global crops and 0.5 on the locals, solarisation p=0.2 on the second global crop). Images are
    not normalised: each :class:`~cass.models.factory.Network` normalises its own input.
    """

    def __init__(
        self,
        img_size: int,
        n_local: int,
        global_scale: tuple[float, float] = (0.4, 1.0),
        local_scale: tuple[float, float] = (0.05, 0.4),
        local_size: int = 96,
    ) -> None:
        self.n_local = n_local
        self.global1 = _crop_pipeline(img_size, global_scale, blur_p=1.0)
        self.global2 = _crop_pipeline(img_size, global_scale, blur_p=0.1, solarize_p=0.2)
        self.local = _crop_pipeline(local_size, local_scale, blur_p=0.5)

    def __call__(self, image: object) -> list[torch.Tensor]:
        return [self.global1(image), self.global2(image), *(self.local(image) for _ in range(self.n_local))]


def _crop_pipeline(size: int, scale: tuple[float, float], blur_p: float, solarize_p: float = 0.0) -> v2.Compose:
    # Blur sigma 0.1-2 px as DINO's PIL radius; the kernel covers +-3 sigma of the widest blur.
    return v2.Compose(
        [
            v2.RandomResizedCrop(size, scale=scale, interpolation=v2.InterpolationMode.BICUBIC, antialias=True),
            v2.RandomHorizontalFlip(p=0.5),
            v2.RandomApply([v2.ColorJitter(brightness=0.4, contrast=0.4, saturation=0.2, hue=0.1)], p=0.8),
            v2.RandomGrayscale(p=0.2),
            v2.RandomApply([v2.GaussianBlur(kernel_size=13, sigma=(0.1, 2.0))], p=blur_p),
            v2.RandomSolarize(threshold=128, p=solarize_p),
            *TO_FLOAT,
        ]
    )


@torch.no_grad()
def ema_update(teacher: Iterable[torch.Tensor], student: Iterable[torch.Tensor], momentum: float) -> None:
    """``teacher = momentum * teacher + (1 - momentum) * student``, in place, one fused op per step."""
    teacher, student = list(teacher), list(student)
    torch._foreach_mul_(teacher, momentum)
    torch._foreach_add_(teacher, student, alpha=1 - momentum)


@torch.no_grad()
def clip_gradients_per_tensor(parameters: Iterable[torch.Tensor], max_norm: float) -> None:
    """DINO's clipping: each parameter's gradient is scaled to norm ``max_norm`` at most, on its own.

    Unlike ``clip_grad_norm_`` (one global norm), a huge gradient in one layer does not shrink the rest.
    """
    grads = [p.grad for p in parameters if p.grad is not None]
    if grads:
        norms = torch.stack(torch._foreach_norm(grads))
        torch._foreach_mul_(grads, list((max_norm / (norms + 1e-6)).clamp(max=1.0).unbind()))


class MultiCropEncoder(nn.Module):
    """Backbone + DINO head over a list of crops; consecutive crops of one size share one backbone pass."""

    def __init__(self, backbone: Network, head: DINOHead) -> None:
        super().__init__()
        self.backbone = backbone
        self.head = head

    def forward(self, crops: Sequence[torch.Tensor]) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """(pooled features of all crops, concatenated in crop order; head outputs, one per crop)."""
        same_size = itertools.groupby(crops, key=lambda crop: crop.shape[-2:])
        features = torch.cat([self.backbone.features(torch.cat(list(group))) for _, group in same_size])
        return features, list(self.head(features).chunk(len(crops)))


def _require_vision_transformer(network: Network) -> None:
    """DINO feeds crops of two sizes: only a timm ViT built with ``dynamic_img_size`` takes both."""
    if not isinstance(network.model, VisionTransformer):
        raise ConfigError(
            f"--vit {network.name}: DINO feeds crops of two sizes, which needs a timm VisionTransformer "
            f"(vit_*, deit_*); {type(network.model).__name__} takes only one input size"
        )


def _patch_size(network: Network) -> int:
    """The ViT's patch size; 1 for CNNs, which take any input size."""
    patch_embed = getattr(network.model, "patch_embed", None)
    return int(patch_embed.patch_size[0]) if patch_embed is not None else 1


@dataclass(frozen=True)
class StudentRecipe:
    """The optimiser and crop settings DINO's authors published for one kind of student."""

    optimizer: str
    base_lr: float
    weight_decay: float
    weight_decay_end: float
    global_crop_scale: tuple[float, float]
    local_crop_scale: tuple[float, float]


RECIPES = {
    # ViT-S/16 (main_dino.py defaults).
    "vit": StudentRecipe("adamw", 5e-4, 0.04, 0.4, (0.4, 1.0), (0.05, 0.4)),
    # ResNet-50 (the official repository's ResNet command): SGD, fixed small weight decay, wider crop scales.
    "cnn": StudentRecipe("sgd", 0.03, 1e-4, 1e-4, (0.14, 1.0), (0.05, 0.14)),
}
"""Defaults of every ``dino`` option left at None, by student (``cfg.arch``)."""

OPTIMIZERS = ("adamw", "sgd")

SHORT_BUDGET = {
    "out_dim": 1024, "n_local_crops": 2, "local_crop_fraction": 0.5, "teacher_temp": 0.02,
    "warmup_teacher_temp": 0.02, "momentum_teacher": 0.99, "freeze_last_layer_epochs": 0, "warmup_epochs": 1,
    "use_bn_in_head": True,
}
"""``dino`` options under which DINO learns in a few hundred steps on a small medical set (the search in
BENCHMARKS.md, "DINO at CPU scale"; ``configs/pretrain/dino_cnn_short.yaml`` explains each): a sharp teacher
kept sharp, BatchNorm in the head, a teacher and head that move within the run, and a CPU-sized head."""
SHORT_BUDGET_BASE_LR = {"cnn": 0.24, "vit": 0.008}
"""``dino.base_lr`` of each student on a short budget: lr 0.03 (SGD) and 1e-3 (AdamW) at batch 32."""


def recipe(cfg: PretrainConfig) -> StudentRecipe:
    """The run's optimiser and crop settings: each ``dino`` option given, else the student's recipe."""
    base = RECIPES[cfg.arch]
    given = {f.name: getattr(cfg.dino, f.name) for f in dataclasses.fields(StudentRecipe)}
    return dataclasses.replace(base, **{name: value for name, value in given.items() if value is not None})


def peak_lr(cfg: PretrainConfig) -> float:
    """DINO's linear scaling rule: ``base_lr`` is the rate for 256 images, scaled by the global batch."""
    return recipe(cfg).base_lr * cfg.batch_size / 256


def source_size(cfg: PretrainConfig, img_size: int) -> int:
    """Side of the cached square the crops are cut from: ``dino.source_size``, else twice the training
    size, at most 224 px and never below the training size."""
    return cfg.dino.source_size or max(img_size, min(2 * img_size, 224))


def teacher_temperature(cfg: PretrainConfig) -> Callable[[int], float]:
    """The teacher temperature of each epoch (counted from 0). DINO warms it up over 30 epochs; a shorter run
    completes the warm-up in its last epoch."""
    d = cfg.dino
    warmup = min(d.warmup_teacher_temp_epochs, cfg.epochs)
    return partial(linear_warmup, start=d.warmup_teacher_temp, end=d.teacher_temp, warmup_epochs=warmup)


def _final_temperature_epoch(cfg: PretrainConfig) -> int:
    """The first epoch (counted from 1, as ``metrics.csv`` counts) trained at the final teacher temperature."""
    temperature = teacher_temperature(cfg)
    return next((epoch for epoch in range(1, cfg.epochs + 1)
                 if math.isclose(temperature(epoch - 1), cfg.dino.teacher_temp)), cfg.epochs + 1)


def _sharper_teacher(cfg: PretrainConfig) -> str:
    """What to try first when DINO does not learn."""
    return (f"a sharper teacher (--dino-teacher-temp and --dino-warmup-teacher-temp {cfg.dino.teacher_temp / 2:g}) "
            "and --dino-use-bn-in-head keep it off the uniform state on short runs (BENCHMARKS.md, "
            "'DINO at CPU scale')")


@register_method("dino")
class DINO(PretrainMethod):
    """DINO with a ViT or CNN student (``cfg.arch``) and an EMA teacher of the same architecture.

    ``networks()`` exports the **teacher** backbone: DINO evaluates the teacher, which is an ensemble
    of past students and better than the student throughout training. Everything a resumed run needs
    is in ``state_dict()`` (student, teacher, the loss's centre) or follows from the step, so
    :meth:`extra_state` stays empty.
    """

    display_name = "DINO"
    objective = "DINO loss: teacher-student cross-entropy"
    trains_both_networks = False
    supports_swa = False  # the exported teacher is already an average of past students
    config_section = "dino"

    def __init__(self, cfg: PretrainConfig) -> None:
        super().__init__(cfg)
        d = cfg.dino
        self.views_per_image = 2 + d.n_local_crops
        weights = cfg.vit_weights if cfg.arch == "vit" else cfg.cnn_weights
        backbone = create_network(
            getattr(cfg, cfg.arch), init=cfg.init, weights=weights, num_outputs=0, img_size=cfg.img_size,
            role=cfg.arch, dynamic_img_size=cfg.arch == "vit",
            **shape_options(cfg.arch, cfg.cnn_stem, cfg.vit_patch_size),
        )
        if cfg.arch == "vit":
            _require_vision_transformer(backbone)
        head = DINOHead(backbone.num_features, d.out_dim, d.hidden_dim, d.bottleneck_dim, d.norm_last_layer,
                        d.use_bn_in_head)
        self.student = MultiCropEncoder(backbone, head)
        self.teacher = copy.deepcopy(self.student).requires_grad_(False)
        self.loss = DINOLoss(d.out_dim, teacher_temperature(cfg), d.student_temp, d.center_momentum)
        self._optimizer: Optimizer | None = None

    def networks(self) -> dict[str, Network]:
        return {self.cfg.arch: self.teacher.backbone}

    @classmethod
    def check_config(cls, cfg: PretrainConfig) -> None:
        super().check_config(cfg)
        if cfg.dino.optimizer is not None and cfg.dino.optimizer not in OPTIMIZERS:
            raise ConfigError(f"--dino-optimizer must be one of {', '.join(OPTIMIZERS)}, got {cfg.dino.optimizer!r}")
        if cfg.img_size and cfg.dino.source_size and cfg.dino.source_size < cfg.img_size:
            raise ConfigError(f"--dino-source-size {cfg.dino.source_size} is below --img-size {cfg.img_size}: crops "
                              "would be upsampled")

    @property
    def source_size(self) -> int:
        return source_size(self.cfg, self.img_size)

    def train_transform(self) -> MultiCropTransform:
        d, r = self.cfg.dino, recipe(self.cfg)
        local_size = local_crop_size(self.img_size, d.local_crop_fraction, _patch_size(self.student.backbone))
        return MultiCropTransform(self.img_size, d.n_local_crops, r.global_crop_scale, r.local_crop_scale, local_size)

    def forward(self, images: list[torch.Tensor], progress: Progress) -> StepOutput:
        """``images``: one batch per crop, the 2 global crops first (what the transform's lists collate to).

        Diagnostics get the student's view of the first global crop: its prototype logits (constant
        over the batch when DINO collapses) and its pooled backbone features.
        """
        features, student_out = self.student(images)
        with torch.no_grad():
            _, teacher_out = self.teacher(images[:2])
        batch = images[0].shape[0]
        loss, stats = self.loss.loss_and_statistics(student_out, teacher_out, progress.epoch)
        return StepOutput(
            loss=loss,
            outputs={self.cfg.arch: student_out[0].detach()},
            features={self.cfg.arch: features[:batch].detach()},
            stats=stats,
        )

    @classmethod
    def learning_warnings(cls, history: list[dict[str, float]], cfg: PretrainConfig) -> list[str]:
        """The backbone checks, and DINO's own failure, read over the whole run once the warm-ups are over
        (``output_std`` cannot see it: a uniform softmax is not a constant direction):

        * the loss ends within :data:`NEAR_CHANCE_MARGIN` of ln K, the loss of a uniform teacher (a teacher
          entropy that close to ln K is covered too: the entropy is at most the loss);
        * the loss or the teacher's entropy ends more than :data:`RISE_MARGIN` above its lowest value at the
          final teacher temperature (a temperature still warming up raises the entropy by design).
        """
        warnings = super().learning_warnings(history, cfg)
        rows = [row for row in history if row.get("epoch", 0) >= 1 and "loss" in row]
        if not rows or rows[-1]["epoch"] <= min(cfg.dino.warmup_epochs, cfg.dino.warmup_teacher_temp_epochs,
                                                cfg.epochs // 2):
            return warnings
        chance = math.log(cfg.dino.out_dim)
        gap = chance - rows[-1]["loss"]
        if gap < NEAR_CHANCE_MARGIN:
            warnings.append(f"DINO is not learning: loss {rows[-1]['loss']:.3f} ended within {gap:.3f} of ln K = "
                            f"{chance:.3f} (K = {cfg.dino.out_dim} prototypes; the loss of a uniform teacher) after "
                            f"warm-up; {_sharper_teacher(cfg)}")
        settled = [row for row in rows if row["epoch"] >= _final_temperature_epoch(cfg)]
        for key, name in (("loss", "loss"), ("teacher_entropy", "teacher entropy")):
            values = [(row[key], int(row["epoch"])) for row in settled if key in row]
            if not values:
                continue
            lowest, at = min(values)
            if values[-1][0] - lowest > RISE_MARGIN:
                warnings.append(f"DINO is not learning: its {name} ended at {values[-1][0]:.3f}, "
                                f"{values[-1][0] - lowest:.2f} nats above its lowest ({lowest:.3f}, epoch {at}), "
                                f"back towards ln K = {chance:.3f}; {_sharper_teacher(cfg)}")
        return warnings

    def configure_optimizers(self, total_steps: int) -> tuple[list[Optimizer], list[LRScheduler]]:
        """AdamW or SGD (the student's recipe; no weight decay on biases and norms), linear warm-up then
        cosine to ``min_lr``, per step.

        The warm-up is ``warmup_epochs`` long but at most half the run, so a short run still decays.
        """
        d, r = self.cfg.dino, recipe(self.cfg)
        trainable = [p for p in self.student.parameters() if p.requires_grad]
        groups = [
            {"params": [p for p in trainable if p.ndim > 1], "weight_decay": r.weight_decay},
            {"params": [p for p in trainable if p.ndim <= 1], "weight_decay": 0.0},
        ]
        lr = peak_lr(self.cfg)
        if r.optimizer == "sgd":
            self._optimizer = SGD(groups, lr=lr, momentum=0.9)
        else:
            self._optimizer = AdamW(groups, lr=lr, fused=True)  # fused kernels on CPU and GPU
        warmup_steps = min(d.warmup_epochs * total_steps // self.cfg.epochs, total_steps // 2)
        schedule = cosine_lambda(total_steps, lr, self.cfg.min_lr, warmup_steps)
        return [self._optimizer], [LambdaLR(self._optimizer, schedule)]

    def before_optimizer_step(self, progress: Progress) -> None:
        """Weight decay on its cosine schedule, per-tensor gradient clipping, last layer frozen early on.

        Freezing sets the last layer's gradients to None (not zero) so AdamW skips it entirely, weight
        decay included, as DINO does.
        """
        if self._optimizer is None:
            raise RuntimeError("DINO.configure_optimizers must be called before training steps")
        d, r = self.cfg.dino, recipe(self.cfg)
        self._optimizer.param_groups[0]["weight_decay"] = cosine(
            progress.step, progress.total_steps, r.weight_decay, r.weight_decay_end
        )
        if d.clip_grad > 0:
            clip_gradients_per_tensor(self.student.parameters(), d.clip_grad)
        if progress.epoch < d.freeze_last_layer_epochs:
            for param in self.student.head.last_layer.parameters():
                param.grad = None

    def after_optimizer_step(self, progress: Progress) -> None:
        """Teacher EMA with momentum rising on a cosine from ``momentum_teacher`` to 1 over the run."""
        momentum = cosine(progress.step, progress.total_steps, self.cfg.dino.momentum_teacher, 1.0)
        ema_update(self.teacher.parameters(), self.student.parameters(), momentum)
