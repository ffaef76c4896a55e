"""Learning checks on what the user gets (SPEC §2): the exported backbones, measured on fixed images.

The loss and the head or projector outputs describe the training objective, which a method can meet
while its backbone learns nothing useful: cass-vicreg's variance term is met through its projector's
BatchNorm even while the backbone's features shrink onto a few directions. So these checks read the
backbones' pooled features (:meth:`~cass.models.factory.Network.features`) in eval mode, without
augmentation, on images chosen once per run, so that two epochs differ only by the weights:

* a fixed sample of train images (stratified by class when labelled) gives ``{role}_backbone_std`` and
  ``{role}_backbone_rank`` (:func:`~cass.evaluation.diagnostics.output_std` and
  :func:`~cass.evaluation.diagnostics.effective_rank` of those features);
* with labels, the same images are the bank of a cosine k-NN scored on a fixed sample of the selection
  split: ``{role}_knn_f1``, its macro-F1. Pretraining still never trains on labels or on selection
  images: frozen copies of the networks only read them between epochs.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from sklearn.metrics import f1_score
from sklearn.neighbors import KNeighborsClassifier
from torchvision.transforms import v2

from cass.data.dataset import ImageSet
from cass.data.subsets import label_fraction_indices
from cass.evaluation.diagnostics import BACKBONE_RANK, BACKBONE_STD, KNN_F1, effective_rank, output_std
from cass.models.factory import Network

KNN_K = 20
"""Neighbours of the online k-NN (capped by the bank size): the usual k of k-NN readouts (DINO's is 20)."""

SELECTION_IMAGES = 1000
"""Selection images scored at most: enough for a macro-F1 within a few points of the whole split's, at a
second or two of forward passes per epoch on a GPU."""


def sample_indices(images: ImageSet, count: int, seed: int) -> np.ndarray:
    """Sorted indices of about ``count`` images (all when fewer), fixed by ``seed``; stratified by class
    when labelled, every class kept, so a small bank still holds every class."""
    if count >= len(images):
        return np.arange(len(images))
    if images.targets is None:
        return np.sort(np.random.default_rng(seed).permutation(len(images))[:count])
    return label_fraction_indices(images.targets, count / len(images), seed)


@dataclass
class FixedImages:
    """Images decoded once at the checks' size (uint8, N x 3 x S x S: 12 KiB each at 64 px) and their labels
    (class indices, or 0/1 rows for multi-label data; None when unlabelled)."""

    pixels: torch.Tensor
    targets: np.ndarray | None
    num_classes: int

    @classmethod
    def sample(cls, images: ImageSet, count: int, img_size: int, seed: int, skip_bad: bool) -> FixedImages:
        """About ``count`` images of ``images`` (:func:`sample_indices`), resized as evaluation resizes them."""
        chosen = images.subset(sample_indices(images, count, seed)).check(skip_bad=skip_bad)
        resize = v2.Compose([v2.Resize((img_size, img_size), antialias=True), v2.ToImage()])
        pixels = torch.stack([resize(chosen.load(i)) for i in range(len(chosen))])
        targets = None if chosen.targets is None else chosen.targets.astype(np.int64)
        return cls(pixels, targets, len(chosen.classes))


class OnlineChecks:
    """The fixed images of one run, and the backbone measurements taken on them."""

    def __init__(self, bank: FixedImages, selection: FixedImages | None, batch_size: int) -> None:
        """``bank``: train images (labelled for the k-NN); ``selection``: what the k-NN is scored on, or None."""
        self.bank = bank
        self.selection = selection
        self.batch_size = batch_size

    @classmethod
    def sample(cls, train: ImageSet, selection: ImageSet | None, samples: int, img_size: int, seed: int,
               batch_size: int, skip_bad: bool = False) -> OnlineChecks:
        """``samples`` train images at most; the k-NN only when both splits are labelled."""
        bank = FixedImages.sample(train, samples, img_size, seed, skip_bad)
        scored = None
        if bank.targets is not None and selection is not None and selection.targets is not None:
            scored = FixedImages.sample(selection, SELECTION_IMAGES, img_size, seed, skip_bad)
        return cls(bank, scored, batch_size)

    @torch.no_grad()
    def measure(self, networks: dict[str, Network], device: torch.device, knn: bool) -> dict[str, float]:
        """``{role}_backbone_std``, ``{role}_backbone_rank`` and, with ``knn`` (and labels), ``{role}_knn_f1``."""
        row: dict[str, float] = {}
        for role, net in networks.items():
            bank = self.features(net, self.bank.pixels, device)
            row[f"{role}_{BACKBONE_STD}"] = output_std(bank)
            row[f"{role}_{BACKBONE_RANK}"] = effective_rank(bank)
            if knn and self.selection is not None:
                queries = self.features(net, self.selection.pixels, device)
                row[f"{role}_{KNN_F1}"] = knn_macro_f1(bank, self.bank, queries, self.selection)
        return row

    def features(self, net: Network, pixels: torch.Tensor, device: torch.device) -> torch.Tensor:
        """Pooled features of ``pixels`` in eval mode (BatchNorm's running statistics, no dropout); the
        network's mode is restored after."""
        training = net.training
        net.eval()
        try:
            chunks = [net.features(batch.to(device).float().div(255)).float().cpu()
                      for batch in pixels.split(self.batch_size)]
        finally:
            net.train(training)
        return torch.cat(chunks)


def knn_macro_f1(bank_features: torch.Tensor, bank: FixedImages, query_features: torch.Tensor,
                 queries: FixedImages) -> float:
    """Macro-F1 over every class of a distance-weighted cosine k-NN (``KNN_K`` neighbours, at most the bank)
    on the bank's features and labels, predicting the queries; multi-label rows predict every label."""
    knn = KNeighborsClassifier(n_neighbors=min(KNN_K, len(bank_features)), metric="cosine", weights="distance")
    predicted = knn.fit(bank_features.numpy(), bank.targets).predict(query_features.numpy())
    return float(f1_score(queries.targets, predicted, average="macro", labels=np.arange(queries.num_classes),
                          zero_division=0))
