"""Model -> ONNX -> Relax IRModule."""

from .hf import CacheExport, ModelSource, export_onnx, export_onnx_with_cache, load_hf_model, resolve_model
from .load import import_model, is_onnx
from .onnx_import import ImportedModel, ONNXImportError, import_onnx, load_onnx, merge_functions

__all__ = [
    "CacheExport",
    "ImportedModel",
    "ModelSource",
    "ONNXImportError",
    "export_onnx",
    "export_onnx_with_cache",
    "import_model",
    "import_onnx",
    "is_onnx",
    "load_hf_model",
    "load_onnx",
    "merge_functions",
    "resolve_model",
]
