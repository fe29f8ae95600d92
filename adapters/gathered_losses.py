"""Losses over the global batch under torchrun: sentence-transformers' in-batch losses that have no
``gather_across_devices`` of their own, made to gather every rank's embeddings (with their gradients).

Under DDP each rank computes the loss of its slice of the batch and the gradients are averaged. A loss of each
example alone (MarginMSE, BCE, cosine regression) needs nothing of the other ranks. A loss over the batch (CoSENT
and AnglE rank every pair of the batch against every other; contrastive tension in-batch takes the batch as
negatives) must see the whole global batch, or N processes train another model than one process does. These
classes gather the embeddings in rank order (the global batch's order) and compute the one-process loss; with
``torch.distributed.nn.all_gather``'s backward, the ranks' averaged gradients are the one-process gradients. They
have the parameters of the losses they extend, so checkpoints do not depend on the device count; in one process
they are those losses.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from sentence_transformers.sentence_transformer.losses import (
    AnglELoss,
    ContrastiveTensionLossInBatchNegatives,
    CoSENTLoss,
)
from sentence_transformers.util.distributed import all_gather, all_gather_with_grad

from gplflow.adapters import distributed


class _GatheredPairScores:
    """CoSENT-style losses (a score per pair, ranked against every other pair of the batch) over the global batch:
    every rank computes the same global loss from the gathered embeddings and labels."""

    def compute_loss_from_embeddings(self, embeddings: list[torch.Tensor], labels: torch.Tensor) -> torch.Tensor:
        if distributed.world_size() > 1:
            embeddings = [all_gather_with_grad(e) for e in embeddings]
            labels = all_gather(labels)
        return super().compute_loss_from_embeddings(embeddings, labels)  # type: ignore[misc]


class GatheredCoSENTLoss(_GatheredPairScores, CoSENTLoss):
    """CoSENT over the global batch."""


class GatheredAnglELoss(_GatheredPairScores, AnglELoss):
    """AnglE over the global batch."""


class GatheredInBatchTension(ContrastiveTensionLossInBatchNegatives):
    """``ct_inbatch``'s loss over the global batch: each rank scores its sentences' two views against every rank's,
    in both directions, so the ranks' mean is the loss one process computes."""

    def forward(self, sentence_features: Iterable[dict[str, torch.Tensor]], labels: Any) -> torch.Tensor:
        if distributed.world_size() == 1:
            return super().forward(sentence_features, labels)
        features = next(iter(sentence_features))
        a = self.model1(features)["sentence_embedding"]
        b = self.model2(features)["sentence_embedding"]
        scale = self.logit_scale.exp()
        mine = torch.arange(len(a), device=a.device) + distributed.rank() * len(a)  # this rank's rows of the batch
        rows = self.similarity_fct(a, all_gather_with_grad(b)) * scale  # scores[mine, :]
        columns = self.similarity_fct(b, all_gather_with_grad(a)) * scale  # scores[:, mine].T (cosine is symmetric)
        return (self.cross_entropy_loss(rows, mine) + self.cross_entropy_loss(columns, mine)) / 2
