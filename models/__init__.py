"""Face-recognition backbones (IResNet, MobileFaceNet, ViT) and their name registry.

Usage: `models.create("r50", embedding_size=512)`, `models.list_models()`.
"""

from models.backbone import Backbone
from models.iresnet import IResNet
from models.mobilefacenet import MobileFaceNet
from models.registry import MODELS, UnknownModelError, create, list_models, model_kwargs
from models.vit import FaceViT

__all__ = [
    "MODELS",
    "Backbone",
    "FaceViT",
    "IResNet",
    "MobileFaceNet",
    "UnknownModelError",
    "create",
    "list_models",
    "model_kwargs",
]
