"""Assemble transformers' native `LlavaForConditionalGeneration` from a CLIP tower + a causal LM.

Nothing here knows how the model is trained: freezing is a policy applied by name, precision and
ZeRO-3 partitioning come from the caller (an active `HfDeepSpeedConfig` makes every
`from_pretrained` below load straight into partitions, so a 7B LLM is never materialised whole on
each rank).
"""
from __future__ import annotations

import contextlib
import dataclasses
import importlib.util
import logging
from pathlib import Path
from typing import Literal

import torch
from safetensors.torch import load_file, save_file
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoTokenizer,
    CLIPImageProcessor,
    CLIPVisionConfig,
    CLIPVisionModel,
    LlavaConfig,
    LlavaForConditionalGeneration,
    PreTrainedTokenizerBase,
)
from transformers.integrations import deepspeed as deepspeed_integration
from transformers.models.llava.modeling_llava import LlavaMultiModalProjector

from pipeline.config import InputPath
from pipeline.conventions import IMAGE_TOKEN
from pipeline.model import attention
from pipeline.model.lora import is_lora_parameter

log = logging.getLogger(__name__)

PROJECTOR_PREFIX = "multi_modal_projector."
# LLaVA's own projector files (mm_projector.bin) name the two linears by Sequential index.
_LLAVA_PROJECTOR_KEYS = {"model.mm_projector.0.": "linear_1.", "model.mm_projector.2.": "linear_2."}


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    llm: InputPath                       # causal LM folder (its tokenizer too, unless `tokenizer`)
    vision_tower: InputPath              # CLIP folder (CLIPModel or CLIPVisionModel)
    tokenizer: InputPath | None = None
    projector: InputPath | None = None   # stage-1 export (ours or LLaVA's mm_projector naming)
    # auto: torch_varlen (torch's own flash kernels, pipeline.model.attention) on CUDA in bf16/fp16,
    # or flash_attention_2 there when the optional flash-attn package imports; SDPA elsewhere
    attn_implementation: Literal["auto", "torch_varlen", "flash_attention_2", "sdpa", "eager"] = "auto"
    dtype: Literal["auto", "bf16", "fp32"] = "auto"
    gradient_checkpointing: bool = False
    pad_to_square: bool = True           # LLaVA-1.5: pad with the mean colour before resizing


@dataclasses.dataclass
class AssembledModel:
    model: LlavaForConditionalGeneration
    tokenizer: PreTrainedTokenizerBase
    image_processor: CLIPImageProcessor
    num_image_tokens: int
    attention: dict[str, str] = dataclasses.field(default_factory=dict)  # tower -> attention it runs


def resolve_attention(requested: str, device_type: str, dtype: torch.dtype) -> str:
    """On CUDA in bf16/fp16: flash_attention_2 when the optional flash-attn package really imports,
    else torch_varlen (the flash kernels of the installed torch); SDPA elsewhere. Never eager by
    default: TGA needs hidden states only, and attention maps would force eager (reference defect
    4). Flash kernels reject fp32, and a flash-attn built against another torch passes a
    `find_spec` check but fails at its first import (undefined symbol): it is imported here."""
    if requested == "torch_varlen" and not attention.available():
        raise ValueError(f"model.attn_implementation=torch_varlen needs torch >= 2.10 "
                         f"(torch.nn.attention.varlen); this is torch {torch.__version__}: use sdpa")
    if requested != "auto":
        return requested
    if device_type == "cuda" and dtype in (torch.bfloat16, torch.float16):
        if _flash_attn_imports():
            return "flash_attention_2"
        if attention.available():
            return attention.TORCH_VARLEN
    return "sdpa"


def packs_one_row(attn_implementation: str) -> bool:
    """Varlen kernels take a micro-batch as one packed row; dense attention prefers several short ones."""
    return attn_implementation in ("flash_attention_2", attention.TORCH_VARLEN)


def _flash_attn_imports() -> bool:
    if importlib.util.find_spec("flash_attn") is None:
        return False
    try:
        from flash_attn import flash_attn_func  # noqa: F401
    except (ImportError, OSError) as err:
        log.warning("flash-attn is installed but does not import (%s); using torch's own flash kernels", err)
        return False
    return True


def resolve_dtype(requested: str, device_type: str) -> torch.dtype:
    if requested == "bf16" or (requested == "auto" and device_type == "cuda"):
        return torch.bfloat16
    return torch.float32


def load_tokenizer(cfg: ModelConfig) -> PreTrainedTokenizerBase:
    tokenizer = AutoTokenizer.from_pretrained(cfg.tokenizer or cfg.llm)
    if IMAGE_TOKEN not in tokenizer.get_vocab():
        tokenizer.add_special_tokens({"additional_special_tokens": [IMAGE_TOKEN]})
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.unk_token or tokenizer.eos_token
    return tokenizer


def build_llava(cfg: ModelConfig, device_type: str = "cpu") -> AssembledModel:
    """Vision tower + projector + LLM as one `LlavaForConditionalGeneration` (HF format)."""
    dtype = resolve_dtype(cfg.dtype, device_type)
    attn = resolve_attention(cfg.attn_implementation, device_type, dtype)
    tokenizer = load_tokenizer(cfg)
    config = llava_config(cfg, image_token_index=tokenizer.convert_tokens_to_ids(IMAGE_TOKEN))
    llm = AutoModelForCausalLM.from_pretrained(cfg.llm, dtype=dtype, attn_implementation=attn)
    if len(tokenizer) > llm.get_input_embeddings().num_embeddings:
        llm.resize_token_embeddings(len(tokenizer))
    config.text_config = llm.config
    vision = CLIPVisionModel.from_pretrained(cfg.vision_tower, dtype=dtype, attn_implementation=attn)
    model = meta_llava(config)  # its towers are replaced by the loaded ones
    model.model.vision_tower = vision
    model.model.language_model = llm.model
    model.lm_head = llm.lm_head
    model.model.multi_modal_projector = LlavaMultiModalProjector(config).to(dtype)
    if cfg.projector is not None:
        load_projector(model, cfg.projector)
    model.config._attn_implementation = attn
    if cfg.gradient_checkpointing:
        checkpoint_decoder_layers(model)
    processor = CLIPImageProcessor.from_pretrained(cfg.vision_tower)
    towers = {"llm": llm.config._attn_implementation, "vision_tower": vision.config._attn_implementation}
    log.info("attention: LLM %s, vision tower %s (%s)", towers["llm"], towers["vision_tower"], dtype)
    return AssembledModel(model, tokenizer, processor, config.image_seq_length, towers)


def checkpoint_decoder_layers(model: LlavaForConditionalGeneration) -> None:
    """Recompute the LLM's decoder layers in the backward instead of keeping their activations.

    On the LLM only: enabled on the whole Llava, transformers also checkpoints the CLIP encoder and
    hooks the tower's patch embedding to make its output require grad (enable_input_require_grads
    on every sub-model with input embeddings), so the frozen tower would be recomputed and
    backpropagated (~1 TFLOP per 336-px image for ViT-L/14). Non-reentrant: with a frozen LLM
    (stage 1) the gradient still reaches the projector through the checkpointed layers.
    """
    llm = model.model.language_model
    kwargs = {"use_reentrant": False}
    if hasattr(llm, "activation_checkpointing_enable"):  # newer transformers; the other is its deprecated alias
        llm.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        llm.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)


def apply_freeze(model: LlavaForConditionalGeneration, trainable: list[str], lora: bool = False) -> list[str]:
    """Train only the named parts ("projector", "llm"), and with `lora` the LoRA adapters
    (pipeline.model.lora); the vision tower is always frozen. Returns the trainable names."""
    parts = {"projector": [model.model.multi_modal_projector],
             "llm": [model.model.language_model, model.lm_head]}
    unknown = set(trainable) - set(parts)
    if unknown:
        raise ValueError(f"unknown trainable part(s) {sorted(unknown)}; allowed: {sorted(parts)}")
    model.requires_grad_(False)
    for name in trainable:
        for module in parts[name]:
            module.requires_grad_(True)
    if lora:
        for name, param in model.named_parameters():
            if is_lora_parameter(name):
                param.requires_grad_(True)
    return [n for n, p in model.named_parameters() if p.requires_grad]


def projector_state_dict(full_state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The projector weights of a full (consolidated) Llava state dict, with our export names."""
    marker = "multi_modal_projector."
    out = {PROJECTOR_PREFIX + k.split(marker, 1)[1]: v.contiguous()
           for k, v in full_state.items() if marker in k}
    if not out:
        raise ValueError("state dict has no multi_modal_projector weights")
    return out


def projector_weights(projector: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The projector module's own state dict under our export names (its full weights: under ZeRO-3,
    call it inside a gather)."""
    return {PROJECTOR_PREFIX + k: v for k, v in projector.state_dict().items()}


def save_projector(state: dict[str, torch.Tensor], path: Path) -> None:
    save_file({k: v.detach().cpu().contiguous() for k, v in state.items()}, str(path),
              metadata={"format": "pt", "content": "llava multi_modal_projector (mlp2x_gelu)"})


def load_projector(model: LlavaForConditionalGeneration, path: Path) -> None:
    path = Path(path)
    state = load_file(str(path)) if path.suffix == ".safetensors" else torch.load(path, map_location="cpu")
    renamed = {}
    for key, value in state.items():
        for old, new in _LLAVA_PROJECTOR_KEYS.items():
            if key.startswith(old):
                key = new + key[len(old):]
        renamed[key.removeprefix(PROJECTOR_PREFIX)] = value
    projector = model.model.multi_modal_projector
    expected = set(projector.state_dict())
    if set(renamed) != expected:
        raise ValueError(f"{path}: projector keys {sorted(renamed)} do not match {sorted(expected)}")
    for key, value in renamed.items():
        if projector.state_dict()[key].shape != value.shape:
            raise ValueError(f"{path}: projector weight {key} has shape {tuple(value.shape)}, model "
                             f"expects {tuple(projector.state_dict()[key].shape)} (other LLM/tower?)")
    with torch.no_grad():
        projector.load_state_dict(renamed)


@contextlib.contextmanager
def _zero3_init_paused():
    """transformers wraps every sub-model construction in zero.Init while an HfDeepSpeedConfig is
    active; a meta-device skeleton must skip that (there is nothing to partition or initialise)."""
    active = deepspeed_integration._hf_deepspeed_config_weak_ref
    holder = active() if active is not None else None
    deepspeed_integration.unset_hf_deepspeed_config()
    try:
        yield
    finally:
        if holder is not None:
            deepspeed_integration.set_hf_deepspeed_config(holder)


def _vision_config(folder: Path) -> CLIPVisionConfig:
    config = AutoConfig.from_pretrained(folder)
    vision = getattr(config, "vision_config", config)
    if not isinstance(vision, CLIPVisionConfig):
        raise ValueError(f"{folder}: not a CLIP model folder (config is {type(config).__name__})")
    return vision


# -- The Llava config and skeleton from the folders' configs alone (also pipeline/train/memory.py's plan) --

def llava_config(cfg: ModelConfig, image_token_index: int | None = None) -> LlavaConfig:
    """LLaVA-1.5's layout of the two folders: an mlp2x_gelu projector over the patch tokens (CLS
    dropped) of the tower's second-to-last layer. `image_token_index`: the tokenizer's id of
    IMAGE_TOKEN (None: transformers' default, for plans that tokenize nothing)."""
    vision_config = _vision_config(cfg.vision_tower)
    token = {} if image_token_index is None else {"image_token_index": image_token_index}
    return LlavaConfig(
        vision_config=vision_config,
        text_config=AutoConfig.from_pretrained(cfg.llm),
        **token,
        image_seq_length=(vision_config.image_size // vision_config.patch_size) ** 2,
        projector_hidden_act="gelu",            # mlp2x_gelu
        vision_feature_layer=-2,
        vision_feature_select_strategy="default",  # drop CLS: patch tokens only
    )


def meta_llava(config: LlavaConfig) -> LlavaForConditionalGeneration:
    """The model on the meta device: shapes only, no memory, outside any ZeRO-3 init."""
    with torch.device("meta"), _zero3_init_paused():
        return LlavaForConditionalGeneration(config)
