"""nsa_dist: Native Sparse Attention for long-context training with the sequence sharded across GPUs."""
from nsa_dist.layer import NativeSparseAttention, NSAConfig, SparseAttention
from nsa_dist.model import ModelConfig, NSATransformer
from nsa_dist.parallelize import parallelize

__version__ = "0.1.0"
__all__ = ["ModelConfig", "NativeSparseAttention", "NSAConfig", "NSATransformer", "SparseAttention", "__version__",
           "parallelize"]
