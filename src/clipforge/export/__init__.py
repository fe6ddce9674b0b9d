"""ONNX export, int8 quantisation, and the onnxruntime model an export folder loads as.

    clipforge convert ckpt/ out/ --to onnx --quantize int8 --calibration images/
    model, preprocess = clipforge.load("out/")   # an OnnxCLIP: same encode_image / encode_text

onnx and onnxruntime are the optional extra ``clipforge[onnx]``; importing this package does not
import them (each function does, with an error naming the extra when they are missing).
"""
from .onnx import META_NAME, export_onnx, read_meta
from .onnx_model import OnnxCLIP, is_export_folder, load_export
from .quantize import quantize_export
from .accuracy import compare_precisions
from .pipeline import convert_to_onnx

__all__ = ["META_NAME", "OnnxCLIP", "compare_precisions", "export_onnx", "is_export_folder", "load_export",
           "quantize_export", "read_meta", "convert_to_onnx"]
