"""The data: token files and text, the synthetic tasks, and sharding a batch across sequence-parallel ranks."""
