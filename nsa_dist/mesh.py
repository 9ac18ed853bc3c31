"""Moved to `nsa_dist.parallel` (parallel/mesh.py); this name is kept until every importer has switched."""
from nsa_dist.parallel import SINGLE_RANK_MESH, Mesh, ParallelConfig, build_mesh

__all__ = ["Mesh", "ParallelConfig", "SINGLE_RANK_MESH", "build_mesh"]
