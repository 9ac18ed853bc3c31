"""nsa_dist: Native Sparse Attention for long-context training with the sequence sharded across GPUs."""
from nsa_dist.convert import convert_attention, register_adapter
from nsa_dist.layer import DenseAttention, NativeSparseAttention, NSAConfig, SparseAttention
from nsa_dist.model import ModelConfig, NSATransformer
from nsa_dist.models import build_model
from nsa_dist.parallelize import parallelize
from nsa_dist.sp_data import causal_lm_loss, shard_batch

__version__ = "0.1.0"
__all__ = ["DenseAttention", "ModelConfig", "NativeSparseAttention", "NSAConfig", "NSATransformer", "SparseAttention",
           "__version__", "build_model", "causal_lm_loss", "convert_attention", "parallelize", "register_adapter",
           "shard_batch"]
