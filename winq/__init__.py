"""winq: WinQ quantization-aware training for Hugging Face causal LMs.

The core (this package) knows grids, fake-quant layers, training, data, checkpoints and
evaluation. It imports no exporter, runtime or optional heavy dependency (triton,
onnxruntime, llama_cpp, gptqmodel).
"""

from .config import QuantConfig, TrainConfig
from .errors import CheckpointError, ConfigError, DataError, ModelError, WinqError
from .grids import GRID_BITS, GRIDS, GridSpec
from .prepare import convert, prepare, quant_layers, quantized_weights
from .qlinear import QuantLinear
from .qweight import QuantizedWeight

__version__ = "0.1.0"

__all__ = [
    "QuantConfig", "TrainConfig", "WinqError", "ConfigError", "CheckpointError", "DataError", "ModelError",
    "GRIDS", "GRID_BITS", "GridSpec", "QuantLinear", "QuantizedWeight",
    "prepare", "convert", "quantized_weights", "quant_layers",
]
