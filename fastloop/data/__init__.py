"""In-memory data loading: :class:`TensorLoader`."""
from fastloop.data.tensor_loader import TensorLoader as TensorLoader

__all__ = ["TensorLoader"]
