"""LoRA on the LLM of a Llava model, through peft: injected in place, merged for the export.

The adapters are injected into transformers' `LlavaForConditionalGeneration` itself (peft's
`get_peft_model` mutates the model it wraps), so the model that trains stays a Llava: the training step, the
TGA caption forward (which then runs with the adapters, as TGA needs the *current* model's
targets), DeepSpeed and the checkpoint all see the same class and the same module paths, with
`.base_layer` / `.lora_A.default` / `.lora_B.default` under every adapted linear. Only the LLM's
linears are targeted; the projector trains fully, as LLaVA's LoRA recipe does, and the vision tower
stays frozen.
"""
from __future__ import annotations

import dataclasses
import re

import torch

# Llama/Mistral/Qwen-style decoder linears: attention and MLP (LLaVA's finetune_lora.sh adapts all).
LLAMA_LINEARS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
_LLM_PREFIX = "model.language_model."


@dataclasses.dataclass(frozen=True)
class LoraConfig:
    rank: int = 128                 # LLaVA-1.5's finetune_lora.sh: r=128, alpha=256
    alpha: int = 256
    dropout: float = 0.05
    target_modules: list[str] = dataclasses.field(default_factory=lambda: list(LLAMA_LINEARS))
    # LLM modules that train fully and travel with the adapter (e.g. lm_head after adding tokens)
    modules_to_save: list[str] = dataclasses.field(default_factory=list)

    def __post_init__(self):
        if self.rank < 1 or self.alpha < 1:
            raise ValueError(f"lora.rank and lora.alpha must be >= 1, got {self.rank}, {self.alpha}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"lora.dropout must be in [0, 1), got {self.dropout}")
        if not self.target_modules:
            raise ValueError("lora.target_modules: name at least one linear of the LLM (e.g. q_proj)")

    def peft_config(self):
        from peft import LoraConfig as PeftLoraConfig

        names = "|".join(re.escape(name) for name in self.target_modules)
        return PeftLoraConfig(
            r=self.rank, lora_alpha=self.alpha, lora_dropout=self.dropout, bias="none",
            # a full-match pattern: only the LLM's linears, never the vision tower's q/k/v projections
            target_modules=rf"{re.escape(_LLM_PREFIX)}.*\.({names})",
            modules_to_save=list(self.modules_to_save) or None)


def add_lora(model: torch.nn.Module, cfg: LoraConfig):
    """Inject the adapters into `model` in place; returns peft's `PeftModel` around it (for the
    export: `merge_and_unload()`, `save_pretrained()`). Training keeps using `model` itself.
    Afterwards only the adapters (and `modules_to_save`) require grad: call the freeze after this."""
    from peft import get_peft_model

    # autocast_adapter_dtype=False: the adapters take the base layers' dtype (bf16 beside a bf16
    # model). peft's default upcasts them to fp32, and ZeRO-3 refuses a model of mixed dtypes at
    # deepspeed.initialize; its optimizer keeps the fp32 master weights of what trains anyway.
    tuner = get_peft_model(model, cfg.peft_config(), autocast_adapter_dtype=False)
    adapted = [name for name, module in model.named_modules() if hasattr(module, "lora_A")]
    if not adapted:
        raise ValueError(f"lora.target_modules {cfg.target_modules} match no linear of the LLM "
                         f"(modules under {_LLM_PREFIX}); for a Llama-style LLM use {LLAMA_LINEARS}")
    return tuner


def is_lora_parameter(name: str) -> bool:
    return ".lora_A." in name or ".lora_B." in name or ".modules_to_save." in name


def trainable_parameters(model: torch.nn.Module) -> int:
    """Elements that train (whole tensors under ZeRO-3, where a rank holds a partition)."""
    return sum(getattr(p, "ds_numel", p.numel()) for p in model.parameters() if p.requires_grad)
