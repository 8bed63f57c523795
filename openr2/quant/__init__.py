"""Weight-only quantization: int8 per channel, int4 group-wise, FP8 block weights kept in memory.

schemes.py (formats: quantize / pack / dequantize), layers.py (drop-in QuantLinear / QuantExperts with
a reference and a fast path), checkpoint.py (`openr2 quantize` and the loader's hook).
"""
