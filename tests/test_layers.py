"""The folders show the layers: the core (loose modules of pathway/) depends on torch and the standard library
only; everything else is a sub-package that may import the core, never the reverse. And the repository root
shadows no installed package: `adapters/` and `tokenizers/` have no __init__.py."""

from __future__ import annotations

import ast
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# `__main__.py` is the door of `python -m pathway` into the CLI (pathway/train/cli.py), never imported by the core.
CORE = sorted(p for p in (ROOT / "pathway").glob("*.py") if p.name != "__main__.py")
ALLOWED_THIRD_PARTY = {"torch"}


def _module_level_imports(path: Path) -> list[tuple[int, str]]:
    """(line, absolute module name) of every import that runs when the module is imported."""
    tree = ast.parse(path.read_text())
    found = []
    for node in tree.body:  # top level only: imports inside functions are lazy by design
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            found.append((node.lineno, f"pathway.{base}" if node.level else base))
    return found


@pytest.mark.parametrize("path", CORE, ids=[p.name for p in CORE])
def test_core_module_imports_only_torch_stdlib_and_core(path):
    for line, name in _module_level_imports(path):
        top = name.split(".")[0]
        if top == "pathway":
            parts = name.split(".")
            assert len(parts) <= 2 or parts[1] in ("errors",), f"{path.name}:{line} imports {name}"
            assert len(parts) < 2 or (ROOT / "pathway" / f"{parts[1]}.py").exists() or parts[1] == "", (
                f"{path.name}:{line} imports {name}, which is not a core module (the core never imports the engine, "
                f"adapters or tokenizers)")
        else:
            assert top in sys.stdlib_module_names or top in ALLOWED_THIRD_PARTY or top == "__future__", (
                f"{path.name}:{line} imports {name}: the core depends on torch and the standard library only")


def test_import_pathway_loads_nothing_beyond_torch():
    code = ("import sys, torch; before = set(sys.modules); import pathway; "
            "new = {m.split('.')[0] for m in set(sys.modules) - before}; "
            "print(sorted(m for m in new if m != 'pathway' and m not in sys.stdlib_module_names))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT).stdout
    assert out.strip() == "[]"


def test_repo_root_shadows_no_installed_package():
    """From the repo root (on sys.path as '' for `python -c`, `python -m` and notebooks), the installed
    `tokenizers` and `transformers` load, and the project's own folders still import as pathway.*."""
    code = ("import tokenizers, transformers; from transformers import AutoTokenizer; "
            "import pathway.tokenizers as t, pathway.adapters as a; "
            "print(tokenizers.__file__); print(t.PatchTokenizer.__module__, a.get('image').__name__)")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONSAFEPATH"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, env=env)
    assert out.returncode == 0, out.stderr
    hf_tokenizers, ours = out.stdout.strip().splitlines()
    assert "site-packages" in hf_tokenizers and not hf_tokenizers.startswith(str(ROOT / "tokenizers"))
    assert ours == "pathway.tokenizers.patch ImageAdapter"
    assert not (ROOT / "tokenizers" / "__init__.py").exists() and not (ROOT / "adapters" / "__init__.py").exists()


@pytest.mark.slow
def test_wheel_installs_both_packages_beside_their_inits(tmp_path):
    """A built wheel carries pathway/adapters and pathway/tokenizers with their modules and inits."""
    src = tmp_path / "src"  # a copy: setuptools writes build/ beside the sources, never into the checkout
    for name in ("pathway", "adapters", "tokenizers"):
        shutil.copytree(ROOT / name, src / name, ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, src / name)
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w",
                    str(tmp_path), str(src)], check=True, capture_output=True)
    (wheel,) = tmp_path.glob("multimodal_pathway-*.whl")
    subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target", str(tmp_path / "site"),
                    str(wheel)], check=True, capture_output=True)
    site = tmp_path / "site"
    for name in ("adapters/__init__.py", "adapters/image.py", "tokenizers/__init__.py", "tokenizers/patch.py",
                 "train/cli.py"):
        assert (site / "pathway" / name).is_file(), name
    code = ("import pathway.tokenizers as t, pathway.adapters as a; "
            "print(t.__path__[0]); print(len(t.__path__), a.get('image').__module__)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path,
                         env={**os.environ, "PYTHONPATH": str(site)})
    assert out.returncode == 0, out.stderr
    first, rest = out.stdout.strip().splitlines()
    assert first == str(site / "pathway" / "tokenizers") and rest == "1 pathway.adapters.image"
