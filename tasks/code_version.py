"""The version of the code that computes a stage, part of its key: a code change reruns the stage.

A stage's code is the import closure of its module: every gptflow module (`tasks`, `models`, `eval`, `infra`)
that it imports, directly or through another gptflow module, lazy imports inside functions included (they are
read from the source, nothing is imported), plus the package `__init__`s that importing them runs and the package
data they read (`eval/tasks/*.yaml`). Each file is hashed by its syntax tree, so a comment or a reformat does not
rerun a stage and any change of code does. The third-party modules the closure imports are mapped to their
installed distributions, whose versions join the hash (torch, datatrove, tokenizers, lm_eval, ray, ...), as does
the Python version.

Why a closure and not every file: a change to the DPO loss must not rerun the data stage (minutes to hours), and
the closure is exact about what a stage can run. It misses only code named by a string (a Ray worker setup hook,
an MLflow model file), which lives in modules the closure holds anyway. Computed once per process and module.
"""

from __future__ import annotations

import ast
import functools
import hashlib
import importlib.metadata
import platform
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from infra.env import REPO_ROOT

PACKAGES = ("tasks", "models", "eval", "infra")
# Modules that only record what a stage did (MLflow runs, the registry) and change none of its files: not
# followed, else the lazy `tasks.refs -> tasks.tracking` import would put the registry and the MLflow model
# files into every stage's code, and editing the promotion gate would rerun the data stage.
RECORDING = ("tasks.tracking",)
# Files a package reads at run time, as pyproject's package-data lists them: lm-eval task definitions.
PACKAGE_DATA = {"eval": ("tasks/*.yaml",)}
# Libraries whose code runs through one we import and shapes a stage's output: datatrove's Trafilatura
# extractor, fastText language ID and word tokenizer (the data stage imports only datatrove).
CALLED_THROUGH = {"datatrove": ("trafilatura", "fasttext", "nltk")}


def module_file(module: str, root: Path) -> Path | None:
    """The file of a gptflow module under `root`, or None for another library's."""
    if module.split(".")[0] not in PACKAGES:
        return None
    base = root.joinpath(*module.split("."))
    for path in (base.with_suffix(".py"), base / "__init__.py"):
        if path.is_file():
            return path
    return None


def imported_names(tree: ast.AST, module: str, is_package: bool) -> set[str]:
    """Every module name an import statement anywhere in `tree` names, relative imports made absolute;
    `from a import b` names both `a` and `a.b` (b may be a module)."""
    names: set[str] = set()
    package = module if is_package else module.rpartition(".")[0]
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")
                base = ".".join(parts[: len(parts) - node.level + 1] + ([base] if base else []))
            names.add(base)
            names |= {f"{base}.{alias.name}" for alias in node.names}
    return names


def parents(module: str) -> list[str]:
    """`a.b.c` -> [`a`, `a.b`]: the packages whose `__init__` importing it runs."""
    parts = module.split(".")
    return [".".join(parts[:i]) for i in range(1, len(parts))]


def closure(module: str, root: Path) -> tuple[dict[str, str], set[str]]:
    """The gptflow files `module` runs ({path relative to root: sha256 of its syntax tree}) and the top-level
    names of the other libraries they import."""
    sources: dict[str, str] = {}
    libraries: set[str] = set()
    todo, seen = [module, *parents(module)], set()
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        seen.add(name)
        if name in RECORDING:
            continue
        path = module_file(name, root)
        if path is None:
            top = name.split(".")[0]
            if top and top not in PACKAGES and top not in sys.stdlib_module_names and top != "__future__":
                libraries.add(top)
            continue
        tree = ast.parse(path.read_text(), filename=str(path))
        sources[path.relative_to(root).as_posix()] = hashlib.sha256(ast.dump(tree).encode()).hexdigest()
        for found in imported_names(tree, name, path.name == "__init__.py"):
            todo += [found, *parents(found)]
    for package, globs in PACKAGE_DATA.items():
        if any(p.split("/")[0] == package for p in sources):
            for pattern in globs:
                for f in sorted((root / package).glob(pattern)):
                    sources[f.relative_to(root).as_posix()] = hashlib.sha256(f.read_bytes()).hexdigest()
    return dict(sorted(sources.items())), libraries


@functools.cache
def distributions() -> dict[str, list[str]]:
    """Top-level module name -> the installed distributions that provide it (read once: it scans site-packages)."""
    return importlib.metadata.packages_distributions()


def installed_version(dist: str) -> str:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def compute_code_version(module: str, root: Path = REPO_ROOT,
                         version_of: Callable[[str], str] = installed_version) -> dict[str, Any]:
    """{"sha256": the code version, "modules": {file: sha256}, "libraries": {distribution: version},
    "python": version} for the stage whose core is in `module`."""
    sources, tops = closure(module, root)
    tops |= {lib for top in tops for lib in CALLED_THROUGH.get(top, ())}
    dists = sorted({d for top in tops for d in distributions().get(top, [top])})
    libraries = {d: version_of(d) for d in dists}
    parts = {"modules": sources, "libraries": libraries, "python": platform.python_version()}
    digest = hashlib.sha256(repr(sorted(parts.items())).encode()).hexdigest()[:16]
    return {"sha256": digest, **parts}


@functools.cache
def code_version(module: str) -> dict[str, Any]:
    """`compute_code_version` of the repo's own code, once per process and module."""
    return compute_code_version(module)
