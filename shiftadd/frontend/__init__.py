"""Model -> ONNX -> Relax IRModule."""

from .hf import ModelSource, export_onnx, load_hf_model, resolve_model
from .onnx_import import ImportedModel, ONNXImportError, import_onnx, load_onnx

__all__ = ["ImportedModel", "ModelSource", "ONNXImportError", "export_onnx", "import_onnx", "load_hf_model",
           "load_onnx", "resolve_model"]
