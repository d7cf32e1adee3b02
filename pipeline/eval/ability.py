"""General ability: exact match and token F1 of short answers on held-out benign VQA.

    python -m pipeline.eval.ability --model DIR --data FILE --out DIR [--retrieved DIR] [--images DIR]
        [--type-field NAME] [--max-new-tokens N] [--batch-size N] [--limit N] [MLflow options]

TGA must make a model safer without making it worse: this is the "good" half of "safe and good",
a small stand-in for LLaVA's VQA/captioning benchmarks that runs on the tiny world's held-out
scenes (eval/benign_vqa.json) and on any LLaVA-format file with reference answers. Each record's
first human turn is asked with its image (retrieved text inserted as in training when the model
was trained with it), greedily answered, and compared with its first gpt turn:

- exact match: the normalised answer equals the normalised reference;
- token F1: harmonic mean of token precision and recall between the two (SQuAD's metric).

Normalisation (SQuAD's): lower case, punctuation and the articles a/an/the removed, whitespace
collapsed. Scores are given overall and per question type (`question_type`, or --type-field).
Outputs in --out: samples.jsonl and summary.json, logged to MLflow like the other tools.
"""
from __future__ import annotations

import argparse
import re
import string
import sys
from collections import Counter

from pipeline.analysis.model_folder import ModelFolderError
from pipeline.analysis.report import log_report
from pipeline.eval.cli import add_eval_arguments, prepare, write_json, write_jsonl
from pipeline.eval.dsr import metric_name
from pipeline.eval.generation import Generate
from pipeline.eval.queries import EvalDataError, Query, first_turns, group_of, image_query
from pipeline.eval.retrieved import top_text

TOOL = "ability"
DEFAULT_TYPE_FIELDS = ("question_type", "category")
_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCTUATION = str.maketrans("", "", string.punctuation)


def normalize_answer(text: str) -> str:
    text = _ARTICLES.sub(" ", text.lower().translate(_PUNCTUATION))
    return " ".join(text.split())


def exact_match(prediction: str, reference: str) -> float:
    return float(normalize_answer(prediction) == normalize_answer(reference))


def token_f1(prediction: str, reference: str) -> float:
    predicted, expected = normalize_answer(prediction).split(), normalize_answer(reference).split()
    if not predicted or not expected:
        return float(predicted == expected)
    common = sum((Counter(predicted) & Counter(expected)).values())
    if common == 0:
        return 0.0
    precision, recall = common / len(predicted), common / len(expected)
    return 2 * precision * recall / (precision + recall)


def ability_queries(records: list[dict], *, type_fields: tuple[str, ...], image_root, source,
                    retrieved: dict[str, list[dict]] | None) -> list[Query]:
    """One image query per record; its first gpt turn is the reference answer."""
    queries = []
    for record in records:
        if first_turns(record, source)[1] is None:
            raise EvalDataError(f"{source}: record {record['id']!r} has no reference answer (a gpt turn after "
                                "the question)")
        hits = retrieved.get(str(record["id"]), []) if retrieved is not None else []
        queries.append(image_query(record, group=group_of(record, type_fields, source), image_root=image_root,
                                   retrieved_text=top_text(hits), source=source))
    return queries


def score_queries(queries: list[Query], generate: Generate) -> list[dict]:
    generations = generate(queries)
    if len(generations) != len(queries):
        raise RuntimeError(f"generate returned {len(generations)} answers for {len(queries)} queries")
    return [{"id": q.id, "question_type": q.group, "prompt": g.prompt, "response": g.response,
             "reference": q.reference, "exact_match": exact_match(g.response, q.reference),
             "token_f1": token_f1(g.response, q.reference)} for q, g in zip(queries, generations)]


def summarize(rows: list[dict]) -> dict:
    def scores(subset: list[dict]) -> dict:
        return {"exact_match": sum(r["exact_match"] for r in subset) / len(subset),
                "token_f1": sum(r["token_f1"] for r in subset) / len(subset), "n": len(subset)}

    types = sorted({r["question_type"] for r in rows})
    return {**scores(rows), "by_type": {t: scores([r for r in rows if r["question_type"] == t]) for t in types}}


def metrics_of(summary: dict) -> dict[str, float]:
    metrics = {k: summary[k] for k in ("exact_match", "token_f1")}
    for kind, values in summary["by_type"].items():
        metrics.update({f"{metric_name(kind)}/{k}": values[k] for k in ("exact_match", "token_f1")})
    return metrics


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(prog="python -m pipeline.eval.ability", description=__doc__.split("\n\n")[0])
    add_eval_arguments(parser)
    parser.add_argument("--type-field", action="append", default=None,
                        help=f"record field naming the question type (repeatable, first present wins; "
                             f"default: {', '.join(DEFAULT_TYPE_FIELDS)})")
    args = parser.parse_args(argv)
    try:
        setup = prepare(args)
        queries = ability_queries(setup.records, type_fields=tuple(args.type_field or DEFAULT_TYPE_FIELDS),
                                  image_root=setup.image_root, source=args.data, retrieved=setup.retrieved)
    except (EvalDataError, ModelFolderError, ValueError) as err:
        raise SystemExit(f"ability error: {err}") from None

    rows = score_queries(queries, setup.generator)
    summary = {**summarize(rows), "normalisation": "SQuAD: lower case, no punctuation, no a/an/the",
               "run": setup.params(args)}
    files = [write_jsonl(args.out / "samples.jsonl", rows), write_json(args.out / "summary.json", summary)]
    print(f"ability: exact match {summary['exact_match']:.3f}, token F1 {summary['token_f1']:.3f} over "
          f"{summary['n']} questions, {len(summary['by_type'])} types")
    log_report(setup.target, name=TOOL, files=files, metrics=metrics_of(summary), params=setup.params(args))
    print(f"wrote {', '.join(str(f) for f in files)}")
    return summary


if __name__ == "__main__":
    main(sys.argv[1:])
