"""tga-pipeline: train LLaVA-style VLMs with TGA so text refusals transfer to images."""
