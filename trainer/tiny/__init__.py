"""The embedded default model: a small chat model that pairloop builds for itself, offline."""
