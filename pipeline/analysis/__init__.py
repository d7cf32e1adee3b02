"""Analysis tools: safety-layer logit lens and per-layer image/caption alignment of a model folder."""
