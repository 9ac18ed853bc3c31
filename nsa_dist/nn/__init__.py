"""The model: the NSA layer, the decoder, converting a model to NSA, and parallelizing it."""
