"""Tokenizers of the tiny world.

- The LLM tokenizer: a byte-level BPE trained on the world's text, with llama-2 special tokens and
  chat template, so prompt building and span finding run the same code as for Llama/Mistral.
  Byte level means decode(encode(text)) == text for any text, which span checks rely on.
- The CLIP tokenizer: OpenAI's CLIP BPE, rebuilt from the vocabulary file that ships with
  `clip-anytorch`. clip-retrieval's `hf_clip:` loader tokenizes text with OpenAI's BPE, not with
  the folder's tokenizer, so the tiny CLIP must use exactly OpenAI's ids (vocab 49408, 77 positions).
"""
from __future__ import annotations

import gzip
import importlib.util
import json
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import CLIPTokenizer, PreTrainedTokenizerFast

BOS, EOS, UNK, PAD, IMAGE = "<s>", "</s>", "<unk>", "<pad>", "<image>"
SPECIAL_TOKENS = [UNK, BOS, EOS, PAD, IMAGE]
MAX_LENGTH = 512  # = max_position_embeddings of the tiny LLM

# llama-2 chat format: `<s>[INST] <<SYS>>\n{system}\n<</SYS>>\n\n{user} [/INST] {assistant} </s>`, one
# `<s>[INST] ... [/INST]` per user turn; the system prompt is optional and joins the first turn.
# With add_generation_prompt the prompt already ends where the assistant starts, as in llama-2.
CHAT_TEMPLATE = (
    "{% if messages[0]['role'] == 'system' %}"
    "{% set system_message = messages[0]['content'] %}{% set loop_messages = messages[1:] %}"
    "{% else %}{% set system_message = none %}{% set loop_messages = messages %}{% endif %}"
    "{% for message in loop_messages %}"
    "{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}"
    "{% endif %}"
    "{% if loop.index0 == 0 and system_message is not none %}"
    "{% set content = '<<SYS>>\\n' + system_message + '\\n<</SYS>>\\n\\n' + message['content'] %}"
    "{% else %}{% set content = message['content'] %}{% endif %}"
    "{% if message['role'] == 'user' %}{{ bos_token + '[INST] ' + content + ' [/INST]' }}"
    "{% elif message['role'] == 'assistant' %}{{ ' ' + message['content'] + ' ' + eos_token }}"
    "{% endif %}"
    "{% endfor %}"
)
# Literal pieces of the template and the TGA prompt, so the BPE learns them as units.
TEMPLATE_TEXT = ["[INST] <<SYS>>\n", "\n<</SYS>>\n\n", " [/INST] ", "Retrieved Text: "]


def train_llm_tokenizer(texts: list[str], vocab_size: int = 3000) -> PreTrainedTokenizerFast:
    """Byte-level BPE on `texts`; adds `<s>` in front like Llama (never `</s>`)."""
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),  # every byte: no text is out of vocabulary
        show_progress=False,
    )
    # In a chat every turn follows a space (`[/INST] {answer}`), and byte-level BPE keeps the space
    # on the word: learn each text also with a leading space, or " Sorry" would be " " + "Sorry".
    tokenizer.train_from_iterator(texts + [" " + t for t in texts] + TEMPLATE_TEXT, trainer)
    tokenizer.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A {BOS} $B", special_tokens=[(BOS, tokenizer.token_to_id(BOS))]
    )
    wrapped = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        bos_token=BOS, eos_token=EOS, unk_token=UNK, pad_token=PAD,
        additional_special_tokens=[IMAGE],
        clean_up_tokenization_spaces=False,  # cleanup would break exact round trips (" ." -> ".")
        model_max_length=MAX_LENGTH,
        padding_side="right",
    )
    wrapped.chat_template = CHAT_TEMPLATE
    return wrapped


# --- OpenAI CLIP BPE -------------------------------------------------------------------------

CLIP_VOCAB_SIZE = 49408
CLIP_CONTEXT_LENGTH = 77
_BPE_FILE = "bpe_simple_vocab_16e6.txt.gz"


def openai_bpe_file() -> Path:
    """The BPE merges file of `clip-anytorch`, found without importing the package (its imports
    pull in torchvision, which the main environment does not have)."""
    spec = importlib.util.find_spec("clip")
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    for location in locations:
        path = Path(location) / _BPE_FILE
        if path.is_file():
            return path
    raise FileNotFoundError(
        f"OpenAI's CLIP vocabulary ({_BPE_FILE}) was not found: it ships with the `clip-anytorch` "
        "package, which `make env` installs into the main environment (pip install --no-deps "
        "clip-anytorch==2.6.0). Run `make env`."
    )


def _bytes_to_unicode() -> dict[int, str]:
    """OpenAI's reversible byte -> printable character map (simple_tokenizer.bytes_to_unicode)."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    chars = printable[:]
    extra = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            chars.append(256 + extra)
            extra += 1
    return dict(zip(printable, map(chr, chars)))


def openai_clip_vocab(bpe_file: Path) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """(vocab, merges) exactly as OpenAI's SimpleTokenizer builds them: 49408 ids."""
    lines = gzip.open(bpe_file).read().decode("utf-8").split("\n")
    merges = [tuple(line.split()) for line in lines[1 : 49152 - 256 - 2 + 1]]
    byte_chars = list(_bytes_to_unicode().values())
    tokens = byte_chars + [c + "</w>" for c in byte_chars] + ["".join(m) for m in merges]
    tokens += ["<|startoftext|>", "<|endoftext|>"]
    if len(tokens) != CLIP_VOCAB_SIZE:
        raise ValueError(f"{bpe_file}: built {len(tokens)} CLIP tokens, expected {CLIP_VOCAB_SIZE}")
    return {token: i for i, token in enumerate(tokens)}, merges


def build_clip_tokenizer(vocab: dict[str, int], merges: list[tuple[str, str]]) -> CLIPTokenizer:
    return CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=CLIP_CONTEXT_LENGTH)


def write_clip_vocab_files(folder: Path, vocab: dict[str, int], merges: list[tuple[str, str]]) -> None:
    """vocab.json + merges.txt in the layout of the Hub's openai/clip-* repos, next to tokenizer.json,
    so tools that read the slow-tokenizer files (or older transformers) find them too."""
    (folder / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False))
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(" ".join(m) for m in merges) + "\n")
