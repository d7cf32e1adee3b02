"""The command-line edge the eval tools share: model folder, eval data, retrieved texts, outputs.

Each tool (`dsr`, `ability`) adds its own options, then `prepare` checks everything that can be
wrong before the first generation: the data, the image paths, the model folder
(`load_model_folder`: tokenizer, processor, image token, chat template, hidden states), whether the
prompt carries retrieved text and, if so, that every eval sample has its retrieval.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
from pathlib import Path

import torch

from pipeline.analysis.model_folder import LoadedModel, load_model_folder
from pipeline.analysis.report import MlflowTarget, add_mlflow_arguments, resolve_target
from pipeline.eval.generation import ModelGenerator
from pipeline.eval.queries import EvalDataError, default_image_root, read_records
from pipeline.eval.retrieved import missing_ids, read_retrieved


def add_eval_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True, type=Path,
                        help="transformers Llava folder (python -m pipeline.export --format hf, or any LLaVA-format HF checkpoint)")
    parser.add_argument("--data", required=True, type=Path, help="eval records: LLaVA-format JSON array or JSONL")
    parser.add_argument("--out", required=True, type=Path, help="output folder (files in it are replaced)")
    parser.add_argument("--images", type=Path, default=None,
                        help="folder the records' 'image' paths are relative to (default: DATA_DIR/../images, "
                             "the tiny world's layout; DATA_DIR/images for a pipeline.eval.benchmarks folder)")
    parser.add_argument("--retrieved", type=Path, default=None,
                        help="retrieved texts of the eval images: the output_dir of stages.retrieval_join run on "
                             "--data (or one shard .tar, or JSON/JSONL of {id, retrieved})")
    parser.add_argument("--insert-retrieved", action=argparse.BooleanOptionalAction, default=None,
                        help="put 'Retrieved Text: {top-1}. ' before the image (default: as the model was "
                             "trained, from tga_training.json; without it: on when --retrieved is given)")
    parser.add_argument("--template", default="tokenizer",
                        help="chat template (pipeline/tga/templates.py); default: the folder's own, which for "
                             "our exports is the training template")
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=8, help="queries per generate call")
    parser.add_argument("--limit", type=int, default=None, help="only the first N records")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32")
    add_mlflow_arguments(parser)


@dataclasses.dataclass
class Prepared:
    loaded: LoadedModel
    generator: ModelGenerator
    records: list[dict]
    image_root: Path
    retrieved: dict[str, list[dict]] | None   # None: no retrieved text in the prompt
    target: MlflowTarget | None

    def params(self, args: argparse.Namespace) -> dict[str, str]:
        """What to record with the results: enough to rerun the evaluation."""
        return {"model": str(self.loaded.path), "data": str(args.data), "images": str(self.image_root),
                "retrieved": str(args.retrieved) if self.retrieved is not None else "none",
                "insert_retrieved": str(self.retrieved is not None), "template": args.template,
                "max_new_tokens": str(args.max_new_tokens), "samples": str(len(self.records))}


def prepare(args: argparse.Namespace) -> Prepared:
    """Everything the tool needs, or EvalDataError / ModelFolderError with the fix."""
    if args.limit is not None and args.limit < 1:
        raise EvalDataError("--limit must be >= 1")
    records = read_records(args.data)[:args.limit]
    image_root = args.images if args.images is not None else default_image_root(args.data)
    if args.images is None and (Path(args.data).parent / "benchmark.json").is_file():
        image_root = Path(args.data).parent / "images"  # a folder of python -m pipeline.eval.benchmarks
    if not image_root.is_dir():
        raise EvalDataError(f"{image_root}: image folder not found; pass --images (the folder the 'image' "
                            f"paths of {args.data} are relative to)")
    loaded = load_model_folder(args.model, require_llava=True, device=args.device,
                               dtype=torch.bfloat16 if args.dtype == "bf16" else torch.float32)
    insert = _insert_retrieved(args, loaded)
    retrieved = None
    if insert:
        retrieved = read_retrieved(args.retrieved)
        ids = [str(r["id"]) for r in records if r.get("image")]
        if any(i not in retrieved for i in ids):
            raise EvalDataError(missing_ids(args.retrieved, ids, retrieved))
    generator = ModelGenerator(loaded, template=args.template, max_new_tokens=args.max_new_tokens,
                               batch_size=args.batch_size)
    return Prepared(loaded, generator, records, image_root, retrieved, resolve_target(args, loaded))


def write_json(path: Path, value) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(value, indent=2, ensure_ascii=False) + "\n")
    return path


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows))
    return path


def _insert_retrieved(args: argparse.Namespace, loaded: LoadedModel) -> bool:
    trained = loaded.training.get("prompt", {}).get("insert_retrieved")
    insert = args.insert_retrieved
    if insert is None:
        insert = bool(trained) if trained is not None else args.retrieved is not None
    if insert and args.retrieved is None:
        why = ("the model was trained with retrieved text in the prompt (tga_training.json: "
               "prompt.insert_retrieved=true)" if trained else "--insert-retrieved was given")
        raise EvalDataError(f"{why}; pass --retrieved (the output of `python -m stages.retrieval_join` run "
                            f"on {args.data}) or --no-insert-retrieved to evaluate without it")
    if not insert and args.retrieved is not None:
        raise EvalDataError(f"--retrieved {args.retrieved} is given, but the prompt carries no retrieved text "
                            "(the model was trained without it, or --no-insert-retrieved); pass "
                            "--insert-retrieved to insert it anyway, or drop --retrieved")
    return insert
