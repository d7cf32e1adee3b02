"""Model FLOPs of a TGA step, from the model's configuration and the batch's real token counts.

MFU = these FLOPs per second / (ranks × the accelerator's peak). The count is what the step has to
compute, not what a 6N rule of thumb says: a matmul costs 2 FLOPs per weight per token forward,
backward costs 2 more for the input gradients and 2 more for the weight gradients of weights that
train. So a frozen LLM that only passes gradients through to the projector (stage 1) costs 4N per
token, a training one (stage 2) 6N; the frozen vision tower has no backward at all. Causal attention
adds 2·L·d·n² per sequence of n tokens forward (QKᵀ and AV, half the square), times 2 more for its
input gradients. Padding is not counted: it is work, not model FLOPs. Activation recomputation is
not counted either (MFU, not HFU). The TGA text forward is a no-grad forward over the caption tokens.
"""
from __future__ import annotations

import re
from dataclasses import dataclass

import torch

from pipeline.model.lora import is_lora_parameter

# Dense bf16 tensor-core TFLOP/s per device, from the vendor data sheets (their headline numbers
# are with 2:4 sparsity: twice these). A key matches the name torch reports ("NVIDIA H100 PCIe",
# "NVIDIA A100-SXM4-80GB", "NVIDIA GH200 480GB") when each of its words is a whole word of the name,
# so "H200" is not "GH200", "A10" not "A10G" or "A100", "H20" not "H200"; the first match wins, so a
# specific part comes before its family.
_PEAK_TFLOPS = (
    ("H100 PCIe", 756.0), ("H100 NVL", 835.0), ("H100", 989.0),   # H100 SXM: "NVIDIA H100 80GB HBM3"
    ("H800 PCIe", 756.0), ("H800", 989.0),
    ("H200 NVL", 835.0), ("H200", 989.0), ("GH200", 989.0), ("H20", 148.0),
    ("A100", 312.0), ("A800", 312.0),                              # SXM4 and PCIe, 40 and 80 GB
    ("B200", 2250.0), ("GB200", 2500.0),
    ("L40S", 362.0), ("L40", 181.0), ("L4", 121.0), ("A10", 125.0),
)


@dataclass(frozen=True)
class StepFlops:
    llm_params: int        # language model matmul weights (embedding lookup excluded, lm_head included)
    llm_layers: int
    llm_hidden: int
    llm_trains: bool       # the LLM's own weights train (LoRA's adapters do not count: no weight grads of N)
    vision_params: int
    vision_layers: int
    vision_hidden: int
    vision_tokens: int     # patch tokens (+ class token) the tower runs per image
    projector_params: int
    lm_head_params: int = 0          # part of llm_params that runs only where the loss reads logits
    caption_layers: int | None = None  # decoder layers of the TGA caption forward (None: all)
    adapter_params: int = 0          # LoRA adapters (not in llm_params): they train on a frozen LLM

    @classmethod
    def of(cls, model: torch.nn.Module, caption_layers: int | None = None) -> StepFlops:
        """From a LlavaForConditionalGeneration (ZeRO-3 partitioned or not); `caption_layers`: how
        deep the caption forward runs (pipeline.train.step.CaptionTargets.depth)."""
        config = model.config
        text, vision = config.text_config, config.vision_config

        def count(module, skip=()):
            return sum(getattr(p, "ds_numel", p.numel()) for n, p in module.named_parameters()
                       if not any(s in n for s in skip) and not is_lora_parameter(n))

        llm = model.model.language_model
        adapters = {n for n, _ in llm.named_parameters() if is_lora_parameter(n)}
        embed = model.get_input_embeddings()
        lm_head = model.get_output_embeddings()
        tied = lm_head is not None and lm_head.weight is embed.weight
        llm_params = count(llm, skip=("embed_tokens",))
        head = 0
        if lm_head is not None:
            head = getattr(lm_head.weight, "ds_numel", lm_head.weight.numel()) if not tied else \
                getattr(embed.weight, "ds_numel", embed.weight.numel())
        llm_params += head
        return cls(
            llm_params=llm_params, llm_layers=text.num_hidden_layers, llm_hidden=text.hidden_size,
            # the base weights; under LoRA they are frozen (4N) and only the adapters train (6 per weight)
            llm_trains=any(p.requires_grad for n, p in llm.named_parameters() if n not in adapters),
            adapter_params=sum(getattr(p, "ds_numel", p.numel()) for n, p in llm.named_parameters() if n in adapters),
            vision_params=count(model.model.vision_tower, skip=("embeddings",)),
            vision_layers=vision.num_hidden_layers, vision_hidden=vision.hidden_size,
            vision_tokens=(vision.image_size // vision.patch_size) ** 2 + 1,
            projector_params=count(model.model.multi_modal_projector), lm_head_params=head,
            caption_layers=min(caption_layers, text.num_hidden_layers) if caption_layers else None)

    def step(self, seq_lens: list[int], images: int, caption_lens: list[int] = (),
             logit_positions: int | None = None) -> float:
        """FLOPs of one micro-step: sequences of `seq_lens` real tokens (image tokens included),
        `images` through the tower and projector, the no-grad caption forward over `caption_lens`
        (its `caption_layers`, no LM head); the LM head runs at `logit_positions` (the positions
        before a label, pipeline.train.step.next_token_targets; None: every token)."""
        llm_passes = 6 if self.llm_trains else 4  # 2 forward + 2 input grads (+ 2 weight grads)
        tokens = sum(seq_lens)
        body = self.llm_params - self.lm_head_params
        attention = 2 * self.llm_layers * self.llm_hidden * sum(n * n for n in seq_lens)
        head_tokens = tokens if logit_positions is None else logit_positions
        flops = llm_passes * (body * tokens + self.lm_head_params * head_tokens)
        flops += 6 * self.adapter_params * tokens
        flops += 3 * attention  # attention: forward + input grads
        vision_attention = 4 * self.vision_layers * self.vision_hidden * self.vision_tokens ** 2  # not causal
        flops += images * (2 * self.vision_params * self.vision_tokens + vision_attention)
        flops += 6 * self.projector_params * images * (self.vision_tokens - 1)
        depth = self.caption_layers or self.llm_layers
        flops += 2 * (body + self.adapter_params) * depth / self.llm_layers * sum(caption_lens)
        flops += 2 * depth * self.llm_hidden * sum(n * n for n in caption_lens)
        return float(flops)


def peak_flops_per_device(device: torch.device, override_tflops: float | None = None) -> float | None:
    """Peak dense bf16 FLOP/s of one device: the override, else by CUDA device name; None if unknown."""
    if override_tflops:
        return override_tflops * 1e12
    if device.type != "cuda":
        return None
    tflops = peak_tflops_of(torch.cuda.get_device_name(device))
    return None if tflops is None else tflops * 1e12


def peak_tflops_of(device_name: str) -> float | None:
    """Dense bf16 TFLOP/s of a CUDA device by its name; None for a device not in the table."""
    words = {word.lower() for word in re.split(r"[^A-Za-z0-9]+", device_name)}
    return next((tflops for key, tflops in _PEAK_TFLOPS if set(key.lower().split()) <= words), None)
