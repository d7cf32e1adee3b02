"""One LLaVA conversation -> token ids, labels and the token spans TGA pools over.

Every span comes from the tokenization itself: the prompt is rendered by a chat template, the
character range of each inserted segment (retrieved text, image placeholder, caption, assistant
turns) is known, and a token belongs to a segment when its offset range overlaps the segment's
characters (the rule transformers uses for assistant masks). The TGA reference used constant offsets
of one tokenizer (53, 56, 575) instead, which silently pooled the wrong tokens on any other one.

Spans are half-open `(start, end)` token indices, computed after the single image placeholder is
expanded to `num_image_tokens` copies of the image token (what LlavaForConditionalGeneration
expects). With a byte-level BPE the template's separator space before a segment travels in the
segment's first token (" dog"), so a span decodes to its text with that one leading space. A token
that straddles a segment's edge (")." after a retrieved text ending in ")") stays in the span:
pooling keeps every token that carries the segment's characters.
"""
from __future__ import annotations

from dataclasses import dataclass

from pipeline.conventions import IMAGE_TOKEN, Reject
from pipeline.tga.templates import ChatTemplate, get_template, render

IGNORE_INDEX = -100  # label of every token the LM loss must skip (transformers' convention)
RETRIEVED_PREFIX = "Retrieved Text: "
_ROLES = {"human": "user", "gpt": "assistant"}
_SENTENCE_END = (".", "!", "?")

Span = tuple[int, int]


@dataclass(frozen=True)
class EncodedPrompt:
    input_ids: list[int]
    labels: list[int]  # IGNORE_INDEX except assistant answers and their end-of-turn tokens
    image_span: Span | None  # None: text-only sample
    retrieved_span: Span | None  # None: no retrieved text in the prompt
    caption_input_ids: list[int]  # chat prefix + caption, for the text-only forward; [] if no caption
    caption_span: Span | None


def build_sample(tokenizer, conversations: list[dict], *, template: str, image_caption: str | None,
                 retrieved_text: str | None, insert_retrieved: bool, num_image_tokens: int,
                 max_tokens: int, image_token: str = IMAGE_TOKEN) -> EncodedPrompt | Reject:
    """Encode one LLaVA sample (`conversations`: [{from: human|gpt, value}], human first, valid
    as the retrieval join checks it: at most one image placeholder, in the first turn).

    The first human turn becomes `Retrieved Text: {retrieved}. <image>\n{question}` (the
    retrieved part only when `insert_retrieved` and a text is given). Both the multimodal prompt
    and the caption prompt are cut to `max_tokens`; a cut through the image is a rejection, as is
    a sample left without answer tokens: both come back as a `Reject` (the caller counts and
    skips them).
    """
    spec = get_template(template)
    # chat templates that trim would lose spans
    turns = [(_ROLES[turn["from"]], turn["value"].strip()) for turn in conversations]
    if num_image_tokens < 1 or max_tokens < 1:
        raise ValueError(f"num_image_tokens and max_tokens must be >= 1, got {num_image_tokens}, {max_tokens}")
    has_image = image_token in turns[0][1]
    image_token_id = _image_token_id(tokenizer, image_token) if has_image else None

    retrieved = _clean(retrieved_text, image_token) if insert_retrieved else None
    if retrieved is not None and not has_image:
        raise ValueError("retrieved text given for a sample without an image placeholder")
    first, segments = _first_user_content(turns[0][1], spec, has_image, retrieved, image_token)
    messages = [{"role": "user", "content": first}]
    messages += [{"role": role, "content": text} for role, text in turns[1:]]

    text, chars = _locate(tokenizer, spec, messages, segments)
    ids, offsets = _tokenize(tokenizer, text)
    labels = [IGNORE_INDEX] * len(ids)
    for start, end in chars["answers"]:
        first_tok, last_tok = _token_span(offsets, start, end)
        labels[first_tok:last_tok] = ids[first_tok:last_tok]
    retrieved_span = _nonempty(_token_span(offsets, *chars["retrieved"])) if "retrieved" in chars else None

    image_span = None
    if has_image:
        at = _image_position(ids, offsets, image_token_id, chars["image"], image_token)
        ids[at:at + 1] = [image_token_id] * num_image_tokens
        labels[at:at + 1] = [IGNORE_INDEX] * num_image_tokens
        image_span = (at, at + num_image_tokens)
        # the retrieved text precedes the image in the prompt, so expansion never shifts it

    if len(ids) > max_tokens:
        if image_span is not None and image_span[1] > max_tokens:
            return Reject("image_truncated", f"{len(ids)} tokens, image ends at {image_span[1]}, "
                                               f"max_tokens={max_tokens}")
        ids, labels = ids[:max_tokens], labels[:max_tokens]
        retrieved_span = _clip(retrieved_span, max_tokens)
    if all(label == IGNORE_INDEX for label in labels):
        return Reject("no_answer_tokens", f"no assistant token within max_tokens={max_tokens}")

    caption_ids, caption_span = _caption_prompt(tokenizer, spec, _clean(image_caption, image_token),
                                                max_tokens)
    return EncodedPrompt(ids, labels, image_span, retrieved_span, caption_ids, caption_span)


def _clean(text: str | None, image_token: str) -> str | None:
    """Side text (caption, retrieved) must never smuggle in an image token; blank means absent."""
    if text is None:
        return None
    text = text.replace(image_token, " ").strip()
    return text or None


def _first_user_content(value: str, spec: ChatTemplate, has_image: bool, retrieved: str | None,
                        image_token: str) -> tuple[str, dict[str, Span]]:
    """`Retrieved Text: {retrieved}. <image>\\n{question}` and the character ranges inside it."""
    if not has_image:
        return value, {}
    question = value.replace(image_token, "").strip() if spec.keeps_question else ""
    content, segments = "", {}
    if retrieved is not None:
        content = RETRIEVED_PREFIX
        segments["retrieved"] = (len(content), len(content) + len(retrieved))
        # no second period after one the text already has: ".." would merge into one token that
        # straddles the end of the span
        content += retrieved + ("" if retrieved.endswith(_SENTENCE_END) else ".") + " "
    segments["image"] = (len(content), len(content) + len(image_token))
    content += image_token + ("\n" + question if question else "")
    return content, segments


def _locate(tokenizer, spec: ChatTemplate, messages: list[dict],
            segments: dict[str, Span]) -> tuple[str, dict]:
    """Render the chat and find each segment's character range in it."""
    assistant_at = [k for k, m in enumerate(messages) if m["role"] == "assistant"]
    full, first_turn = render(tokenizer, spec, [messages, messages[:1]])
    before_answers = render(tokenizer, spec, [messages[:k] for k in assistant_at], add_generation_prompt=True)
    through_answers = render(tokenizer, spec, [messages[:k + 1] for k in assistant_at])
    for part in [first_turn, *before_answers, *through_answers]:
        if not full.startswith(part):
            raise ValueError(f"chat template '{spec.name}' renders a conversation prefix that is not a "
                             f"prefix of the whole conversation; spans cannot be located")
    chars: dict = {"answers": []}
    for k, start, end in zip(assistant_at, before_answers, through_answers):
        if messages[k]["content"] not in full[len(start):len(end)]:
            raise ValueError(f"chat template '{spec.name}': the generation prompt does not end where "
                             f"assistant turn {k} begins")
        chars["answers"].append((len(start), len(end)))
    content_at = first_turn.rfind(messages[0]["content"])
    if content_at < 0:
        raise ValueError(f"chat template '{spec.name}' alters the user message text; spans cannot be located")
    for name, (start, end) in segments.items():
        chars[name] = (content_at + start, content_at + end)
    return full, chars


def _tokenize(tokenizer, text: str) -> tuple[list[int], list[Span]]:
    if not getattr(tokenizer, "is_fast", False):
        raise ValueError(f"{type(tokenizer).__name__} is not a fast tokenizer: spans need offset mappings")
    encoding = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    return list(encoding["input_ids"]), [tuple(o) for o in encoding["offset_mapping"]]


def _token_span(offsets: list[Span], start: int, end: int) -> Span:
    """Smallest token range whose characters overlap [start, end); (0, 0) if none do."""
    inside = [i for i, (s, e) in enumerate(offsets) if s < end and e > start]
    return (inside[0], inside[-1] + 1) if inside else (0, 0)


def _nonempty(span: Span) -> Span | None:
    return span if span[1] > span[0] else None


def _clip(span: Span | None, length: int) -> Span | None:
    if span is None or span[0] >= length:
        return None
    return span[0], min(span[1], length)


def _image_token_id(tokenizer, image_token: str) -> int:
    token_id = tokenizer.convert_tokens_to_ids(image_token)
    if token_id is None or token_id == tokenizer.unk_token_id:
        raise ValueError(f"tokenizer has no '{image_token}' token; add it as a special token "
                         f"(the Llava config's image_token_index must be its id)")
    return token_id


def _image_position(ids: list[int], offsets: list[Span], image_token_id: int, chars: Span,
                    image_token: str) -> int:
    found = [i for i, t in enumerate(ids) if t == image_token_id]
    if len(found) != 1 or _token_span(offsets, *chars) != (found[0], found[0] + 1):
        raise ValueError(f"'{image_token}' did not tokenize to exactly one image token at its place "
                         f"(found at {found}); is it registered as a special token?")
    return found[0]


def _caption_prompt(tokenizer, spec: ChatTemplate, caption: str | None,
                    max_tokens: int) -> tuple[list[int], Span | None]:
    """Chat prefix + caption for the text-only forward of TGA (the caption stands where the image
    would be). Cut right after the caption: later tokens cannot change its causal hidden states."""
    if caption is None:
        return [], None
    rendered = render(tokenizer, spec, [[{"role": "user", "content": caption}]])[0]
    at = rendered.rfind(caption)
    if at < 0:
        raise ValueError(f"chat template '{spec.name}' alters the user message text; caption not found")
    ids, offsets = _tokenize(tokenizer, rendered[:at + len(caption)])
    return ids[:max_tokens], _clip(_nonempty(_token_span(offsets, at, at + len(caption))), max_tokens)
