"""fastloop: Lightning 1.x's Loop API over a fused, compiled optimizer step."""
__version__ = "0.1.0"
