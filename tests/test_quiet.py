"""Known-harmless library messages are dropped by name and text; anything else still reaches the
user (pipeline/quiet.py)."""
from __future__ import annotations

import logging
import warnings

from pipeline import quiet


def test_the_known_deepspeed_and_transformers_lines_are_dropped_and_their_neighbours_kept(caplog):
    quiet.install()
    quiet.install()  # a second install adds no second filter
    assert sum(isinstance(f, quiet._DropKnown) for f in logging.getLogger("DeepSpeed").filters) == 1
    with caplog.at_level(logging.INFO):
        logging.getLogger("DeepSpeed").warning(quiet.KNOWN_HARMLESS["DeepSpeed"][0])
        logging.getLogger("DeepSpeed").warning("Setting accelerator to cuda")
        logging.getLogger("transformers.utils.import_utils").warning(
            "`CLIPImageProcessor` requires torchvision (not installed); falling back to `CLIPImageProcessorPil` "
            "for backward compatibility.")
        logging.getLogger("transformers.utils.import_utils").warning("`Foo` requires bar (not installed)")
    assert [r.getMessage() for r in caplog.records] == ["Setting accelerator to cuda",
                                                        "`Foo` requires bar (not installed)"]


def test_the_known_library_warnings_are_ignored_and_other_future_warnings_kept():
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        quiet.install()
        warnings.warn("`torch.distributed.all_gather_into_tensor` is deprecated. Please use ...", FutureWarning)
        warnings.warn("'set_vital' is deprecated, please do not call", UserWarning)
        warnings.warn("`torch.distributed.all_gather_into_tensor` is deprecated", UserWarning)  # other category
        warnings.warn("`foo` is deprecated", FutureWarning)
    assert [(w.category, str(w.message)) for w in caught] == [
        (UserWarning, "`torch.distributed.all_gather_into_tensor` is deprecated"), (FutureWarning, "`foo` is deprecated")]
