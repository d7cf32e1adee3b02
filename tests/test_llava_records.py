"""pipeline/data/llava.py: reading and validating LLaVA-format records."""
from __future__ import annotations

import json

import pytest

from pipeline.conventions import Reject
from pipeline.data.llava import (
    REASONS,
    LlavaInputError,
    LlavaSample,
    RawRecord,
    estimate_tokens,
    first_answer,
    read_records,
    sample_key,
    validate_record,
    validate_records,
)

# Verbatim shapes of the real files.
LCS_558K = {"id": "004539375", "image": "00453/004539375.jpg", "conversations": [
    {"from": "human", "value": "Render a clear and concise summary of the photo.\n<image>"},
    {"from": "gpt", "value": "select luxury furniture 3 - inch gel memory foam mattress topper"}]}
MIX665K_COCO = {"id": "000000033471", "image": "coco/train2017/000000033471.jpg", "conversations": [
    {"from": "human", "value": "<image>\nWhat are the colors of the bus in the image?"},
    {"from": "gpt", "value": "The bus in the image is white and red."},
    {"from": "human", "value": "What feature can be seen on the back of the bus?"},
    {"from": "gpt", "value": "The back of the bus features an advertisement."}]}
MIX665K_OCR = {"id": "1885921343", "image": "ocr_vqa/images/1885921343.jpg", "conversations": [
    {"from": "human", "value": "<image>\nWho wrote this book?"}, {"from": "gpt", "value": "Jane Doe"}]}
MIX665K_TEXT = {"id": "i6IyJda_0", "model": "", "conversations": [
    {"from": "human", "value": "How to tell if a customer segment is well segmented?"},
    {"from": "gpt", "value": "There are several ways to tell."}]}


def raw(value, position=0):
    return RawRecord(position, value)


def reason_of(value) -> str:
    result = validate_record(raw(value))
    assert isinstance(result, Reject), result
    assert result.reason in REASONS
    return result.reason


@pytest.mark.parametrize("record", [LCS_558K, MIX665K_COCO, MIX665K_OCR])
def test_real_image_records_validate_with_their_nested_image_path(record):
    sample = validate_record(raw(record))
    assert isinstance(sample, LlavaSample)
    assert sample.image == record["image"] and sample.id == record["id"]
    assert sample.conversations == record["conversations"]


def test_text_only_record_is_a_sample_without_image():
    sample = validate_record(raw(MIX665K_TEXT))
    assert isinstance(sample, LlavaSample) and sample.image is None and sample.key == "i6IyJda_0"


def test_json_array_and_jsonl_read_the_same_records(tmp_path):
    records = [LCS_558K, MIX665K_COCO, MIX665K_TEXT]
    (tmp_path / "a.json").write_text(json.dumps(records))
    (tmp_path / "a.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records) + "\n")
    from_array = read_records(tmp_path / "a.json")
    from_lines = read_records(tmp_path / "a.jsonl")
    assert [r.value for r in from_array] == [r.value for r in from_lines] == records
    assert [r.position for r in from_array] == [0, 1, 2]


def test_malformed_json_array_is_an_error_naming_file_and_line(tmp_path):
    path = tmp_path / "broken.json"
    path.write_text('[\n{"id": "1", "conversations": []},\n{"id": 2,,}\n]')
    with pytest.raises(LlavaInputError, match=r"broken.json: malformed JSON at line 3"):
        read_records(path)


def test_non_utf8_json_array_is_an_error(tmp_path):
    path = tmp_path / "latin1.json"
    path.write_bytes('[{"id": "caf\u00e9"}]'.encode("latin-1"))
    with pytest.raises(LlavaInputError, match="not UTF-8"):
        read_records(path)


def test_json_that_is_not_an_array_is_an_error(tmp_path):
    path = tmp_path / "object.json"
    path.write_text(json.dumps(LCS_558K))
    with pytest.raises(LlavaInputError, match="expected a JSON array"):
        read_records(path)


def test_missing_input_file_is_an_error(tmp_path):
    with pytest.raises(LlavaInputError, match="not found"):
        read_records(tmp_path / "nope.json")


def test_bad_jsonl_lines_become_rejects_and_the_rest_is_read(tmp_path):
    path = tmp_path / "mixed.jsonl"
    path.write_bytes(json.dumps(LCS_558K).encode() + b"\n{not json\n" + b'{"id": "\xff\xfe"}\n'
                     + json.dumps(MIX665K_TEXT).encode() + b"\n")
    results = validate_records(read_records(path))
    assert [type(r).__name__ for r in results] == ["LlavaSample", "Reject", "Reject", "LlavaSample"]
    assert (results[1].reason, results[2].reason) == ("malformed_json", "not_utf8")
    assert results[1].key == "record-000000001"


@pytest.mark.parametrize("value, reason", [
    (["not", "an", "object"], "not_an_object"),
    ({"image": "a.jpg", "conversations": LCS_558K["conversations"]}, "missing_id"),
    ({"id": "", "conversations": LCS_558K["conversations"]}, "missing_id"),
    ({"id": "x", "image": "a.jpg"}, "missing_conversations"),
    ({"id": "x", "image": "a.jpg", "conversations": []}, "missing_conversations"),
    ({"id": "x", "conversations": [{"from": "gpt", "value": "hi"}, {"from": "human", "value": "yo"}]},
     "bad_conversations"),
    ({"id": "x", "conversations": [{"from": "human", "value": "hi"}]}, "bad_conversations"),
    ({"id": "x", "conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "a"},
                                   {"from": "human", "value": "and?"}]}, "bad_conversations"),
    ({"id": "x", "conversations": [{"from": "human", "value": 3}, {"from": "gpt", "value": "a"}]},
     "bad_conversations"),
    ({"id": "x", "image": "a.jpg", "conversations": [
        {"from": "human", "value": "Describe."}, {"from": "gpt", "value": "A cat."}]}, "image_token_missing"),
    ({"id": "x", "image": "a.jpg", "conversations": [
        {"from": "human", "value": "<image>\n<image>\nDescribe."}, {"from": "gpt", "value": "A cat."}]},
     "image_token_repeated"),
    ({"id": "x", "image": "a.jpg", "conversations": [
        {"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Hello"},
        {"from": "human", "value": "<image>\nDescribe."}, {"from": "gpt", "value": "A cat."}]},
     "image_token_not_in_first_turn"),
    ({"id": "x", "conversations": [{"from": "human", "value": "<image>\nDescribe."},
                                   {"from": "gpt", "value": "A cat."}]}, "image_token_without_image"),
    ({**LCS_558K, "image": "/abs/a.jpg"}, "bad_image_path"),
    ({**LCS_558K, "image": "../outside/a.jpg"}, "bad_image_path"),
    ({**LCS_558K, "image": 7}, "bad_image_path"),
])
def test_each_bad_record_is_rejected_with_its_reason(value, reason):
    assert reason_of(value) == reason


def test_numeric_ids_are_accepted_as_strings():
    sample = validate_record(raw({**LCS_558K, "id": 4539375}))
    assert sample.id == "4539375" and sample.key == "4539375"


def test_keys_are_tar_safe_without_dots_or_slashes():
    assert sample_key("GCC_train_002582585") == "GCC_train_002582585"
    assert sample_key("vg/VG_100K/2345.jpg") == "vg_VG_100K_2345_jpg"
    sample = validate_record(raw({**MIX665K_OCR, "id": "1885921343.1"}))
    assert "." not in sample.key and "/" not in sample.key


def test_duplicate_ids_are_rejected_after_the_first_occurrence():
    results = validate_records([raw(LCS_558K, 0), raw(MIX665K_TEXT, 1), raw(LCS_558K, 2)])
    assert isinstance(results[0], LlavaSample) and isinstance(results[1], LlavaSample)
    assert isinstance(results[2], Reject) and results[2].reason == "duplicate_id"
    assert results[2].key == "004539375" and results[2].position == 2


def test_ids_that_collide_after_sanitising_count_as_duplicates():
    results = validate_records([raw({**MIX665K_OCR, "id": "a.b"}, 0), raw({**MIX665K_OCR, "id": "a_b"}, 1)])
    assert isinstance(results[1], Reject) and results[1].reason == "duplicate_id"


def test_suffix_policy_keeps_duplicates_under_new_unique_keys():
    results = validate_records([raw(LCS_558K, 0), raw(LCS_558K, 1), raw({**LCS_558K, "id": "004539375_dup1"}, 2),
                                raw(LCS_558K, 3)], duplicate_ids="suffix")
    keys = [r.key for r in results]
    assert all(isinstance(r, LlavaSample) for r in results)
    assert len(set(keys)) == 4 and keys[0] == "004539375" and keys[1] == "004539375_dup1"


def test_first_answer_is_the_lcs558k_caption():
    assert first_answer(LCS_558K["conversations"]) == LCS_558K["conversations"][1]["value"]


def test_token_estimate_grows_with_text():
    short = estimate_tokens(LCS_558K["conversations"])
    assert 0 < short < estimate_tokens(MIX665K_COCO["conversations"])
    assert estimate_tokens(LCS_558K["conversations"], "three more words") == estimate_tokens(
        [*LCS_558K["conversations"], {"from": "human", "value": "three more words"}])
