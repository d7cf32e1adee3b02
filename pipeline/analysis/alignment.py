"""Per-layer cosine similarity between a Llava model's image and caption hidden states.

    python -m pipeline.analysis.alignment --model DIR --shards DIR --out DIR \\
        [--samples N] [--batch-size B] [--device cpu] [MLflow options]

For each shard sample with an image and a caption: the image prompt's hidden states are pooled over
the image tokens, the caption prompt's (the caption standing where the image would be, text only)
over the caption tokens, and the two are compared by cosine at every layer (hidden_states index
0 = embeddings … L). Samples are encoded exactly as training encodes them (SampleEncoder,
build_sample; prompt settings from the export's tga_training.json when present) and pooled and
compared with the functions of the TGA loss, so the number is the `cos_layer/<l>` that the stage-1/2
loops log — here for every layer and with its spread over samples.

Writes OUT/alignment.json (per layer mean/std, N, skipped samples by reason) and OUT/alignment.png.
"""
from __future__ import annotations

import argparse
import collections
import json
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from pipeline.analysis.model_folder import LoadedModel, ModelFolderError, load_model_folder
from pipeline.analysis.report import add_mlflow_arguments, log_report, resolve_target
from pipeline.conventions import Reject
from pipeline.data.batch import Batch, EncodedSample, SampleEncoder, collate
from pipeline.data.shards import SHARD_PREFIX, ShardFormatError, iter_shard
from pipeline.tga.loss import COS_EPS, pool_caption_targets, span_means
from pipeline.train.plots import save_png

TOOL = "alignment"
# Without tga_training.json: the folder's own chat template, no retrieved text (plain LLaVA).
DEFAULT_PROMPT = {"template": "tokenizer", "insert_retrieved": False, "max_tokens": 2048}


def prompt_settings(loaded: LoadedModel) -> dict:
    """How training built prompts for this model (template, insert_retrieved, max_tokens)."""
    return {**DEFAULT_PROMPT, **loaded.training.get("prompt", {})}


def sample_encoder(loaded: LoadedModel) -> SampleEncoder:
    settings = prompt_settings(loaded)
    image_processor = loaded.processor.image_processor
    return SampleEncoder(
        loaded.tokenizer, image_processor, num_image_tokens=loaded.model.config.image_seq_length,
        template=settings["template"], insert_retrieved=settings["insert_retrieved"],
        max_tokens=settings["max_tokens"],
        # our exports pad in the LlavaImageProcessor (do_pad); a plain CLIP processor gets
        # LLaVA-1.5's pad-to-square from the encoder instead
        pad_to_square=not getattr(image_processor, "do_pad", False))


def shard_paths(folder: str | Path) -> list[Path]:
    folder = Path(folder)
    paths = sorted(folder.glob(f"{SHARD_PREFIX}*.tar"))
    if not paths:
        raise ValueError(f"{folder}: no shards ({SHARD_PREFIX}*.tar); pass the retrieval join's output folder")
    return paths


def aligned_samples(shards: list[Path], encoder: SampleEncoder, limit: int,
                    include_toxic: bool = False) -> tuple[list[EncodedSample], dict]:
    """The first `limit` samples that have both an image and a caption target, and why others did not.
    Training gives samples flagged toxic (they retrieved a toxic text) no caption target;
    `include_toxic` measures them too, which is the point when the shards hold toxic eval pictures."""
    kept, skipped = [], collections.Counter()
    for path in shards:
        for sample in iter_shard(path):
            if include_toxic and sample.meta.get("toxic"):
                sample = sample._replace(meta={**sample.meta, "toxic": False})
            try:
                encoded = encoder(sample)
            except ValueError as err:  # a malformed conversation: counted, the rest still counts
                skipped[f"invalid: {err}"[:120]] += 1
                continue
            if isinstance(encoded, Reject):
                skipped[encoded.reason] += 1
            elif encoded.text.image_span is None:
                skipped["no_image"] += 1
            elif encoded.text.caption_span is None:
                skipped["no_caption"] += 1  # toxic samples have no caption target, as in training
            else:
                kept.append(encoded)
                if len(kept) == limit:
                    return kept, dict(skipped)
    return kept, dict(skipped)


def layer_cosines(image_hidden_states, image_spans: torch.Tensor, caption_hidden_states,
                  caption_spans: torch.Tensor, layers: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """cos(i_b^l, t_b^l) as the TGA loss computes it: ([L,B] fp32, valid [B])."""
    targets, caption_valid = pool_caption_targets(caption_hidden_states, caption_spans, layers)
    pooled, image_valid = span_means(image_hidden_states, image_spans, layers)
    cosines = F.cosine_similarity(pooled, targets.to(pooled.device), dim=-1, eps=COS_EPS)  # [L, B]
    return cosines, image_valid & caption_valid.to(image_valid.device)


@torch.no_grad()
def batch_cosines(loaded: LoadedModel, batch: Batch, layers: list[int]) -> torch.Tensor:
    """[L, B] cosines of one collated batch (every sample valid: see aligned_samples)."""
    llava = loaded.model.model  # LlavaModel: hidden states only, no logits
    batch = batch.to(loaded.model.device)
    image = llava(input_ids=batch.input_ids, attention_mask=batch.attention_mask,
                  pixel_values=batch.pixel_values.to(loaded.model.dtype), output_hidden_states=True)
    caption = llava(input_ids=batch.caption_input_ids, attention_mask=batch.caption_attention_mask,
                    output_hidden_states=True)
    cosines, valid = layer_cosines(image.hidden_states, batch.image_spans, caption.hidden_states,
                                   batch.caption_spans, layers)
    if not bool(valid.all()):
        raise RuntimeError("a sample without image or caption span reached the alignment forward")
    return cosines.cpu()


def measure(loaded: LoadedModel, samples: list[EncodedSample], batch_size: int) -> torch.Tensor:
    """[L+1, N] cosines at every hidden_states index for every sample."""
    layers = list(range(loaded.num_layers + 1))
    pad_id = loaded.tokenizer.pad_token_id
    pad_id = pad_id if pad_id is not None else (loaded.tokenizer.eos_token_id or 0)
    chunks = [batch_cosines(loaded, collate(samples[i:i + batch_size], pad_id), layers)
              for i in range(0, len(samples), batch_size)]
    return torch.cat(chunks, dim=1)


def summarize(cosines: torch.Tensor) -> dict:
    """Per layer mean and (population) std over samples of an [L+1, N] cosine table."""
    return {"samples": cosines.shape[1],
            "layers": {str(layer): {"mean": float(row.mean()), "std": float(row.std(unbiased=False))}
                       for layer, row in enumerate(cosines)}}


def figure(summary: dict, *, title: str) -> Figure:
    """Mean cosine per layer with a ±std band over samples."""
    layers = [int(layer) for layer in summary["layers"]]
    mean = [v["mean"] for v in summary["layers"].values()]
    std = [v["std"] for v in summary["layers"].values()]
    fig = Figure(figsize=(8, 4), dpi=100, layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    ax.plot(layers, mean, marker="o", color="tab:blue", label="mean")
    ax.fill_between(layers, [m - s for m, s in zip(mean, std)], [m + s for m, s in zip(mean, std)],
                    color="tab:blue", alpha=0.2, label="± std over samples")
    ax.set_ylim(min([0.0, *(m - s for m, s in zip(mean, std))]) - 0.05, 1.05)  # the scale of training's plots
    ax.set_xlabel("layer (hidden_states index, 0 = embeddings)")
    ax.set_ylabel("cosine(image, caption)")
    ax.set_title(title)
    ax.legend(fontsize=8, loc="lower right")
    return fig


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m pipeline.analysis.alignment",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True, type=Path, help="Llava folder (pipeline.export --format hf)")
    parser.add_argument("--shards", required=True, type=Path, help="folder of train-*.tar (retrieval join)")
    parser.add_argument("--out", required=True, type=Path, help="output folder")
    parser.add_argument("--samples", type=int, default=256, help="samples with image and caption to measure")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32")
    parser.add_argument("--include-toxic", action="store_true",
                        help="also measure samples flagged toxic (training aligns none of them): for eval shards "
                             "of toxic pictures")
    add_mlflow_arguments(parser)
    args = parser.parse_args(argv)
    if args.samples < 1 or args.batch_size < 1:
        parser.error("--samples and --batch-size must be >= 1")
    try:
        shards = shard_paths(args.shards)
        loaded = load_model_folder(args.model, require_llava=True, device=args.device,
                                   dtype=torch.bfloat16 if args.dtype == "bf16" else torch.float32)
        target = resolve_target(args, loaded)
        samples, skipped = aligned_samples(shards, sample_encoder(loaded), args.samples, args.include_toxic)
        if not samples:
            raise ValueError(f"{args.shards}: no sample with both an image and a caption "
                             f"(skipped: {skipped or 'none read'})")
        cosines = measure(loaded, samples, args.batch_size)
    except (ModelFolderError, ShardFormatError, ValueError) as err:
        raise SystemExit(f"alignment error: {err}") from None

    summary = summarize(cosines)
    report = {"model": str(loaded.path), "shards": str(args.shards), "prompt": prompt_settings(loaded),
              **summary, "skipped": skipped, "keys": [s.key for s in samples]}
    args.out.mkdir(parents=True, exist_ok=True)
    files = [args.out / "alignment.json", args.out / "alignment.png"]
    files[0].write_text(json.dumps(report, indent=2) + "\n")
    means = {int(layer): v["mean"] for layer, v in summary["layers"].items()}
    save_png(figure(summary, title=f"image–caption alignment: {loaded.path.name} "
                                   f"({summary['samples']} samples)"), files[1])
    for layer, values in summary["layers"].items():
        print(f"layer {layer:>3}: cos {values['mean']:.4f} ± {values['std']:.4f}")
    metrics = {"samples": float(summary["samples"]), **{f"cos_layer/{l}": m for l, m in means.items()}}
    params = {"model": str(loaded.path), "shards": str(args.shards), "samples": str(summary["samples"]),
              **{f"prompt.{k}": str(v) for k, v in prompt_settings(loaded).items()}}
    log_report(target, name=TOOL, files=files, metrics=metrics, params=params)
    print(f"wrote {files[0]}, {files[1]} ({summary['samples']} samples, skipped {skipped or 'none'})")


if __name__ == "__main__":
    main(sys.argv[1:])
