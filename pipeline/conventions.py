"""What every stage spells the same way (join, training, export, evaluation). A leaf: it imports
nothing from pipeline, so any layer may import it without running upward."""
from __future__ import annotations

import dataclasses

# The placeholder of LLaVA data, and the token the model's tokenizer gets for it.
IMAGE_TOKEN = "<image>"


@dataclasses.dataclass(frozen=True)
class Reject:
    """A record or sample that is skipped, not failed: the caller counts it by `reason` and goes on.
    The join's rejects (pipeline/data/llava.py: REASONS) name the record's key and its position in
    the input file; training's (a cut through the image, no answer token left, an undecodable
    image) are decided per sample by the tokenization and the image decoder."""
    reason: str
    detail: str = ""
    key: str = ""
    position: int | None = None   # 0-based index of the record in the input file (the join)
