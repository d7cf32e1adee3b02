"""Caption index and retrieval join: the data side of TGA (see docs/retrieval.md).

caption_index:  corpus.py → clip_env.py (clip-retrieval inference, autofaiss) → build.py → index.py
retrieval_join: pack.py (a) → clip_env.py + embeddings.py (b) → search.py (c) → join.py → parts.py (merge)
"""
