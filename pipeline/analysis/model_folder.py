"""Load a model folder for analysis and evaluation, or refuse it with a message that says the fix.

Accepted: a transformers Llava folder (`python -m pipeline.export --format hf` output, or any
LLaVA-format HF checkpoint) and a plain causal LM folder (safety layers are located on the LLM
before any training). Everything the tools rely on is checked here, once, at the boundary: the
config, tokenizer/processor, the image token, a chat template, and that a forward returns one
hidden state per decoder layer plus the embedding output. Deeper code assumes a valid folder.
"""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import torch
from transformers import (AutoConfig, AutoModelForCausalLM, AutoProcessor, AutoTokenizer,
                          LlavaForConditionalGeneration, LlavaProcessor, PreTrainedTokenizerBase)
from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING

TRAINING_FILE = "tga_training.json"  # written by pipeline.export for folders exported from our runs
_NORM_NAMES = ("norm", "final_layernorm", "final_layer_norm", "ln_f")


class ModelFolderError(ValueError):
    """A model folder the analysis tools cannot use; the message names the folder and the fix."""


@dataclasses.dataclass
class LoadedModel:
    path: Path
    model: torch.nn.Module  # eval mode: LlavaForConditionalGeneration or a causal LM
    tokenizer: PreTrainedTokenizerBase
    processor: LlavaProcessor | None  # None for a text-only LM
    is_llava: bool
    num_layers: int  # decoder layers of the language model; hidden_states has num_layers + 1
    training: dict[str, Any]  # DIR/tga_training.json, {} for folders not exported from our runs


def load_model_folder(path: str | Path, *, require_llava: bool = False, device: str = "cpu",
                      dtype: torch.dtype = torch.float32) -> LoadedModel:
    """Load `path` in eval mode, or raise ModelFolderError naming the folder and what to change."""
    check_device(device)
    path = Path(path)
    if not (path / "config.json").is_file():
        raise ModelFolderError(f"{path}: no config.json; pass a transformers model folder "
                               "(e.g. the output of `python -m pipeline.export --format hf`)")
    config = _config(path)
    is_llava = config.model_type == "llava"
    if require_llava and not is_llava:
        raise ModelFolderError(f"{path}: model_type '{config.model_type}' is not a Llava model; this tool "
                               "needs images (export the run with `python -m pipeline.export --format hf`)")
    if not is_llava and type(config) not in MODEL_FOR_CAUSAL_LM_MAPPING:  # registered ones count too
        raise ModelFolderError(f"{path}: unsupported model_type '{config.model_type}'; expected 'llava' "
                               "or a causal language model (llama, mistral, …)")
    tokenizer, processor = _tokenizer_and_processor(path, is_llava)
    model = _model(path, is_llava, device, dtype)
    _check_vocabulary(path, tokenizer, model)
    if is_llava:
        _check_image_token(path, processor, model.config)
    _check_chat_template(path, tokenizer)
    num_layers = _text_config(model.config).num_hidden_layers
    _check_hidden_states(path, model, num_layers, device)
    training_file = path / TRAINING_FILE
    training = json.loads(training_file.read_text()) if training_file.is_file() else {}
    return LoadedModel(path, model, tokenizer, processor, is_llava, num_layers, training)


def check_device(device: str) -> None:
    """`--device` names a device this machine has, before any model is loaded."""
    try:
        kind = torch.device(device).type
    except RuntimeError:
        raise ModelFolderError(f"--device {device}: not a torch device; use cpu, cuda or cuda:N") from None
    if kind == "cuda" and not torch.cuda.is_available():
        build = "a CPU-only build" if torch.version.cuda is None else f"built for CUDA {torch.version.cuda}"
        raise ModelFolderError(f"--device {device}: torch {torch.__version__} ({build}) sees no CUDA GPU "
                               "here; run on a GPU node or pass --device cpu")


def language_model(loaded: LoadedModel) -> torch.nn.Module:
    """The decoder stack (embeddings, layers, final norm) without the LM head."""
    model = loaded.model
    return model.model.language_model if loaded.is_llava else model.get_decoder()


def text_parts(loaded: LoadedModel) -> tuple[torch.nn.Module, torch.nn.Module, int]:
    """(final norm, lm_head, decoder layer count): what the logit lens applies to a hidden state."""
    decoder = language_model(loaded)
    for name in _NORM_NAMES:
        norm = getattr(decoder, name, None)
        if isinstance(norm, torch.nn.Module):
            return norm, loaded.model.get_output_embeddings(), loaded.num_layers
    raise ModelFolderError(f"{loaded.path}: the language model ({type(decoder).__name__}) has no final norm "
                           f"under any of the names {', '.join(_NORM_NAMES)}; the logit lens needs one")


def chat_prompt(loaded: LoadedModel, question: str) -> str:
    """One user turn through the folder's own chat template, ending where the answer begins."""
    messages = [{"role": "user", "content": question}]
    return loaded.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


def _config(path: Path):
    try:
        return AutoConfig.from_pretrained(path)
    except (ValueError, KeyError, OSError) as err:
        raise ModelFolderError(f"{path}: config.json cannot be read by transformers ({err}); "
                               "expected a Llava or causal LM config") from None


def _text_config(config):
    return config.get_text_config()


def _tokenizer_and_processor(path: Path, is_llava: bool):
    try:
        tokenizer = AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError, TypeError) as err:
        raise ModelFolderError(f"{path}: no usable tokenizer ({type(err).__name__}: {err}); save the "
                               "tokenizer the model was trained with into the folder") from None
    if not getattr(tokenizer, "is_fast", False):
        raise ModelFolderError(f"{path}: {type(tokenizer).__name__} is not a fast tokenizer; token spans "
                               "need offset mappings (save a tokenizer.json)")
    if not is_llava:
        return tokenizer, None
    try:
        processor = AutoProcessor.from_pretrained(path)
    except (OSError, ValueError, TypeError) as err:
        raise ModelFolderError(f"{path}: no usable Llava processor ({type(err).__name__}: {err}); "
                               "save a LlavaProcessor (processor_config.json + image processor) "
                               "into the folder") from None
    if not isinstance(processor, LlavaProcessor):
        raise ModelFolderError(f"{path}: the processor is a {type(processor).__name__}, not a "
                               "LlavaProcessor; save the LlavaProcessor the model was trained with")
    return processor.tokenizer, processor


def _model(path: Path, is_llava: bool, device: str, dtype: torch.dtype) -> torch.nn.Module:
    cls = LlavaForConditionalGeneration if is_llava else AutoModelForCausalLM
    try:
        model = cls.from_pretrained(path, dtype=dtype, attn_implementation="sdpa")
    except (OSError, ValueError, RuntimeError) as err:
        raise ModelFolderError(f"{path}: the weights cannot be loaded ({type(err).__name__}: {err})") from None
    return model.to(device).eval()


def _check_vocabulary(path: Path, tokenizer, model) -> None:
    embeddings = model.get_input_embeddings().num_embeddings
    if len(tokenizer) > embeddings:
        raise ModelFolderError(f"{path}: the tokenizer has {len(tokenizer)} tokens but the model embeds only "
                               f"{embeddings}; the tokenizer does not belong to this model (save the "
                               "training tokenizer into the folder)")


def _check_image_token(path: Path, processor: LlavaProcessor, config) -> None:
    token = processor.image_token
    token_id = processor.tokenizer.convert_tokens_to_ids(token)
    if token not in processor.tokenizer.get_vocab() or token_id != config.image_token_id:
        raise ModelFolderError(f"{path}: the tokenizer does not map the image token '{token}' to the "
                               f"config's image_token_id {config.image_token_id} (got {token_id}); save "
                               "the tokenizer with the image token added as a special token")


def _check_chat_template(path: Path, tokenizer) -> None:
    if not getattr(tokenizer, "chat_template", None):
        raise ModelFolderError(f"{path}: the tokenizer has no chat template; prompts must be formatted as "
                               "in training (set tokenizer.chat_template and save it into the folder)")


def _check_hidden_states(path: Path, model, num_layers: int, device: str) -> None:
    token = torch.zeros((1, 1), dtype=torch.long, device=device)
    with torch.no_grad():
        try:
            out = model(input_ids=token, output_hidden_states=True)
        except (TypeError, ValueError, RuntimeError) as err:
            raise ModelFolderError(f"{path}: a 1-token forward with output_hidden_states=True failed "
                                   f"({type(err).__name__}: {err})") from None
    hidden = getattr(out, "hidden_states", None)
    if hidden is None or len(hidden) != num_layers + 1:
        got = "none" if hidden is None else len(hidden)
        raise ModelFolderError(f"{path}: the model returns {got} hidden states, expected {num_layers + 1} "
                               "(embedding output + one per decoder layer); the analysis tools need them all")
