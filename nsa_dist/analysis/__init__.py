"""Analysis of trained models: retrieval evaluation by length and depth, and what the router selects."""
