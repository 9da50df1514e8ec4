"""Results archive: results/<gpu-model-slug>/<UTC time>_<git commit>.json, written atomically.

The schema is documented in results/README.md; bump SCHEMA when a field changes meaning.
"""

from __future__ import annotations

import json
import re
import subprocess
from datetime import datetime, timezone
from pathlib import Path

from sd_vram.formula.files import write_text_atomic

SCHEMA = "sd-vram/results/1"


def gpu_slug(name: str | None) -> str:
    """Folder name of a GPU model: 'NVIDIA H100 80GB HBM3' -> 'H100-80GB-HBM3', 'NVIDIA H200' -> 'H200'."""
    s = re.sub(r"^(nvidia|amd)\s+", "", (name or "unknown").strip(), flags=re.I)
    s = re.sub(r"[^A-Za-z0-9.]+", "-", s).strip("-.")
    return s or "unknown"


def utc_stamp(t: datetime | None = None) -> str:
    return (t or datetime.now(timezone.utc)).strftime("%Y%m%dT%H%M%SZ")


def git_commit(root: Path) -> tuple[str, bool | None]:
    """(short commit or 'nogit', dirty flag or None)."""
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True,
                                text=True, timeout=10)
        if commit.returncode != 0:
            return "nogit", None
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root,
                               capture_output=True, text=True, timeout=10)
        return commit.stdout.strip(), bool(dirty.stdout.strip())
    except (OSError, subprocess.SubprocessError):
        return "nogit", None


def write_json_atomic(path: Path, data) -> None:
    """An archive as JSON, atomically (formula/files.py): readers never see half a file."""
    write_text_atomic(path, json.dumps(data, indent=1, default=_jsonable) + "\n")


def _jsonable(x):
    if isinstance(x, Path):
        return str(x)
    if isinstance(x, (set, tuple)):
        return list(x)
    return str(x)


def new_archive_path(results_dir: Path, slug: str, commit: str, worker: str | None = None) -> Path:
    base = f"{utc_stamp()}_{commit}" + (f"_{worker}" if worker else "")
    folder = Path(results_dir) / slug
    path, n = folder / f"{base}.json", 2
    while path.exists():                    # two runs in the same second
        path, n = folder / f"{base}-{n}.json", n + 1
    return path


class RunArchive:
    """One run's archive; rewritten (atomically) after each case, so a killed run keeps what it has."""

    def __init__(self, path: Path | None, header: dict):
        self.path = path
        self.data = {"schema": SCHEMA, **header, "cases": []}

    def add(self, record: dict) -> None:
        self.data["cases"].append(record)
        self.write()

    def finish(self, **run_fields) -> None:
        self.data["run"].update(run_fields)
        self.write()

    def write(self) -> None:
        if self.path is not None:
            write_json_atomic(self.path, self.data)


def load_archive(path: Path) -> dict:
    with open(path) as f:
        data = json.load(f)
    if not isinstance(data, dict) or data.get("schema") != SCHEMA:
        raise ValueError(f"{path}: not an sd-vram results file (schema {SCHEMA})")
    return data


def find_archives(paths) -> list[Path]:
    """Archive files under the given files/folders (recursively): in argument order, each in name (= time) order."""
    found: list[Path] = []
    for p in map(Path, paths):
        if p.is_dir():
            batch = sorted((q for q in p.rglob("*.json") if not q.name.startswith(".")),
                           key=lambda q: (q.parent.name, q.name))
        else:
            batch = [p] if p.is_file() else []
        found += [q for q in batch if q not in found]
    return found


def load_all(results_dir: Path) -> list[tuple[Path, dict]]:
    """Every valid archive under results_dir; other JSON files are ignored."""
    out = []
    for p in find_archives([results_dir]):
        try:
            out.append((p, load_archive(p)))
        except (ValueError, OSError):
            continue
    return out
