"""Model-parallel Partial FC head: margins, distributed softmax CE, sparse optimizer, checkpoints.

Public interface used by the trainer::

    margin = CombinedMarginLoss(s=64.0, m1=1.0, m2=0.5, m3=0.0)  # or build_margin("adaface")
    head = PartialFC(embedding_size, num_classes, sample_rate, margin, process_group=None)
    loss, stats = head(local_embeddings, local_labels)
    head_opt = build_head_optimizer(head, name="sgd", lr=0.1)
    save_head(directory, head, head_opt); load_head(directory, head, head_opt)
"""

from heads.centers import init_centers
from heads.checkpoint import SavedCenters, centers_of, load_head, open_centers, save_head
from heads.comm import Topology, resolve_group, shard_range
from heads.cosine_kernel import LOGITS_DTYPES, resolve_logits_dtype
from heads.dist_softmax import margin_softmax_cross_entropy
from heads.margins import LOSSES, CombinedMarginLoss, Margin, build_margin
from heads.optim import OPTIMIZERS, HeadOptimizer, build_head_optimizer
from heads.partial_fc import PartialFC
from heads.sampling import sample_classes

__all__ = [
    "CombinedMarginLoss",
    "Margin",
    "LOSSES",
    "build_margin",
    "PartialFC",
    "HeadOptimizer",
    "OPTIMIZERS",
    "build_head_optimizer",
    "save_head",
    "load_head",
    "open_centers",
    "centers_of",
    "SavedCenters",
    "margin_softmax_cross_entropy",
    "sample_classes",
    "resolve_logits_dtype",
    "LOGITS_DTYPES",
    "init_centers",
    "shard_range",
    "resolve_group",
    "Topology",
]
