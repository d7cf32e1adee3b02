"""TGA core: the alignment loss (loss.py) and the prompt/span builder (prompt.py, templates.py).

Pure functions of tensors and token ids: no DeepSpeed, no MLflow, no file I/O.
"""
