"""Evaluation of a transformers Llava folder: is it safe (DSR) and still good (ability)?

    python -m pipeline.eval.dsr      defense success rate on toxic images vs the same text (dsr.py)
    python -m pipeline.eval.ability  exact match / token F1 on held-out benign VQA (ability.py)
    python -m pipeline.eval.ablation one TGA ablation end to end: train, export, evaluate (ablation.py);
                                     --suite: all four, per seed, with results files and MLflow runs
                                     (ablation_results.py, ablation_tracking.py)
    python -m pipeline.eval.corpus_filter  a caption corpus without toxic texts (ablation iv's index)
    python -m pipeline.eval.benchmarks MM-SafetyBench, FigStep SafeBench, VLGuard downloads -> DSR
                                     records (benchmarks/: one reader per benchmark)
    python -m pipeline.eval.compare  several models' DSR results side by side, with intervals (compare.py)

Shared parts: eval records -> queries (queries.py), retrieved texts from the retrieval join
(retrieved.py), prompts built by the training code and greedy generation (generation.py), refusal
judges (judge.py) and the Llama Guard judge (llama_guard.py), DSR's numbers (dsr_summary.py) with
Wilson intervals and Cohen's kappa (stats.py), the common command line (cli.py).
docs/evaluation.md explains the whole.
"""
