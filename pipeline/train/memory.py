"""A memory plan before the queue: the estimated peak GPU memory of a training config, per GPU.

    python -m pipeline.train.memory --config configs/stage1.yaml [--gpu h100-80gb] [--world-size 16]
        [--text-tokens N] [overrides...]

Built from the model folders' configs alone (the model is laid out on the meta device: no weights are
read), the DeepSpeed config and, when the shards are reachable, their manifest (sample lengths):

- model states: DeepSpeed's own ZeRO-3 estimator (`estimate_zero3_model_states_mem_needs`) for the
  parameters that train (bf16 weights and grads, fp32 master weights and Adam moments, the largest
  layer gathered), plus the bf16 partition of the frozen ones;
- activations the backward keeps, per token per layer (bf16). A linear layer keeps its input only when
  its weight trains: a frozen LLM (stage 1, LoRA) keeps what attention, the norms and SwiGLU need.
  With gradient checkpointing a layer keeps only its input, and one layer at a time is recomputed;
- the hidden states of every layer that TGA reads (`output_hidden_states`);
- the logits: bf16, their fp32 upcast and its gradient, over the vocabulary, at the positions the loss
  reads (answer tokens);
- the image features kept for the projector's backward, and a fixed reserve for the CUDA context,
  NCCL buffers and allocator fragmentation (a rule of thumb, not a measurement).

Two token counts per micro-batch: typical (mean sample length from the manifest, or the stage's
default text length plus the image tokens) and worst (every sample at prompt.max_tokens). It is an
estimate: `bench/gpu_check.sh` prints it beside the measured peak.
"""
from __future__ import annotations

import argparse
import dataclasses
import sys

from pipeline.config import ConfigError, parse_args
from pipeline.train.config import TrainConfig
from pipeline.train.plan import caption_targets_in_rows, llm_weights_train

GIB = 2**30
RESERVE = 3 * GIB        # CUDA context (~0.5 GiB), NCCL buffers, allocator fragmentation
# usable GiB as torch.cuda.get_device_properties reports them
GPUS = {"a100-40gb": 39.4, "a100-80gb": 79.2, "h100-80gb": 79.1, "h800-80gb": 79.1, "h200": 139.8,
        "gh200": 94.5, "l40s": 44.4, "a10g": 22.0}
# text tokens per sample (template, instruction, retrieved text, answer) without a readable manifest
DEFAULT_TEXT_TOKENS = {"stage1": 100, "stage2": 400}
ANSWER_SHARE = {"stage1": 0.08, "stage2": 0.5}  # share of a sample's tokens the LM loss reads
TEMPLATE_TOKENS = 30  # chat template and the retrieved-text frame around the manifest's text estimate
CAPTION_INPUT_TOKENS = 80  # TGA's caption input (chat prefix + caption) per image sample, Llama tokenizer


@dataclasses.dataclass(frozen=True)
class Shapes:
    hidden: int
    layers: int
    intermediate: int
    kv_hidden: int         # keys (= values) width: heads_kv × head_dim
    vocab: int
    image_tokens: int
    vision_hidden: int
    trainable: int         # parameters that train
    frozen: int
    largest_layer: int     # parameters of the largest single module (gathered whole by ZeRO-3)
    llm_trains: bool
    lora_inputs: int       # LoRA: input width summed over the adapted linears of one layer (0: no LoRA)
    captions_in_rows: bool = False  # TGA's caption inputs ride in the packed rows (pipeline/train/plan.py)


@dataclasses.dataclass
class Plan:
    rows: list[tuple[str, float, float, str]]  # (part, typical bytes, worst bytes, how)
    tokens: tuple[int, int]                    # (typical, worst) tokens per micro-batch
    capacity: float | None                     # bytes of the named GPU

    @property
    def totals(self) -> tuple[float, float]:
        return sum(r[1] for r in self.rows), sum(r[2] for r in self.rows)

    def fits(self) -> bool:
        return self.capacity is None or self.totals[0] <= self.capacity

    def text(self, gpu: str | None) -> str:
        lines = [f"{'part':34s} {'typical':>10s} {'worst':>10s}  how",
                 *(f"{name:34s} {typical / GIB:9.1f}G {worst / GIB:9.1f}G  {how}" for name, typical, worst, how in self.rows)]
        typical, worst = self.totals
        lines.append(f"{'total per GPU':34s} {typical / GIB:9.1f}G {worst / GIB:9.1f}G  "
                     f"(tokens per micro-batch: {self.tokens[0]} typical, {self.tokens[1]} worst)")
        if self.capacity is not None:
            verdict = "fits" if typical <= self.capacity else "DOES NOT FIT"
            lines.append(f"{gpu}: {self.capacity / GIB:.1f} GiB usable: typical {verdict}"
                         + ("; the worst case does not" if typical <= self.capacity < worst else ""))
        return "\n".join(lines)


def shapes(cfg: TrainConfig) -> Shapes:
    """The model's sizes from its folders' configs: a Llava laid out on the meta device, frozen and
    adapted as the run will be."""
    from pipeline.model.assemble import apply_freeze, llava_config, meta_llava
    from pipeline.model.lora import add_lora

    config = llava_config(cfg.model)
    text, vision = config.text_config, config.vision_config
    model = meta_llava(config)
    if cfg.lora is not None:
        add_lora(model, cfg.lora)
    apply_freeze(model, cfg.trainable, lora=cfg.lora is not None)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    largest = max(sum(p.numel() for p in m.parameters(recurse=False)) for m in model.modules())
    head_dim = getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads
    kv_heads = getattr(text, "num_key_value_heads", None) or text.num_attention_heads
    lora_inputs = 0
    if cfg.lora is not None:
        widths = {"q_proj": text.hidden_size, "k_proj": text.hidden_size, "v_proj": text.hidden_size,
                  "o_proj": text.hidden_size, "gate_proj": text.hidden_size, "up_proj": text.hidden_size,
                  "down_proj": text.intermediate_size}
        lora_inputs = sum(widths.get(name, text.hidden_size) for name in cfg.lora.target_modules)
    return Shapes(hidden=text.hidden_size, layers=text.num_hidden_layers, intermediate=text.intermediate_size,
                  kv_hidden=kv_heads * head_dim, vocab=text.vocab_size, image_tokens=config.image_seq_length,
                  vision_hidden=vision.hidden_size, trainable=trainable, frozen=total - trainable,
                  largest_layer=largest, llm_trains=llm_weights_train(cfg), lora_inputs=lora_inputs,
                  captions_in_rows=caption_targets_in_rows(cfg, model))


def layer_bytes_per_token(s: Shapes) -> int:
    """bf16 bytes one decoder layer keeps for the backward, per token (flash/SDPA attention: no
    attention matrix)."""
    h, i = s.hidden, s.intermediate
    kept = 2 * (2 * h + 2 * s.kv_hidden)   # attention's q, k, v and output (+ a small logsumexp)
    kept += 2 * 4 * h                      # the two RMSNorms keep their fp32 input
    kept += 2 * 3 * i                      # SwiGLU: silu's input, and both operands of the product
    if s.llm_trains:                       # weight gradients need each linear's input
        kept += 2 * (h + h + h + i)        # q/k/v input, o_proj input, gate/up input, down_proj input
    kept += 3 * s.lora_inputs              # LoRA: the dropout output (bf16) and its mask (bool) per adapter
    return kept


def sample_tokens(cfg: TrainConfig, s: Shapes, text_tokens: int | None) -> tuple[float, float]:
    """(mean tokens of a sample, share of samples with an image): from the manifests when they are
    readable (their n_tokens is a text estimate; + the template and the image tokens)."""
    from pipeline.data.sources import manifest_of, read_manifest

    if text_tokens is None:
        try:
            tables = [read_manifest(manifest_of(entry), ["n_tokens", "has_image"], cfg.loader.read_timeout_s)
                      for entry in cfg.datasets]
        except OSError:
            tables = []
        n = sum(t.num_rows for t in tables)
        if n:
            share = sum(sum(t.column("has_image").to_pylist()) for t in tables) / n
            text = sum(sum(t.column("n_tokens").to_pylist()) for t in tables) / n + TEMPLATE_TOKENS
            return text + share * s.image_tokens, share
    text = text_tokens if text_tokens is not None else DEFAULT_TEXT_TOKENS[cfg.stage]
    share = 1.0 if cfg.stage == "stage1" else 0.9
    return text + share * s.image_tokens, share


def plan(cfg: TrainConfig, world_size: int, gpu: str | None = None, text_tokens: int | None = None) -> Plan:
    from deepspeed.runtime.zero.stage3 import estimate_zero3_model_states_mem_needs

    from pipeline.train.engine import deepspeed_config

    s = shapes(cfg)
    ds = deepspeed_config(cfg, "cuda")
    zero = ds.get("zero_optimization", {})
    offload = zero.get("offload_optimizer", {}).get("device", "none") == "cpu"
    offload_params = zero.get("offload_param", {}).get("device", "none") == "cpu"
    _, states, _ = estimate_zero3_model_states_mem_needs(
        s.trainable, s.largest_layer, num_gpus_per_node=world_size, num_nodes=1,
        cpu_offload=offload, cpu_offload_params=offload_params)
    frozen = 0 if offload_params else 2 * s.frozen / world_size

    per_sample, image_share = sample_tokens(cfg, s, text_tokens)
    batch = cfg.loader.batch_size
    captions = int(batch * image_share * CAPTION_INPUT_TOKENS) if s.captions_in_rows else 0
    typical = int(batch * min(per_sample, cfg.prompt.max_tokens)) + captions
    worst = batch * cfg.prompt.max_tokens + captions
    in_rows = f"; {captions} caption tokens in the rows" if captions else ""
    checkpointing = cfg.model.gradient_checkpointing
    rows = [("model states (DeepSpeed estimator)", states, states,
             f"{s.trainable / 1e6:.1f}M trainable params over {world_size} GPUs"
             + (", optimizer offloaded" if offload else "")),
            ("frozen weights (bf16 partition)", frozen, frozen, f"{s.frozen / 1e9:.2f}B params / {world_size}")]
    per_layer = layer_bytes_per_token(s)
    hidden_states = (s.layers + 1) * 2 * s.hidden
    if checkpointing:
        rows.append(("activations (checkpointed)", typical * (hidden_states + per_layer),
                     worst * (hidden_states + per_layer),
                     f"every layer's input + one layer recomputed ({per_layer / 1024:.0f} KiB/token){in_rows}"))
    else:
        rows.append(("activations", typical * s.layers * per_layer, worst * s.layers * per_layer,
                     f"{per_layer / 1024:.0f} KiB per token per layer x {s.layers} layers{in_rows}"))
        rows.append(("hidden states for TGA", typical * hidden_states, worst * hidden_states,
                     f"{s.layers + 1} layers' outputs (output_hidden_states)"))
    answer = ANSWER_SHARE[cfg.stage]
    logit_bytes = s.vocab * (2 + 4 + 4)
    rows.append(("logits", (typical - captions) * answer * logit_bytes,
                 (worst - captions) * answer * logit_bytes,
                 f"bf16 + fp32 + grad over {s.vocab} tokens at ~{answer:.0%} of positions (the labelled ones)"))
    images = batch * image_share
    image_bytes = images * s.image_tokens * 2 * (s.vision_hidden + 2 * s.hidden)
    rows.append(("image features (projector)", image_bytes, batch * s.image_tokens * 2 * (s.vision_hidden + 2 * s.hidden),
                 f"{images:.0f} images x {s.image_tokens} patches: tower output + projector hidden"))
    rows.append(("CUDA context, NCCL, fragmentation", RESERVE, RESERVE, "rule of thumb"))
    capacity = GPUS[gpu] * GIB if gpu else None
    return Plan(rows, (typical, worst), capacity)


def main(argv: list[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(prog="python -m pipeline.train.memory", add_help=False)
    parser.add_argument("--gpu", choices=sorted(GPUS), default="h100-80gb")
    parser.add_argument("--world-size", type=int, default=8, help="GPUs the job runs on (ZeRO-3 shards over them)")
    parser.add_argument("--text-tokens", type=int, default=None,
                        help="text tokens per sample (default: the manifest's mean, else the stage's default)")
    args, rest = parser.parse_known_args(argv)
    try:
        cfg = parse_args(TrainConfig, rest, usage="[--gpu NAME] [--world-size N] [--text-tokens N]")
    except ConfigError as err:
        raise SystemExit(f"config error: {err}") from None
    try:
        result = plan(cfg, args.world_size, args.gpu, args.text_tokens)
    except (OSError, ValueError) as err:
        raise SystemExit(f"memory plan: {err}") from None
    print(f"[memory] {cfg.stage}: batch {cfg.loader.batch_size} per GPU, "
          f"{'packed' if cfg.loader.packing else 'padded'}, gradient checkpointing "
          f"{'on' if cfg.model.gradient_checkpointing else 'off'}, {args.world_size} GPUs")
    print(result.text(args.gpu))
    raise SystemExit(0 if result.fits() else 3)


if __name__ == "__main__":
    main()
