"""Prompts, labels and TGA spans come from the tokenization of real tokenizers (defects 2 and 5 of the
reference code): spans decode back to their text, labels to the answers, and nothing depends on a
token id of one particular tokenizer."""
from __future__ import annotations

import itertools
import json

import pytest
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import LlamaTokenizer, PreTrainedTokenizerFast

from pipeline.conventions import Reject
from pipeline.tga.prompt import IGNORE_INDEX, EncodedPrompt, build_sample
from pipeline.tga.templates import LLAMA2_SYSTEM, TEMPLATES, VICUNA_SYSTEM

SPECIALS = ["<unk>", "<s>", "</s>", "<pad>", "<image>", "<|im_start|>", "<|im_end|>"]
CHATML = ("{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>\\n' }}"
          "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}")

RETRIEVED = "A brown dog sleeps on a red sofa"
CAPTION = "a small cat sits near the blue window."
QUESTION = "What is the animal doing?"
ANSWERS = ["The cat is sitting near a window.", "It is blue and small."]
CONVERSATION = [
    {"from": "human", "value": f"{QUESTION}\n<image>"},
    {"from": "gpt", "value": ANSWERS[0]},
    {"from": "human", "value": "What color is the window?"},
    {"from": "gpt", "value": ANSWERS[1]},
]
N_IMAGE = 6


def _corpus() -> list[str]:
    subjects = ["a dog", "the cat", "a small bird", "two horses", "a red car", "the old man", "a child"]
    verbs = ["sits near", "runs across", "sleeps on", "looks at", "stands beside", "jumps over"]
    objects = ["the blue window", "a green field", "the wooden table", "a busy street", "the red sofa"]
    sentences = [f"{s} {v} {o}." for s, v, o in itertools.product(subjects, verbs, objects)]
    sentences = [s[0].upper() + s[1:] if i % 2 else s for i, s in enumerate(sentences)]
    return sentences + [LLAMA2_SYSTEM, VICUNA_SYSTEM, QUESTION, *ANSWERS, "What color is the window?",
                        "USER: ASSISTANT: [INST] [/INST] <<SYS>>\n <</SYS>>\n\nRetrieved Text: user assistant"]


def _wrap(backend: Tokenizer, **extra) -> PreTrainedTokenizerFast:
    return PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<s>", eos_token="</s>",
                                   unk_token="<unk>", pad_token="<pad>",
                                   extra_special_tokens=["<image>", "<|im_start|>", "<|im_end|>"], **extra)


@pytest.fixture(scope="module")
def byte_level() -> Tokenizer:
    """GPT-2/Llama-3 style: byte-level BPE, the separator space travels with the next word."""
    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    backend.train_from_iterator(_corpus(), trainers.BpeTrainer(
        vocab_size=600, special_tokens=SPECIALS, show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    return backend


@pytest.fixture(scope="module")
def llama() -> LlamaTokenizer:
    """Llama-2/Mistral/Vicuna style: transformers' own LlamaTokenizer (Metaspace, byte fallback) over
    a vocabulary trained SentencePiece-like (letters, punctuation and newlines in separate pieces);
    special tokens in another order, so every id differs from the byte-level tokenizer's."""
    trainer = Tokenizer(models.BPE(unk_token="<unk>"))
    trainer.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first"),
        pre_tokenizers.Punctuation("isolated"), pre_tokenizers.Split("\n", "isolated")])
    trainer.train_from_iterator(_corpus(), trainers.BpeTrainer(
        vocab_size=500, special_tokens=SPECIALS[3:] + SPECIALS[:3], show_progress=False))
    model = json.loads(trainer.to_str())["model"]
    return LlamaTokenizer(vocab=model["vocab"], merges=[tuple(m) for m in model["merges"]],
                          pad_token="<pad>", extra_special_tokens=["<image>", "<|im_start|>", "<|im_end|>"])


@pytest.fixture(scope="module", params=["byte_level", "llama"])
def tokenizer(request):
    if request.param == "llama":
        return request.getfixturevalue("llama")
    return _wrap(request.getfixturevalue("byte_level"))


def _build(tokenizer, conversation=CONVERSATION, template="vicuna_v1", **overrides) -> EncodedPrompt | Reject:
    kwargs = dict(template=template, image_caption=CAPTION, retrieved_text=RETRIEVED, insert_retrieved=True,
                  num_image_tokens=N_IMAGE, max_tokens=1024)
    return build_sample(tokenizer, conversation, **{**kwargs, **overrides})


def _decode(tokenizer, ids) -> str:
    return tokenizer.decode(ids, skip_special_tokens=False)


def _decodes_to(tokenizer, ids, text) -> bool:
    """Exact, up to the one separator space a byte-level BPE attaches to a segment's first word."""
    return _decode(tokenizer, ids) in (text, " " + text)


def _label_runs(sample: EncodedPrompt) -> list[list[int]]:
    runs, current = [], []
    for token, label in zip(sample.input_ids, sample.labels):
        if label != IGNORE_INDEX:
            assert label == token
            current.append(token)
        elif current:
            runs.append(current)
            current = []
    return runs + ([current] if current else [])


@pytest.mark.parametrize("template", ["llama2", "vicuna_v1"])
def test_retrieved_and_caption_spans_decode_back_to_exactly_their_text(tokenizer, template):
    sample = _build(tokenizer, template=template)
    assert tokenizer.unk_token_id not in sample.input_ids + sample.caption_input_ids
    assert _decodes_to(tokenizer, sample.input_ids[slice(*sample.retrieved_span)], RETRIEVED)
    assert _decodes_to(tokenizer, sample.caption_input_ids[slice(*sample.caption_span)], CAPTION)
    # the caption forward is the chat prefix + caption and nothing after it
    assert sample.caption_span[1] == len(sample.caption_input_ids)
    system = LLAMA2_SYSTEM if template == "llama2" else VICUNA_SYSTEM
    assert system in _decode(tokenizer, sample.caption_input_ids[:sample.caption_span[0]])


def test_llama_style_spans_decode_exactly_without_any_leading_space(llama):
    tokenizer = llama
    sample = _build(tokenizer, template="llama2")
    assert _decode(tokenizer, sample.input_ids[slice(*sample.retrieved_span)]) == RETRIEVED
    assert _decode(tokenizer, sample.caption_input_ids[slice(*sample.caption_span)]) == CAPTION


def test_first_turn_is_retrieved_text_then_the_expanded_image_then_the_question(byte_level):
    tokenizer = _wrap(byte_level)
    sample = _build(tokenizer, template="llama2")
    start, end = sample.image_span
    image_id = tokenizer.convert_tokens_to_ids("<image>")
    assert end - start == N_IMAGE and sample.input_ids[start:end] == [image_id] * N_IMAGE
    assert sample.input_ids.count(image_id) == N_IMAGE
    assert _decode(tokenizer, sample.input_ids[:start]).endswith(f"\n\nRetrieved Text: {RETRIEVED}. ")
    assert _decode(tokenizer, sample.input_ids[end:]).startswith(f"\n{QUESTION} [/INST]")
    assert all(label == IGNORE_INDEX for label in sample.labels[:end])


def test_retrieved_text_that_ends_a_sentence_gets_no_second_period(byte_level):
    tokenizer = _wrap(byte_level)
    sample = _build(tokenizer, retrieved_text="The cat sleeps on the red sofa.")
    prompt = _decode(tokenizer, sample.input_ids[:sample.image_span[0]])
    assert prompt.endswith("Retrieved Text: The cat sleeps on the red sofa. ")
    retrieved = sample.input_ids[slice(*sample.retrieved_span)]
    assert _decodes_to(tokenizer, retrieved, "The cat sleeps on the red sofa.")


@pytest.mark.parametrize("template, separator, end_of_turn", [
    ("llama2", " ", " </s>"), ("vicuna_v1", " ", "</s>"), ("plain", "", "\n")])
def test_labels_decode_to_every_assistant_answer_with_its_end_of_turn(tokenizer, template, separator, end_of_turn):
    conversation = CONVERSATION if template != "plain" else CONVERSATION[:2]
    sample = _build(tokenizer, conversation, template=template)
    runs = _label_runs(sample)
    assert len(runs) == len(conversation) // 2
    for run, answer in zip(runs, ANSWERS):
        decoded = _decode(tokenizer, run)
        assert decoded in (separator + answer + end_of_turn, answer + end_of_turn)
    if template != "plain":
        assert runs[-1][-1] == tokenizer.eos_token_id


@pytest.mark.parametrize("template", ["llama2", "vicuna_v1", "plain"])
def test_labels_equal_the_assistant_mask_transformers_reads_from_generation_blocks(byte_level, template):
    tokenizer = _wrap(byte_level)
    conversation = [{"from": "human", "value": "Describe the red car."}, {"from": "gpt", "value": ANSWERS[0]},
                    {"from": "human", "value": "And the window?"}, {"from": "gpt", "value": ANSWERS[1]}]
    sample = _build(tokenizer, conversation, template=template, retrieved_text=None)
    messages = [{"role": "user" if t["from"] == "human" else "assistant", "content": t["value"]}
                for t in conversation]
    reference = tokenizer.apply_chat_template(messages, chat_template=TEMPLATES[template].source,
                                              return_dict=True, return_assistant_tokens_mask=True)
    assert sample.input_ids == list(reference["input_ids"])
    assert [label != IGNORE_INDEX for label in sample.labels] == [bool(m) for m in reference["assistant_masks"]]


def test_plain_template_shows_the_image_alone_and_learns_the_caption(byte_level):
    tokenizer = _wrap(byte_level)
    conversation = [{"from": "human", "value": "<image>\nDescribe the image briefly."},
                    {"from": "gpt", "value": CAPTION}]
    sample = _build(tokenizer, conversation, template="plain", insert_retrieved=False)
    start, end = sample.image_span
    assert sample.input_ids[:start] == [tokenizer.bos_token_id] and sample.retrieved_span is None
    assert _decode(tokenizer, sample.input_ids[end:]) == CAPTION + "\n"
    assert sample.labels[end:] == sample.input_ids[end:]
    assert _decode(tokenizer, sample.caption_input_ids) == "<s>" + CAPTION


def test_tokenizer_template_uses_the_tokenizers_own_chat_template(byte_level):
    tokenizer = _wrap(byte_level, chat_template=CHATML)
    sample = _build(tokenizer, template="tokenizer")
    text = _decode(tokenizer, sample.input_ids)
    assert text.startswith(f"<|im_start|>user\nRetrieved Text: {RETRIEVED}. <image>")
    assert [_decode(tokenizer, run) for run in _label_runs(sample)] == [a + "<|im_end|>\n" for a in ANSWERS]
    assert _decodes_to(tokenizer, sample.input_ids[slice(*sample.retrieved_span)], RETRIEVED)
    assert _decodes_to(tokenizer, sample.caption_input_ids[slice(*sample.caption_span)], CAPTION)


def test_a_template_that_rewrites_messages_is_refused_rather_than_guessed(byte_level):
    upper = "{% for m in messages %}{{ m['content'] | upper }}{% endfor %}"
    with pytest.raises(ValueError, match="chat template 'tokenizer'"):
        _build(_wrap(byte_level, chat_template=upper), template="tokenizer")
    with pytest.raises(ValueError, match="chat_template"):
        _build(_wrap(byte_level), template="tokenizer")


def test_same_code_serves_two_tokenizers_whose_special_ids_differ(byte_level, llama):
    first, second = _wrap(byte_level), llama
    names = ["<image>", "</s>", "<s>", "<pad>"]
    assert all(first.convert_tokens_to_ids(n) != second.convert_tokens_to_ids(n) for n in names)
    for tokenizer in (first, second):
        sample = _build(tokenizer, template="llama2")
        image_id = tokenizer.convert_tokens_to_ids("<image>")
        assert set(sample.input_ids[slice(*sample.image_span)]) == {image_id}
        assert sample.input_ids[0] == tokenizer.bos_token_id
        assert [run[-1] for run in _label_runs(sample)] == [tokenizer.eos_token_id] * 2


def test_text_only_sample_has_no_image_span_and_keeps_its_question_verbatim(tokenizer):
    conversation = [{"from": "human", "value": QUESTION}, {"from": "gpt", "value": ANSWERS[0]}]
    sample = _build(tokenizer, conversation, retrieved_text=None, image_caption=None)
    assert sample.image_span is None and sample.retrieved_span is None and sample.caption_span is None
    assert sample.caption_input_ids == []
    assert f"USER: {QUESTION} ASSISTANT:" in _decode(tokenizer, sample.input_ids)
    with pytest.raises(ValueError, match="without an image"):
        _build(tokenizer, conversation)


def test_truncation_that_would_cut_the_image_rejects_the_sample(tokenizer):
    full = _build(tokenizer)
    rejected = _build(tokenizer, max_tokens=full.image_span[1] - 1)
    assert isinstance(rejected, Reject) and rejected.reason == "image_truncated"


def test_tail_truncation_cuts_ids_and_labels_and_keeps_spans_valid(tokenizer):
    full = _build(tokenizer)
    cut = _build(tokenizer, max_tokens=len(full.input_ids) - 4)
    assert cut.input_ids == full.input_ids[:-4] and cut.labels == full.labels[:-4]
    assert (cut.image_span, cut.retrieved_span) == (full.image_span, full.retrieved_span)
    assert _decodes_to(tokenizer, cut.input_ids[slice(*cut.retrieved_span)], RETRIEVED)


def test_truncation_that_leaves_no_answer_token_rejects_the_sample(tokenizer):
    full = _build(tokenizer)
    first_label = next(i for i, label in enumerate(full.labels) if label != IGNORE_INDEX)
    rejected = _build(tokenizer, max_tokens=first_label)
    assert isinstance(rejected, Reject) and rejected.reason == "no_answer_tokens"


def test_caption_prompt_is_cut_to_max_tokens_with_its_span(byte_level):
    tokenizer = _wrap(byte_level)
    conversation = [{"from": "human", "value": "<image>"}, {"from": "gpt", "value": "A dog."}]
    caption = " ".join([CAPTION] * 6)
    sample = _build(tokenizer, conversation, template="plain", insert_retrieved=False, image_caption=caption,
                    num_image_tokens=2, max_tokens=12)
    assert len(sample.caption_input_ids) == 12 and sample.caption_span == (1, 12)


def test_image_token_inside_retrieved_text_or_caption_cannot_become_an_image(byte_level):
    tokenizer = _wrap(byte_level)
    sample = _build(tokenizer, retrieved_text=f"{RETRIEVED} <image>", image_caption=f"<image>{CAPTION}")
    image_id = tokenizer.convert_tokens_to_ids("<image>")
    assert sample.input_ids.count(image_id) == N_IMAGE and image_id not in sample.caption_input_ids
    assert _decodes_to(tokenizer, sample.input_ids[slice(*sample.retrieved_span)], RETRIEVED)


def test_unknown_templates_and_tokenizers_without_the_image_token_are_refused_with_the_reason(byte_level):
    tokenizer = _wrap(byte_level)
    with pytest.raises(ValueError, match="unknown chat template"):
        _build(tokenizer, template="chatml")
    with pytest.raises(ValueError, match="no '<img>' token"):
        _build(tokenizer, [{"from": "human", "value": "<img> Hi"}, {"from": "gpt", "value": "A dog."}],
               image_token="<img>")


def test_a_token_straddling_the_end_of_a_segment_stays_in_its_span(byte_level):
    # a corpus where ")." is one token: "sofa)" + the template's "." tokenizes as "sofa" ")."
    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    backend.train_from_iterator(_corpus() + ["(on the red sofa)."] * 50, trainers.BpeTrainer(
        vocab_size=600, special_tokens=SPECIALS, show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tokenizer = _wrap(backend)
    sample = _build(tokenizer, retrieved_text="A dog (on the red sofa)")
    span = sample.input_ids[slice(*sample.retrieved_span)]
    assert tokenizer.convert_ids_to_tokens(span[-1]) == ")."
    assert _decode(tokenizer, span) in ("A dog (on the red sofa).", " A dog (on the red sofa).")
