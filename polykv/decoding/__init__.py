"""Generation beyond ``model.generate``: fixed-shape decoding steps replayed as CUDA graphs (``static``)."""

from polykv.decoding.static import Sampling, StaticDecoder, static_generate

__all__ = ["Sampling", "StaticDecoder", "static_generate"]
