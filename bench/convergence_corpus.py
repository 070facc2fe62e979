"""A real-text corpus available on a machine without network: the documentation of installed Python packages.

What it is, exactly: for each package in PACKAGES (those installed), every .md, .rst and .txt file under
its folder, and for every .py file the docstrings of the module, its classes and functions (joined by
blank lines, one document per .py file), in sorted path order; documents under MIN_BYTES are left out and
exact duplicates (same text after stripping) kept once; gathering stops at the byte limit. Each document
is one .txt file of the output folder (`longloom data prepare` reads one document per .txt file). The
manifest (documents, bytes, sha256 over the documents in order, package versions) says which corpus a
run trained on: two machines with other package versions gather another corpus, which the manifest shows.
"""

from __future__ import annotations

import ast
import hashlib
import importlib.metadata
import importlib.util
import itertools
import json
from pathlib import Path

PACKAGES = (
    "transformers",
    "torch",
    "deepspeed",
    "numpy",
    "pyarrow",
    "ray",
    "pydantic",
    "matplotlib",
    "scipy",
)
TEXT_SUFFIXES = (".md", ".rst", ".txt")
MIN_BYTES = 200


def package_folder(name: str) -> Path | None:
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(next(iter(spec.submodule_search_locations)))


def docstrings(source: str) -> str:
    """Module, class and function docstrings of one Python file, in source order ('' when it does not parse)."""
    try:
        tree = ast.parse(source)
    except (SyntaxError, ValueError):
        return ""
    nodes = [
        tree,
        *(n for n in ast.walk(tree) if isinstance(n, ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef)),
    ]
    nodes.sort(key=lambda n: getattr(n, "lineno", 0))
    texts = [ast.get_docstring(n) for n in nodes]
    return "\n\n".join(t for t in texts if t)


def documents(folder: Path):
    """(relative path, text) of every document under one folder, in sorted path order."""
    for path in sorted(folder.rglob("*")):
        if not path.is_file():
            continue
        if path.suffix in TEXT_SUFFIXES:
            text = path.read_text(errors="replace")
        elif path.suffix == ".py":
            text = docstrings(path.read_text(errors="replace"))
        else:
            continue
        yield path.relative_to(folder.parent), text


def gather(out: Path, roots: list[Path], max_bytes: int) -> dict:
    """Writes the deduplicated documents of `roots` as .txt files under `out`; returns the manifest."""
    out.mkdir(parents=True, exist_ok=True)
    for old in out.glob("*.txt"):
        old.unlink()
    seen, digest, total, count, skipped = set(), hashlib.sha256(), 0, 0, {"short": 0, "duplicate": 0}
    for _, text in itertools.chain.from_iterable(documents(root) for root in roots):
        text = text.strip()
        body = text.encode()
        if len(body) < MIN_BYTES:
            skipped["short"] += 1
            continue
        key = hashlib.sha256(body).digest()
        if key in seen:
            skipped["duplicate"] += 1
            continue
        if total + len(body) > max_bytes:
            break  # full: the later roots are not read
        seen.add(key)
        digest.update(key)
        (out / f"{count:07d}.txt").write_text(text + "\n")
        total, count = total + len(body), count + 1
    return {
        "what": "docs (.md/.rst/.txt) and docstrings (.py) of installed packages, deduplicated",
        "roots": [str(r) for r in roots],
        "documents": count,
        "bytes": total,
        "sha256": digest.hexdigest(),
        "skipped": skipped,
        "max_bytes": max_bytes,
    }


def package_corpus(out: Path, max_bytes: int, packages: tuple[str, ...] = PACKAGES) -> dict:
    """gather() over the installed PACKAGES; the manifest also lists their versions (cached beside the folder)."""
    found = {name: folder for name in packages if (folder := package_folder(name)) is not None}
    versions = {}
    for name in found:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = "?"
    manifest_file = out.parent / f"{out.name}-manifest.json"  # beside: prepare reads the folder
    if manifest_file.exists():
        cached = json.loads(manifest_file.read_text())
        if cached.get("versions") == versions and cached.get("max_bytes") == max_bytes:
            return cached
    manifest = gather(out, list(found.values()), max_bytes) | {"versions": versions}
    manifest_file.write_text(json.dumps(manifest, indent=1))
    return manifest
