"""Generation beyond ``model.generate``: fixed-shape decoding steps replayed as CUDA graphs (``static``), and
self-speculation with a compressed draft cache (``speculative``)."""

from polykv.decoding.speculative import Speculation, speculative_generate
from polykv.decoding.static import Sampling, StaticDecoder, static_generate

__all__ = ["Sampling", "Speculation", "StaticDecoder", "speculative_generate", "static_generate"]
