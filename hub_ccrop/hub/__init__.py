"""Export, publish and load: timm weights, box tables and model cards on the Hugging Face Hub.

``export_run(RUN, OUT)`` turns a training run folder into a folder that is a valid timm Hub repo
(``model.safetensors`` + ``config.json`` written by timm's ``save_for_hf``) plus the box table, the recipe,
the metrics, a picture and a model card. ``publish_run`` creates the Hub repo and uploads that folder.
Users load the backbone with ``timm.create_model("hf-hub:ORG/NAME", pretrained=True)`` and the boxes with
``load_boxes("ORG/NAME")``.

- :mod:`~hub_ccrop.hub.export`: the export folder; :mod:`~hub_ccrop.hub.card`: its model card;
  :mod:`~hub_ccrop.hub.publish`: the upload; :mod:`~hub_ccrop.hub.load`: box tables back;
  :mod:`~hub_ccrop.hub.paper`: the paper's citation and numbers.

The ``hub-ccrop export`` / ``publish`` commands live in :mod:`hub_ccrop.commands.hub`.
"""

from hub_ccrop.boxes import BoxTableMismatch
from hub_ccrop.hub.card import build_model_card
from hub_ccrop.hub.export import EXPORT_FILES, export_run
from hub_ccrop.hub.load import load_boxes
from hub_ccrop.hub.paper import PAPER_ARXIV_ID, PAPER_CITATION, PAPER_LINEAR_TOP1, paper_reference
from hub_ccrop.hub.publish import PublishError, PublishResult, export_boxes_dataset, publish_run

__all__ = [
    "EXPORT_FILES",
    "BoxTableMismatch",
    "PAPER_ARXIV_ID",
    "PAPER_CITATION",
    "PAPER_LINEAR_TOP1",
    "PublishError",
    "PublishResult",
    "build_model_card",
    "export_boxes_dataset",
    "export_run",
    "load_boxes",
    "paper_reference",
    "publish_run",
]
