"""Locate the safety layers of an LLM (or a Llava model's LLM) with the logit lens.

    python -m pipeline.analysis.safety_layers --model DIR --prompts FILE --out DIR \\
        [--refusal-words Sorry sorry I Unfortunately] [--top-k 5] [--device cpu] [MLflow options]

For each toxic text prompt (chat template + generation prompt), the next-token distribution p_l at
the last prompt position is read after every layer l: p_l = softmax(lm_head(final_norm(h_l))),
l = 0 (embedding output) … L. The start layer is the first l >= 1 whose change p_l - p_{l-1} has a
refusal token among its top-k (one whose probability rose); the end layer is the last l where a
refusal token is top-1. Means run over the samples where a layer was found; the others are counted.
Layers are hidden_states indices, the convention of `tga.layers`, so the suggested band can be
pasted into a training config.

Writes OUT/safety_layers.json (refusal tokens, per-sample layers, summary), OUT/safety_layers.png
and, when a band was found, OUT/tga_layers.yaml.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import sys
from pathlib import Path

import torch
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from pipeline.analysis.model_folder import LoadedModel, ModelFolderError, chat_prompt, load_model_folder, text_parts
from pipeline.analysis.report import add_mlflow_arguments, log_report, resolve_target
from pipeline.conventions import IMAGE_TOKEN
from pipeline.train.plots import save_png

DEFAULT_REFUSAL_WORDS = ("Sorry", "sorry", "I", "Unfortunately")
TOOL = "safety_layers"
_NEUTRAL_QUESTION = "Hello"  # any question: only the template's generation prompt matters


@dataclasses.dataclass(frozen=True)
class RefusalToken:
    word: str
    variant: str  # "no space" or "leading space": how the word follows the generation prompt
    token_id: int
    token: str  # the token as the tokenizer decodes it


@dataclasses.dataclass(frozen=True)
class SampleLayers:
    start_layer: int | None  # first l >= 1 whose change of distribution has a refusal token in top-k
    end_layer: int | None  # last l >= 1 where a refusal token is top-1
    best_rank: list[int]  # per layer 0..L: rank of the best refusal token, 1 = top-1
    refusal_probability: list[float]  # per layer 0..L: total probability of the refusal tokens
    top_token_ids: list[int]  # per layer 0..L: the lens' top-1 token


def read_prompts(path: str | Path) -> list[str]:
    """Prompts of a JSON list or JSONL file: strings, {"prompt"|"text": …}, or LLaVA records (their
    "text" twin if present, else the first human turn with the image placeholder removed)."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"{path}: no such prompts file")
    raw = path.read_text()
    try:
        items = json.loads(raw)
    except json.JSONDecodeError:
        items = None
    if not isinstance(items, list):
        try:
            items = [json.loads(line) for line in raw.splitlines() if line.strip()]
        except json.JSONDecodeError as err:
            raise ValueError(f"{path}: neither a JSON list nor JSONL (line {err.lineno}: {err.msg})") from None
    prompts = [_prompt_of(item, f"{path}: item {i}") for i, item in enumerate(items)]
    if not prompts:
        raise ValueError(f"{path}: no prompts")
    return prompts


def _prompt_of(item, where: str) -> str:
    if isinstance(item, str):
        text = item
    elif isinstance(item, dict) and isinstance(item.get("prompt", item.get("text")), str):
        text = item.get("prompt", item.get("text"))
    elif isinstance(item, dict) and isinstance(item.get("conversations"), list):
        human = [t.get("value") for t in item["conversations"] if isinstance(t, dict) and t.get("from") == "human"]
        if not human or not isinstance(human[0], str):
            raise ValueError(f"{where}: LLaVA record without a human turn")
        text = human[0].replace(IMAGE_TOKEN, "")
    else:
        raise ValueError(f"{where}: expected a string, an object with 'prompt' or 'text', or a LLaVA "
                         f"record with 'conversations'; got {str(item)[:80]!r}")
    if not text.strip():
        raise ValueError(f"{where}: empty prompt")
    return text.strip()


def refusal_tokens(tokenizer, generation_prompt: str, words: list[str]) -> list[RefusalToken]:
    """The first answer token of each word right after `generation_prompt`, with and without a
    space between them. A variant whose first token is only whitespace or merges with the prompt
    says nothing about the word and is left out; ids are unique. ValueError if none remain."""
    found: dict[int, RefusalToken] = {}
    for word in words:
        for variant, text in (("no space", word), ("leading space", " " + word)):
            enc = tokenizer(generation_prompt + text, add_special_tokens=False, return_offsets_mapping=True)
            answer = [(tid, start) for tid, (start, end) in zip(enc["input_ids"], enc["offset_mapping"])
                      if end > len(generation_prompt)]
            if not answer or answer[0][1] < len(generation_prompt):
                continue
            token_id = answer[0][0]
            token = tokenizer.decode([token_id])
            if not token.strip() or token_id == tokenizer.unk_token_id or token_id in found:
                continue
            found[token_id] = RefusalToken(word, variant, token_id, token)
    if not found:
        raise ValueError(f"refusal words {list(words)} resolve to no token of this tokenizer (each one's "
                         "first answer token is whitespace, unknown or merges with the prompt); give "
                         "other --refusal-words")
    return list(found.values())


@torch.no_grad()
def lens_distributions(loaded: LoadedModel, prompt: str) -> torch.Tensor:
    """Next-token probabilities at the last prompt position after each layer: [L+1, V] fp32."""
    norm, lm_head, num_layers = text_parts(loaded)
    device = lm_head.weight.device
    ids = loaded.tokenizer(prompt, add_special_tokens=False, return_tensors="pt")["input_ids"].to(device)
    out = loaded.model(input_ids=ids, output_hidden_states=True, logits_to_keep=1)
    # hidden_states[L] is already normalised in HF decoders (Llama, Mistral, …) but not in every
    # architecture; the model's own logits are lm_head(norm(h_L)) either way, never normalised twice.
    rows = [lm_head(norm(h[0, -1])) for h in out.hidden_states[:num_layers]]
    logits = torch.stack([*rows, out.logits[0, -1]]).float()
    return logits.softmax(dim=-1)


def locate(probs: torch.Tensor, refusal_ids: list[int], top_k: int) -> SampleLayers:
    """Start and end layers from one prompt's lens distributions [L+1, V] (pure)."""
    ids = torch.tensor(refusal_ids, device=probs.device)
    change = probs[1:] - probs[:-1]  # row l-1: p_l - p_{l-1}
    top_change = change.topk(min(top_k, probs.shape[1]), dim=-1)
    # a refusal token counts only where its probability rose: in a layer that changes nothing, the
    # top-k of an all-zero change is an arbitrary pick of tokens
    in_top_k = (torch.isin(top_change.indices, ids) & (top_change.values > 0)).any(dim=-1)
    top1 = probs.argmax(dim=-1)
    refusal_top1 = torch.isin(top1[1:], ids)
    best = probs[:, ids].max(dim=-1).values
    return SampleLayers(
        start_layer=_first(in_top_k.tolist()),
        end_layer=_last(refusal_top1.tolist()),
        best_rank=((probs > best[:, None]).sum(dim=-1) + 1).tolist(),
        refusal_probability=probs[:, ids].sum(dim=-1).tolist(),
        top_token_ids=top1.tolist(),
    )


def _first(flags: list[bool]) -> int | None:
    return next((i + 1 for i, flag in enumerate(flags) if flag), None)


def _last(flags: list[bool]) -> int | None:
    return next((i + 1 for i in reversed(range(len(flags))) if flags[i]), None)


def summarize(results: list[SampleLayers]) -> dict:
    """Means over samples where a layer was found, counts of those where none was, per-layer curves."""
    starts = [r.start_layer for r in results if r.start_layer is not None]
    ends = [r.end_layer for r in results if r.end_layer is not None]
    mean_start = sum(starts) / len(starts) if starts else None
    mean_end = sum(ends) / len(ends) if ends else None
    n_layers = len(results[0].best_rank)
    return {
        "samples": len(results),
        "start_found": len(starts), "start_not_found": len(results) - len(starts),
        "end_found": len(ends), "end_not_found": len(results) - len(ends),
        "mean_start_layer": mean_start, "mean_end_layer": mean_end,
        "suggested_layers": suggested_layers(mean_start, mean_end),
        "mean_best_rank": [sum(r.best_rank[l] for r in results) / len(results) for l in range(n_layers)],
        "mean_refusal_probability": [sum(r.refusal_probability[l] for r in results) / len(results)
                                     for l in range(n_layers)],
    }


def suggested_layers(mean_start: float | None, mean_end: float | None) -> list[int] | None:
    """Layers from the rounded mean start to the rounded mean end; None when there is no such band."""
    if mean_start is None or mean_end is None:
        return None
    first, last = math.floor(mean_start + 0.5), math.floor(mean_end + 0.5)  # halves round up
    return list(range(first, last + 1)) if last >= first else None


def config_snippet(summary: dict, model: str) -> str:
    layers = summary["suggested_layers"]
    return (f"# safety layers of {model}: mean start {summary['mean_start_layer']:.2f}, mean end "
            f"{summary['mean_end_layer']:.2f} over {summary['samples']} prompts (pipeline.analysis.safety_layers)\n"
            f"tga:\n  layers: [{', '.join(str(l) for l in layers)}]\n")


def figure(summary: dict, *, title: str) -> Figure:
    layers = list(range(len(summary["mean_best_rank"])))
    fig = Figure(figsize=(11, 4), dpi=100, layout="constrained")
    FigureCanvasAgg(fig)
    rank_ax, prob_ax = fig.add_subplot(1, 2, 1), fig.add_subplot(1, 2, 2)
    rank_ax.plot(layers, summary["mean_best_rank"], marker="o")
    rank_ax.set_yscale("log")
    rank_ax.set_ylim(max(10.0, max(summary["mean_best_rank"])) * 1.5, 0.8)  # rank 1 on top
    rank_ax.set_ylabel("best refusal-token rank (mean)")
    prob_ax.plot(layers, summary["mean_refusal_probability"], marker="o", color="tab:red")
    prob_ax.set_ylim(0, 1)
    prob_ax.set_ylabel("refusal-token probability (mean)")
    for ax in (rank_ax, prob_ax):
        ax.set_xlabel("layer (hidden_states index, 0 = embeddings)")
        ax.set_xticks(layers)
        if summary["suggested_layers"]:
            band = summary["suggested_layers"]
            ax.axvspan(band[0] - 0.5, band[-1] + 0.5, color="tab:green", alpha=0.15, label="suggested TGA layers")
        for key, style in (("mean_start_layer", "--"), ("mean_end_layer", ":")):
            if summary[key] is not None:
                ax.axvline(summary[key], color="black", linestyle=style, label=key.replace("_", " "))
    if prob_ax.get_legend_handles_labels()[0]:
        prob_ax.legend(fontsize=8, loc="upper left")
    fig.suptitle(title)
    return fig


def analyse(loaded: LoadedModel, prompts: list[str], words: list[str], top_k: int) -> dict:
    """The whole report as JSON-ready data."""
    tokens = refusal_tokens(loaded.tokenizer, chat_prompt(loaded, _NEUTRAL_QUESTION), words)
    ids = [t.token_id for t in tokens]
    samples = []
    results = []
    for index, prompt in enumerate(prompts):
        result = locate(lens_distributions(loaded, chat_prompt(loaded, prompt)), ids, top_k)
        results.append(result)
        samples.append({"index": index, "prompt": prompt, **dataclasses.asdict(result),
                        "top_tokens": [loaded.tokenizer.decode([t]) for t in result.top_token_ids]})
    return {"model": str(loaded.path), "num_layers": loaded.num_layers, "top_k": top_k,
            "refusal_words": list(words), "refusal_tokens": [dataclasses.asdict(t) for t in tokens],
            "summary": summarize(results), "samples": samples}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m pipeline.analysis.safety_layers",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True, type=Path, help="Llava export or causal LM folder")
    parser.add_argument("--prompts", required=True, type=Path, help="toxic prompts: JSON list or JSONL")
    parser.add_argument("--out", required=True, type=Path, help="output folder")
    parser.add_argument("--refusal-words", nargs="+", default=list(DEFAULT_REFUSAL_WORDS))
    parser.add_argument("--top-k", type=int, default=5, help="top-k of the change of distribution (start layer)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32")
    add_mlflow_arguments(parser)
    args = parser.parse_args(argv)
    if args.top_k < 1:
        parser.error("--top-k must be >= 1")
    try:
        prompts = read_prompts(args.prompts)
        loaded = load_model_folder(args.model, device=args.device,
                                   dtype=torch.bfloat16 if args.dtype == "bf16" else torch.float32)
        target = resolve_target(args, loaded)
        report = analyse(loaded, prompts, args.refusal_words, args.top_k)
    except (ModelFolderError, ValueError) as err:
        raise SystemExit(f"safety_layers error: {err}") from None

    summary = report["summary"]
    args.out.mkdir(parents=True, exist_ok=True)
    files = [args.out / "safety_layers.json", args.out / "safety_layers.png"]
    files[0].write_text(json.dumps(report, indent=2, ensure_ascii=False) + "\n")
    save_png(figure(summary, title=f"logit lens: {loaded.path.name} ({summary['samples']} prompts)"), files[1])
    print("refusal tokens: " + ", ".join(f"{t['token']!r} ({t['token_id']}, {t['word']}, {t['variant']})"
                                         for t in report["refusal_tokens"]))
    print(f"start layer: mean {summary['mean_start_layer']} over {summary['start_found']} prompts, "
          f"not found in {summary['start_not_found']}")
    print(f"end layer: mean {summary['mean_end_layer']} over {summary['end_found']} prompts, "
          f"not found in {summary['end_not_found']}")
    if summary["suggested_layers"]:
        snippet = config_snippet(summary, loaded.path.name)
        files.append(args.out / "tga_layers.yaml")
        files[-1].write_text(snippet)
        print(snippet, end="")
    else:
        print("no safety band found: no TGA layers suggested")
    metrics = {k: float(summary[k]) for k in ("samples", "start_not_found", "end_not_found",
                                               "mean_start_layer", "mean_end_layer") if summary[k] is not None}
    metrics.update({f"refusal_probability/layer_{l}": p
                    for l, p in enumerate(summary["mean_refusal_probability"])})
    params = {"model": str(loaded.path), "prompts": str(args.prompts), "top_k": str(args.top_k),
              "refusal_words": " ".join(args.refusal_words),
              "suggested_layers": str(summary["suggested_layers"])}
    log_report(target, name=TOOL, files=files, metrics=metrics, params=params)
    print(f"wrote {', '.join(str(f) for f in files)}")


if __name__ == "__main__":
    main(sys.argv[1:])
