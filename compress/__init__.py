"""compress: distill any trained classifier into a wide, shallow, factorized student (SNN-MIMIC).

Ba & Caruana, "Do Deep Nets Really Need to be Deep?", NIPS 2014. Importing this package is cheap:
torch and onnxruntime are imported by the stage modules that need them.
"""

from compress.errors import CompressError

__version__ = "0.1.0"
__all__ = ["CompressError", "__version__"]
