"""segserve export: a checkpoint in, a verified ONNX model bundle out (see docs/export.md)."""

from export.bundle_writer import ExportError, ExportReport, export_bundle

__all__ = ["ExportError", "ExportReport", "export_bundle"]
