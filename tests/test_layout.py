"""The README says what the tree holds: its Layout section names every folder of the package, the
backends and the C++ sources (and nothing that is not there), and its Backends table lists each
declared backend with the ops ``fastcl/backend/registry.py`` declares for it."""
from __future__ import annotations

import re
from pathlib import Path

from fastcl.backend import registry

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text()


def _section(title: str) -> str:
    start = README.index(f"\n## {title}\n")
    end = README.find("\n## ", start + 1)
    return README[start:end if end > 0 else None]


def _layout() -> dict[Path, str]:
    """Path -> description, from the Layout section's indented listing."""
    block = re.search(r"```\n(.*?)```", _section("Layout"), re.S).group(1)
    entries, parents = {}, []
    for line in block.splitlines():
        match = re.match(r"( *)(\S+(?:, \S+)*)\s{2,}(.*)", line)
        if match is None:
            continue  # a description's continuation line
        depth = len(match.group(1)) // 2
        parents = parents[:depth]
        for name in match.group(2).split(", "):
            path = Path(*parents, name.rstrip("/"))
            entries[path] = match.group(3)
        if match.group(2).endswith("/"):
            parents.append(match.group(2).rstrip("/"))
    return entries


def _folders(under: Path) -> set[Path]:
    return {p.relative_to(ROOT) for p in under.iterdir()
            if p.is_dir() and not p.name.startswith((".", "_")) and p.name not in ("build", "dist", "out")}


def test_every_path_the_layout_names_exists():
    missing = [str(p) for p in _layout() if not (ROOT / p).exists()]
    assert not missing, f"README Layout names paths that do not exist: {missing}"


def test_the_layout_names_every_folder():
    named = set(_layout())
    tracked = {Path(p) for p in ("python/fastcl", "csrc")} | {
        p for p in _folders(ROOT) if p.name not in ("python",)}
    tracked |= _folders(ROOT / "python" / "fastcl") | _folders(ROOT / "python" / "fastcl" / "backend") \
        | _folders(ROOT / "csrc")
    unnamed = sorted(str(p) for p in tracked - named)
    assert not unnamed, f"README Layout does not name {unnamed}"


def test_backends_table_lists_every_declaration_and_its_ops():
    rows = re.findall(r"^\| `(\w+)` +\|[^|]*\| ([^|]*)\|", _section("Backends"), re.M)
    table = {name: [op.split(" (")[0].strip() for op in ops.split(",")] for name, ops in rows}
    assert list(table) == list(registry.BACKENDS)
    for name, ops in table.items():
        assert ops == list(registry.BACKENDS[name].ops), f"README Backends: {name} lists {ops}"
