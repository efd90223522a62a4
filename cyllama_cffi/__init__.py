"""cyllama_cffi: a cffi binding over llama.cpp with two-layer cancellation."""
from ._ffi import ffi, lib
__version__ = "0.1.0"
