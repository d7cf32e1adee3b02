"""The shape of the training core, read statically (nothing is imported or run): rerun it before and
after a refactor and compare.

    python bench/import_layers.py [--root pipeline]

Prints
- the import layers of pipeline/train/: layer 0 imports no other module of the package tree, layer n
  imports at least one of layer n - 1 (module-level imports only; imports inside functions are
  deferred on purpose and listed apart);
- package edges that close a cycle between pipeline's subpackages (an import that runs upward);
- which modules reach pipeline.train.dry_run (the preflight) through module-level imports from the
  training loop;
- the length of `train` in pipeline/train/loop.py and every function in pipeline/ over 60 lines;
- the loader's state fields: attributes a loader class assigns outside `__init__` (what a resume
  must restore or re-derive).
"""
from __future__ import annotations

import argparse
import ast
from pathlib import Path

LOOP = "pipeline.train.loop"
PREFLIGHT = "pipeline.train.dry_run"
LOADER_MODULES = ("pipeline.data.loader", "pipeline.data.mixture")
MAX_FUNCTION_LINES = 60


def module_name(path: Path, root: Path) -> str:
    parts = list(path.relative_to(root.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def read_tree(root: Path) -> dict[str, ast.Module]:
    return {module_name(p, root): ast.parse(p.read_text(), str(p)) for p in sorted(root.rglob("*.py"))}


def imported(node: ast.AST, modules: set[str]) -> set[str]:
    """The package's modules an import statement names (`from a import b` counts a.b when a.b is a module)."""
    names: set[str] = set()
    if isinstance(node, ast.Import):
        names = {alias.name for alias in node.names}
    elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
        names = {node.module} | {f"{node.module}.{alias.name}" for alias in node.names}
    return {n for n in names if n in modules}


def import_graph(trees: dict[str, ast.Module]) -> tuple[dict[str, set[str]], dict[str, set[str]]]:
    """(module-level imports, imports inside functions) per module."""
    modules = set(trees)
    top = {name: set() for name in trees}
    deferred = {name: set() for name in trees}
    for name, tree in trees.items():
        for node in tree.body:
            top[name] |= imported(node, modules)
        for fn in ast.walk(tree):
            if isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)):
                for node in ast.walk(fn):
                    deferred[name] |= imported(node, modules)
        top[name].discard(name)
    return top, deferred


def layers(graph: dict[str, set[str]]) -> dict[str, int]:
    found: dict[str, int] = {}

    def layer(name: str, path: tuple[str, ...]) -> int:
        if name not in found:
            deps = [d for d in graph[name] if d not in path and not name.startswith(d + ".")]
            found[name] = 1 + max((layer(d, path + (name,)) for d in deps), default=-1)
        return found[name]
    for name in graph:
        layer(name, ())
    return found


def package_cycles(graph: dict[str, set[str]]) -> list[str]:
    """Module imports a → b whose subpackages also import each other the other way."""
    def package(name: str) -> str:
        return ".".join(name.split(".")[:2])
    edges: dict[tuple[str, str], list[str]] = {}
    for name, deps in graph.items():
        for dep in deps:
            if package(name) != package(dep):
                edges.setdefault((package(name), package(dep)), []).append(f"{name} -> {dep}")
    return sorted(line for (a, b), lines in edges.items() if (b, a) in edges for line in lines)


def reaches(graph: dict[str, set[str]], start: str, target: str) -> list[str]:
    """The modules reached from `start` that import `target` directly."""
    seen, todo = set(), [start]
    while todo:
        name = todo.pop()
        if name not in seen and name in graph:
            seen.add(name)
            todo += graph[name]
    return sorted(n for n in seen if target in graph[n])


def functions(trees: dict[str, ast.Module]):
    for name, tree in trees.items():
        for node in ast.walk(tree):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                yield name, node.name, node.end_lineno - node.lineno + 1


def state_fields(trees: dict[str, ast.Module]) -> dict[str, list[str]]:
    fields = {}
    for module in LOADER_MODULES:
        for cls in (n for n in trees.get(module, ast.Module(body=[])).body if isinstance(n, ast.ClassDef)):
            assigned = set()
            for method in (m for m in cls.body if isinstance(m, ast.FunctionDef) and m.name != "__init__"):
                for node in ast.walk(method):
                    targets = node.targets if isinstance(node, ast.Assign) else \
                        [node.target] if isinstance(node, (ast.AugAssign, ast.AnnAssign)) else []
                    for target in targets:
                        for t in ast.walk(target):
                            if isinstance(t, ast.Attribute) and isinstance(t.value, ast.Name) and t.value.id == "self":
                                assigned.add(t.attr)
            if assigned:
                fields[f"{module}.{cls.name}"] = sorted(assigned)
    return fields


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", type=Path, default=Path("pipeline"))
    args = parser.parse_args()
    trees = read_tree(args.root)
    top, deferred = import_graph(trees)
    found = layers(top)
    train = sorted((found[n], n) for n in trees if n.startswith("pipeline.train."))
    print(f"import layers of pipeline/train/ (module-level imports): {max(l for l, _ in train) + 1} layers")
    for level in sorted({l for l, _ in train}):
        print(f"  layer {level}: {', '.join(n.rsplit('.', 1)[1] for l, n in train if l == level)}")
    print("deferred imports (inside functions) in pipeline/train/:")
    for name in sorted(n for n in deferred if n.startswith("pipeline.train.") and deferred[n]):
        print(f"  {name.rsplit('.', 1)[1]}: {', '.join(sorted(deferred[name]))}")
    cycles = package_cycles(top)
    print(f"imports closing a cycle between subpackages: {len(cycles)}")
    for line in cycles:
        print(f"  {line}")
    importers = reaches(top, LOOP, PREFLIGHT)
    print(f"training-path modules importing {PREFLIGHT}: {', '.join(importers) or 'none'}")
    lengths = list(functions(trees))
    loop = [n for m, f, n in lengths if m == LOOP and f == "train"]
    print(f"train() in {LOOP}: {loop[0] if loop else 'absent'} lines")
    long = sorted(((n, f"{m}.{f}") for m, f, n in lengths if n > MAX_FUNCTION_LINES), reverse=True)
    print(f"functions over {MAX_FUNCTION_LINES} lines in {args.root}/: {len(long)}")
    for n, name in long:
        print(f"  {n:4d} {name}")
    print("loader state fields (assigned outside __init__):")
    for name, fields in state_fields(trees).items():
        print(f"  {name}: {len(fields)}: {', '.join(fields)}")


if __name__ == "__main__":
    main()
