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


def _report(rows: list[tuple[str, str]]) -> str:
    """transformers' load report as loading_report.py lays it out (bold title, table, notes)."""
    table = ["Key | Status |  | ", "---+---+--+-", *(f"{key} | {status} |  | " for key, status in rows)]
    return ("\x1b[1mCLIPVisionModel LOAD REPORT\x1b[0m from: work/tiny/models/clip\n" + "\n".join(table)
            + "\n\nNotes:\n- UNEXPECTED:\tcan be ignored when loading from different task/architecture")


def test_a_clip_load_report_is_dropped_only_when_it_lists_the_text_encoder_alone(caplog):
    quiet.install()
    text_side = [("text_model.encoder.layers.{0, 1}.mlp.fc1.bias", "UNEXPECTED"), ("logit_scale", "UNEXPECTED"),
                 ("text_projection.weight", "UNEXPECTED"), ("visual_projection.weight", "UNEXPECTED")]
    logger = logging.getLogger("transformers.modeling_utils")
    with caplog.at_level(logging.WARNING):
        logger.warning(_report(text_side))
        logger.warning(_report([*text_side, ("vision_model.post_layernorm.weight", "MISSING")]))
        logger.warning(_report([("vision_model.embeddings.patch_embedding.weight", "UNEXPECTED")]))
    assert [("MISSING" in r.getMessage(), "patch_embedding" in r.getMessage()) for r in caplog.records] == [
        (True, False), (False, True)]
