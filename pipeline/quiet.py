"""Known-harmless messages of the libraries we use, silenced by name and exact text; every other
warning stays. Installed on import of the `pipeline` package, which every entry point imports
before DeepSpeed or transformers can log.

Each entry says why it is harmless here. A message that changes its wording comes back: it is
matched by its start, not by a pattern that could swallow a real warning.
"""
from __future__ import annotations

import logging
import re
import warnings

# logger name -> starts of messages that only restate a choice the pipeline made on purpose
KNOWN_HARMLESS = {
    # DeepSpeed picks its CPU accelerator where torch sees no GPU: on CPU machines that is the
    # point (the launch scripts set DS_ACCELERATOR=cpu; a plain `python -m` is a world of one).
    "DeepSpeed": ("Setting accelerator to CPU. If you have GPU or other accelerator, we were unable to detect it.",),
    # Without torchvision (the CPU environment: PyPI's torchvision does not import beside a CPU
    # torch) transformers serves the PIL image processors under the usual names, which is what
    # the CPU environment is built for (README, "Installing on a CUDA cluster").
    "transformers.utils.import_utils": tuple(
        f"`{name}` requires torchvision (not installed); falling back to `{name}Pil`"
        for name in ("CLIPImageProcessor", "LlavaImageProcessor")),
}


# (category, start of the message) of Python warnings raised inside libraries, once per rank
KNOWN_HARMLESS_WARNINGS = (
    # DeepSpeed's ZeRO-3 gathers and reductions call torch's old names; nothing of ours does.
    (FutureWarning, r"`torch\.distributed\.(all_gather_into_tensor|reduce_scatter_tensor)` is deprecated"),
    # torchdata's StatefulDataLoader calls it at every start.
    (UserWarning, r"'set_vital' is deprecated"),
)


class _DropKnown(logging.Filter):
    def __init__(self, starts: tuple[str, ...]):
        super().__init__()
        self.starts = starts

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(self.starts)


class _DropClipTextSideReport(logging.Filter):
    """transformers' "CLIPVisionModel LOAD REPORT" when a vision tower is read from a whole CLIP
    folder (the tiny world's, openai/clip-vit-large-patch14-336): the text encoder's weights are
    UNEXPECTED there, by design. Dropped only when those are all it lists; a missing or mismatched
    vision weight keeps the whole report."""
    CLIP_TEXT_SIDE = ("text_model.", "text_projection.", "visual_projection.", "logit_scale")
    _ANSI = re.compile(r"\x1b\[[0-9;]*m")
    _ROW = re.compile(r"^(?P<key>\S+)\s*\|\s*(?P<status>[A-Z_]+)\s*\|")

    def filter(self, record: logging.LogRecord) -> bool:
        text = self._ANSI.sub("", str(record.msg))
        if not text.startswith("CLIPVisionModel LOAD REPORT"):
            return True
        rows = [m for m in map(self._ROW.match, text.splitlines()) if m and m["key"] != "Key"]
        harmless = rows and all(m["status"] == "UNEXPECTED" and m["key"].startswith(self.CLIP_TEXT_SIDE)
                                for m in rows)
        return not harmless


def install() -> None:
    report = logging.getLogger("transformers.modeling_utils")
    if not any(isinstance(f, _DropClipTextSideReport) for f in report.filters):
        report.addFilter(_DropClipTextSideReport())
    for category, message in KNOWN_HARMLESS_WARNINGS:
        warnings.filterwarnings("ignore", message=message, category=category)
    for name, starts in KNOWN_HARMLESS.items():
        logger = logging.getLogger(name)
        if not any(isinstance(f, _DropKnown) for f in logger.filters):
            logger.addFilter(_DropKnown(starts))
