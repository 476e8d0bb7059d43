"""Evaluation and downstream use: kNN, linear probe, classification fine-tuning, detection transfer.

- ``backbone``: ``load_backbone`` loads a run folder, a local timm export, an ``hf-hub:`` or ``timm:`` id;
  ``backbone_data_config`` gives its preprocessing.
- ``knn``: ``extract_features`` runs a backbone over ``(images, ids, labels)`` batches (batched, no grad,
  optional autocast/channels_last) and, over several ``accelerate`` processes, gathers the results **by
  id**; ``knn_predict`` / ``knn_accuracy`` / ``knn_evaluate``: the weighted kNN of the InstDisc/SimCLR
  monitors (cosine similarity, k = 200, weights ``exp(sim / T)``, T = 0.1). The training monitor and
  ``hub-ccrop eval knn`` call the same functions.
- ``linear``: the paper's protocol (frozen backbone in eval mode, 100 epochs, SGD momentum 0.9, x0.1 at
  epochs 60 and 80, wd 0, augmented training images; lr 10 / batch 512 on small datasets, the MoCo
  ImageNet protocol lr 30 / batch 256 on ImageNet-like data: ``linear_protocol``). It reports the **last**
  epoch; the best epoch is reported too, labelled as such. ``linear_probe_on_features`` is a fast check
  on cached, un-augmented features: a different protocol, labelled differently.
- ``finetune``: trains a new head (and all or part of the backbone) for classification.
- ``transforms``: the classification transforms and labeled rows of the evaluation commands.
- ``detection``: torchvision Faster R-CNN + FPN on a timm backbone (frozen BN, frozen stages), Hub-format
  detection rows, ``finetune_detection`` and COCO-style ``evaluate_detection`` (gathered by image id).
- ``detectron2``: ``to_detectron2`` / ``from_detectron2`` / ``export_detectron2``, MoCo's key renaming.

The commands (``hub-ccrop eval``, ``finetune``, ``finetune-detection``, ``export-detectron2``) live in
``hub_ccrop.commands``. Accuracies are percentages (0-100).
"""

from hub_ccrop.distributed import default_autocast_dtype, gather_by_id
from hub_ccrop.evaluate.backbone import backbone_data_config, load_backbone
from hub_ccrop.evaluate.detection import (
    DetectionDataset,
    TimmFPNBackbone,
    build_faster_rcnn,
    detection_collate,
    evaluate_detection,
    finetune_detection,
    freeze_stages,
)
from hub_ccrop.evaluate.detectron2 import export_detectron2, from_detectron2, to_detectron2
from hub_ccrop.evaluate.finetune import finetune, freeze_except
from hub_ccrop.evaluate.knn import extract_features, knn_accuracy, knn_evaluate, knn_predict, topk_accuracy
from hub_ccrop.evaluate.linear import (
    IMAGENET_LINEAR,
    SMALL_LINEAR,
    LinearProtocol,
    linear_probe,
    linear_probe_on_features,
    linear_protocol,
)
from hub_ccrop.evaluate.transforms import classification_transform

__all__ = [
    "IMAGENET_LINEAR",
    "SMALL_LINEAR",
    "DetectionDataset",
    "LinearProtocol",
    "TimmFPNBackbone",
    "backbone_data_config",
    "build_faster_rcnn",
    "classification_transform",
    "default_autocast_dtype",
    "detection_collate",
    "evaluate_detection",
    "export_detectron2",
    "extract_features",
    "finetune",
    "finetune_detection",
    "freeze_except",
    "freeze_stages",
    "from_detectron2",
    "gather_by_id",
    "knn_accuracy",
    "knn_evaluate",
    "knn_predict",
    "linear_probe",
    "linear_probe_on_features",
    "linear_protocol",
    "load_backbone",
    "to_detectron2",
    "topk_accuracy",
]
