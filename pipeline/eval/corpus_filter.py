"""A caption corpus without its toxic texts: the index of ablation (iv).

    python -m pipeline.eval.corpus_filter --captions FILE [--toxic-snippets FILE] --out OUT.parquet

The paper's ablation (iv) (docs/method.md) asks how much of the defence comes from toxic snippets
that a toxic image retrieves at test time. The index for that must lack them, but a corpus may carry them inline (the
tiny world's captions.parquet has `toxic: true` rows) as well as in the separate snippets file that
`caption_index` adds. This drops every row marked toxic and every row whose normalised text is one
of the snippets; the output is an ordinary corpus for `caption_index` with `toxic_snippets: null`.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.retrieval.corpus import Caption, CorpusError, normalize_text, read_captions


def without_toxic(captions: list[Caption], snippets: list[Caption]) -> tuple[list[Caption], int]:
    """(the captions that are neither marked toxic nor a snippet's text, number dropped)."""
    toxic_texts = {normalize_text(s.text) for s in snippets}
    kept = [c for c in captions if not c.toxic and normalize_text(c.text) not in toxic_texts]
    return kept, len(captions) - len(kept)


def write_corpus(captions: list[Caption], out: Path) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    rows = [{"caption_id": c.caption_id, "text": c.text, "source": c.source, "toxic": c.toxic} for c in captions]
    partial = out.with_name(out.name + ".partial")
    pq.write_table(pa.Table.from_pylist(rows), partial)
    partial.replace(out)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pipeline.eval.corpus_filter", description=__doc__.split("\n\n")[0])
    parser.add_argument("--captions", required=True, type=Path, help="corpus: parquet or jsonl (caption_id, text, [source], [toxic])")
    parser.add_argument("--toxic-snippets", type=Path, default=None, help="snippets whose texts are dropped too")
    parser.add_argument("--out", required=True, type=Path, help="output .parquet")
    args = parser.parse_args(argv)
    if args.out.suffix != ".parquet":
        parser.error("--out must be a .parquet file")
    try:
        captions = read_captions(args.captions)
        snippets = read_captions(args.toxic_snippets, toxic=True, require_ids=False) if args.toxic_snippets else []
        kept, dropped = without_toxic(captions, snippets)
        if not kept:
            raise CorpusError(f"{args.captions}: every caption is toxic; nothing would be left to index")
    except CorpusError as err:
        raise SystemExit(f"corpus_filter error: {err}") from None
    write_corpus(kept, args.out)
    print(f"corpus_filter: kept {len(kept)} of {len(captions)} captions, dropped {dropped} toxic -> {args.out}")
    return dropped


if __name__ == "__main__":
    main(sys.argv[1:])
