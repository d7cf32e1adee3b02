"""tga-pipeline: train LLaVA-style VLMs with TGA so text refusals transfer to images."""

from pipeline import quiet as _quiet

_quiet.install()
