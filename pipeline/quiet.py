"""Known-harmless messages of the libraries we use, silenced by name and exact text; every other
warning stays. Installed on import of the `pipeline` package, which every entry point imports
before DeepSpeed or transformers can log.

Each entry says why it is harmless here. A message that changes its wording comes back: it is
matched by its start, not by a pattern that could swallow a real warning.
"""
from __future__ import annotations

import logging
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


def install() -> None:
    for category, message in KNOWN_HARMLESS_WARNINGS:
        warnings.filterwarnings("ignore", message=message, category=category)
    for name, starts in KNOWN_HARMLESS.items():
        logger = logging.getLogger(name)
        if not any(isinstance(f, _DropKnown) for f in logger.filters):
            logger.addFilter(_DropKnown(starts))
