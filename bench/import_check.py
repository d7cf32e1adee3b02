"""Import every module of the product (the `pipeline` and `stages` packages, walked) in this
interpreter and say which torch it runs: proof that an environment is complete before a GPU is
needed. `make check-cuda-env` runs it in the CUDA environment; bench/gpu_check.sh runs it in the
wheelhouse environment of a bare GPU box.

    python bench/import_check.py

Prints one line per package and a summary; exit status 0 when every module imported, 1 when not.
"""
from __future__ import annotations

import importlib
import pkgutil
import sys
import time
import traceback
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
PACKAGES = ("pipeline", "stages")
# `python -m pipeline.tinyworld` runs the generator on import: a command, not a module to load
COMMANDS = ("__main__",)


def product_modules() -> list[str]:
    """Dotted names of every module and package under PACKAGES, found on disk (nothing imported)."""
    names = []
    for package in PACKAGES:
        names.append(package)
        for info in pkgutil.walk_packages([str(REPO / package)], prefix=f"{package}."):
            if info.name.rsplit(".", 1)[-1] not in COMMANDS:
                names.append(info.name)
    return sorted(names)


def import_all(names: list[str]) -> dict[str, str]:
    """name -> the last line of the error, for each module that does not import."""
    failed = {}
    for name in names:
        try:
            importlib.import_module(name)
        except Exception as err:  # noqa: BLE001 — every failure is reported, none stops the walk
            failed[name] = traceback.format_exception_only(err)[-1].strip()
    return failed


def torch_summary() -> str:
    import torch

    build = f"CUDA {torch.version.cuda} build" if torch.version.cuda else "CPU build"
    gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    seen = f"sees {gpus} GPU(s)" if gpus else "sees no GPU (torch.cuda.is_available() is False)"
    return f"torch {torch.__version__} ({build}) from {Path(torch.__file__).parent}: {seen}"


def main() -> int:
    sys.path.insert(0, str(REPO))
    started = time.perf_counter()
    names = product_modules()
    failed = import_all(names)
    seconds = time.perf_counter() - started
    print(f"python {sys.version.split()[0]} at {sys.prefix}")
    print(torch_summary())
    for package in PACKAGES:
        own = [n for n in names if n == package or n.startswith(f"{package}.")]
        ok = [n for n in own if n not in failed]
        print(f"{package}: {len(ok)} of {len(own)} modules import: {', '.join(ok)}")
    for name, error in failed.items():
        print(f"  FAILED {name}: {error}")
    print(f"every module of the product imports: {'yes' if not failed else 'NO'} "
          f"({len(names)} modules in {seconds:.1f} s)")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
