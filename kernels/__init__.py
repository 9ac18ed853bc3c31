"""nsa_dist.kernels: NSA ops with a Triton backend and a pure-PyTorch fp32 reference."""
from .nsa import *  # noqa: F401,F403
from .nsa import __all__  # noqa: F401
