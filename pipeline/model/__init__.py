"""What the model is: a transformers Llava assembled from a CLIP tower and a causal LM."""
