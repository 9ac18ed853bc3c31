"""nsa_dist: Native Sparse Attention for long-context training with the sequence sharded across GPUs."""
from nsa_dist.data.sharding import shard_batch
from nsa_dist.nn.build import build_model
from nsa_dist.nn.convert import convert_attention, register_adapter
from nsa_dist.nn.layer import DenseAttention, NativeSparseAttention, NSAConfig, SparseAttention
from nsa_dist.nn.model import ModelConfig, NSATransformer
from nsa_dist.nn.parallelize import parallelize
from nsa_dist.training.loss import causal_lm_loss

__version__ = "0.1.0"
__all__ = ["DenseAttention", "ModelConfig", "NativeSparseAttention", "NSAConfig", "NSATransformer", "SparseAttention",
           "__version__", "build_model", "causal_lm_loss", "convert_attention", "parallelize", "register_adapter",
           "shard_batch"]
