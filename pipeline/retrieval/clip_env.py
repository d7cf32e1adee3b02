"""The only place that runs the retrieval environment: `clip-retrieval inference` and autofaiss.

clip-retrieval pins an older stack (numpy<2, transformers<5, webdataset<0.3) and lives in its own
virtualenv; `pipeline` never imports it and the two sides exchange only files. Every call here is
one subprocess whose output goes to a log file; a failure raises with the log's tail.

Arguments go through python-fire on the other side, which would turn "IVF256,Flat" into a tuple
and "{0..3}" into a set: string values are therefore passed as quoted Python literals.
"""
from __future__ import annotations

import json
import logging
import os
import subprocess
import time
from pathlib import Path
from typing import Literal

from .config import IndexBuildConfig, InferenceConfig

LOG_TAIL_LINES = 40
log = logging.getLogger(__name__)


class RetrievalEnvError(RuntimeError):
    """The retrieval environment is missing or one of its tools failed."""


def check_retrieval_python(python: Path) -> Path:
    python = Path(python)
    if not python.exists():
        raise RetrievalEnvError(
            f"retrieval environment not found: {python} does not exist. Build it with `make retrieval-env` "
            "(links .retrieval-venv), or point retrieval_python=... at a venv made from requirements/retrieval.txt")
    return python


def clip_model_argument(clip_model: str) -> str:
    """The model string clip-retrieval gets: a local `hf_clip:`/`open_clip:` folder made absolute
    (so the subprocess does not depend on its working directory); hub names pass unchanged."""
    prefix, sep, target = clip_model.partition(":")
    if not sep:
        return clip_model
    if Path(target).exists():
        return f"{prefix}:{Path(target).resolve()}"
    if target.startswith(("/", "./", "../")) or target.count("/") > 1:
        raise RetrievalEnvError(f"clip_model {clip_model!r}: folder {target} does not exist")
    return clip_model


def brace_pattern(paths: list[Path]) -> str:
    """`dir/prefix{000003..000007}.tar` for consecutively numbered tars (what clip-retrieval's
    webdataset reader expands); refuses gaps, so no tar is silently left out."""
    paths = [Path(p).resolve() for p in paths]
    if not paths:
        raise ValueError("no tars to run inference on")
    if len(paths) == 1:
        return str(paths[0])
    stems = [p.stem for p in paths]
    prefix = stems[0].rstrip("0123456789")
    width = len(stems[0]) - len(prefix)
    first = int(stems[0][len(prefix):])
    expected = [paths[0].parent / f"{prefix}{first + i:0{width}d}.tar" for i in range(len(paths))]
    if paths != expected:
        raise ValueError(f"tars are not consecutively numbered in one folder: {paths[0]} … {paths[-1]}")
    return str(paths[0].parent / f"{prefix}{{{stems[0][len(prefix):]}..{stems[-1][len(prefix):]}}}.tar")


def run_inference(python: Path, *, tars: list[Path], output_dir: Path, modality: Literal["text", "image"],
                  clip_model: str, samples_per_tar: int, cfg: InferenceConfig, log_path: Path) -> float:
    """CLIP embeddings of the `.txt` or `.jpg` members of `tars` into `output_dir`
    ({text,img}_emb/*.npy + metadata/*.parquet with our `.json` fields as columns). Returns seconds."""
    args = {
        "input_dataset": brace_pattern(tars),
        "output_folder": str(Path(output_dir).resolve()),
        "input_format": "webdataset",
        "enable_text": modality == "text",
        "enable_image": modality == "image",
        "enable_metadata": True,
        "clip_model": clip_model_argument(clip_model),
        "batch_size": cfg.batch_size,
        "num_prepro_workers": cfg.num_prepro_workers,
        "wds_number_file_per_input_file": samples_per_tar,
        "write_batch_size": cfg.rows_per_partition,
        "use_jit": False,
    }
    return _run([str(python), "-m", "clip_retrieval.cli", "inference", *_fire_args(args)], log_path,
                f"clip-retrieval inference ({modality}, {len(tars)} tar(s))", offline=_is_local(clip_model))


def build_index(python: Path, *, embeddings_dir: Path, index_dir: Path, cfg: IndexBuildConfig,
                log_path: Path) -> float:
    """autofaiss `build_index` on `embeddings_dir` → `index_dir/text.index` + `text.json`: what
    `clip-retrieval index` runs, plus the index type and memory-mappability it does not expose."""
    index_dir = Path(index_dir).resolve()
    args = {
        "embeddings": str(Path(embeddings_dir).resolve()),
        "index_path": str(index_dir / "text.index"),
        "index_infos_path": str(index_dir / "text.json"),
        "max_index_memory_usage": cfg.max_index_memory,
        "current_memory_available": cfg.current_memory,
        "should_be_memory_mappable": cfg.memory_mappable,
        "metric_type": "ip",
    }
    if cfg.index_key is not None:
        args["index_key"] = cfg.index_key
    if cfg.nb_cores is not None:
        args["nb_cores"] = cfg.nb_cores
    seconds = _run([str(python), "-m", "autofaiss.external.quantize", "build_index", *_fire_args(args)], log_path,
                   "autofaiss build_index", offline=True)
    # autofaiss logs its errors (e.g. memory budget too small) and still exits 0.
    missing = [name for name in ("text.index", "text.json") if not (index_dir / name).is_file()]
    if missing:
        raise RetrievalEnvError(f"autofaiss build_index wrote no {', '.join(missing)} in {index_dir}; "
                                f"see {log_path}:\n{_tail(log_path)}")
    return seconds


def _fire_args(args: dict) -> list[str]:
    return [f"--{name}={json.dumps(value) if isinstance(value, str) else value}" for name, value in args.items()]


def _is_local(clip_model: str) -> bool:
    return Path(clip_model.split(":", 1)[-1]).exists()


def _run(command: list[str], log_path: Path, what: str, offline: bool) -> float:
    log_path = Path(log_path)
    log_path.parent.mkdir(parents=True, exist_ok=True)
    # its output goes to a log file: tqdm bars there would be one redraw every 0.1 s
    env = dict(os.environ, WANDB_MODE="disabled", TOKENIZERS_PARALLELISM="false", TQDM_MININTERVAL="30")
    if offline:
        env |= {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    log.info("running %s in the retrieval environment (log: %s)", what, log_path)
    start = time.perf_counter()
    with log_path.open("w") as log_file:
        log_file.write("$ " + " ".join(command) + "\n")
        log_file.flush()
        result = subprocess.run(command, stdout=log_file, stderr=subprocess.STDOUT, env=env)
    seconds = time.perf_counter() - start
    log.info("%s finished in %.1f s", what, seconds)
    if result.returncode != 0:
        raise RetrievalEnvError(f"{what} failed (exit {result.returncode}) after {seconds:.0f} s; "
                                f"see {log_path}:\n{_tail(log_path)}")
    return seconds


def _tail(path: Path) -> str:
    lines = Path(path).read_text(errors="replace").splitlines()
    return "\n".join(lines[-LOG_TAIL_LINES:])
