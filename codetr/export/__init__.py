"""ONNX export of the inference graph, and running the exported model with onnxruntime."""

from codetr.export.onnx import DEFAULT_OPSET, ExportWrapper, export_onnx
from codetr.export.runtime import OnnxDetector

__all__ = ["DEFAULT_OPSET", "ExportWrapper", "OnnxDetector", "export_onnx"]
