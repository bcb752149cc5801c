"""Files in and out: pruned models (JSON + safetensors), training state, ONNX / TorchScript.

Nothing here unpickles: models are rebuilt from their recorded architecture and shapes.
"""

from .model_io import load, save
from .shapes import LAYER_SHAPES, register_layer_shape

__all__ = ["LAYER_SHAPES", "load", "register_layer_shape", "save"]
