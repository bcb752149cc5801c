"""The model zoo: registered CIFAR / Fashion-MNIST CNNs, external models and checkpoint loading.

Importing this package registers every family below; adding a family is one new module with
``@register_model`` factories plus its import here.
"""

from . import mobilenetv2, mobilevit, resnet_cifar, smallcnn, vgg  # noqa: F401  (registers)
from ._factory import create_model
from ._registry import MODELS, ModelInfo, Preprocessing, list_models, model_info, register_model
from ._weights import check_state_dict, load_weights

__all__ = [
    "MODELS",
    "ModelInfo",
    "Preprocessing",
    "check_state_dict",
    "create_model",
    "list_models",
    "load_weights",
    "model_info",
    "register_model",
]
