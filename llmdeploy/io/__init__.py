"""Loading, saving and the model zoo: the top of the library (it rebuilds compressed modules
from their registry and reads checkpoints of the methods below it, which register themselves)."""

from ..compress.base import set_model_loader
from .checkpoint import load_saved, read_manifest, save
from .compressed_tensors import save_compressed_tensors
from .loading import load, load_gguf
from .onnx_export import OnnxExportReport, export_onnx
from .stream import compress_streaming, fits_in_memory, skeleton
from .zoo import ZOO

set_model_loader(lambda name: load(name)[0])

__all__ = ["ZOO", "OnnxExportReport", "export_onnx", "load", "load_gguf", "load_saved", "read_manifest", "save", "save_compressed_tensors",
           "compress_streaming", "fits_in_memory", "skeleton"]
