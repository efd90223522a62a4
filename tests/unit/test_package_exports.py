"""The package root exports its public names lazily, and says so truthfully."""

from __future__ import annotations

import ast
import importlib
from pathlib import Path

import pytest

import cyllama_cffi

PACKAGE_DIR = Path(cyllama_cffi.__file__).resolve().parent
# Exports whose modules are pure Python: resolving them must not need the compiled module.
PURE_MODULES = {"config", "defaults", "response", "errors", "models", "stream", "_logging", "_response_cache", "memory",
                "aio", "grammar", "_json_schema"}
PURE_EXPORTS = sorted(name for name, module in cyllama_cffi._EXPORTS.items() if module in PURE_MODULES)


def module_file(module: str) -> Path:
    plain = PACKAGE_DIR / f"{module}.py"
    return plain if plain.is_file() else PACKAGE_DIR / module / "__init__.py"


def names_bound_at_module_level(source: str) -> set:
    """Names a module binds outside its functions and classes (try/if blocks included)."""
    bound = set()

    def visit(statements):
        for node in statements:
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                bound.add(node.name)
                continue  # their bodies bind local names
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                bound.update((alias.asname or alias.name).split(".")[0] for alias in node.names)
            elif isinstance(node, (ast.Assign, ast.AnnAssign, ast.AugAssign)):
                assigned = node.targets if isinstance(node, ast.Assign) else [node.target]
                for names in assigned:
                    bound.update(n.id for n in ast.walk(names) if isinstance(n, ast.Name))
            for block in ("body", "orelse", "finalbody", "handlers"):
                visit(getattr(node, block, []))

    visit(ast.parse(source).body)
    return bound


def test_all_is_exactly_the_lazy_exports_and_the_version():
    assert sorted(cyllama_cffi.__all__) == sorted(list(cyllama_cffi._EXPORTS) + ["__version__"])
    assert len(cyllama_cffi.__all__) == len(set(cyllama_cffi.__all__))


def test_version_matches_the_project_metadata():
    pyproject = PACKAGE_DIR.parent / "pyproject.toml"
    if not pyproject.is_file():
        pytest.skip("installed without its source tree: no pyproject.toml beside the package")
    assert f'\nversion = "{cyllama_cffi.__version__}"\n' in pyproject.read_text()


@pytest.mark.parametrize("name", sorted(cyllama_cffi._EXPORTS))
def test_every_export_is_defined_in_the_module_it_is_said_to_come_from(name):
    """Checked on the source, so the native modules' exports are covered without loading them."""
    path = module_file(cyllama_cffi._EXPORTS[name])
    assert path.is_file(), f"{name}: no module file {path.relative_to(PACKAGE_DIR)}"
    assert name in names_bound_at_module_level(path.read_text(encoding="utf-8")), f"{name} is not bound in {path.name}"


def test_dir_lists_every_export_sorted():
    listing = dir(cyllama_cffi)
    assert listing == sorted(listing)
    assert set(cyllama_cffi.__all__) <= set(listing)


@pytest.mark.parametrize("name", PURE_EXPORTS)
def test_pure_exports_resolve_to_the_defining_module_and_are_cached(name):
    module = importlib.import_module(f"cyllama_cffi.{cyllama_cffi._EXPORTS[name]}")
    value = getattr(cyllama_cffi, name)
    assert value is getattr(module, name)
    assert vars(cyllama_cffi)[name] is value  # the next lookup skips __getattr__


def test_unknown_attributes_raise_attribute_error():
    with pytest.raises(AttributeError, match="module 'cyllama_cffi' has no attribute 'no_such_name'"):
        cyllama_cffi.no_such_name  # noqa: B018
    assert not hasattr(cyllama_cffi, "LLMs")
    assert getattr(cyllama_cffi, "no_such_name", None) is None
    with pytest.raises(ImportError):
        from cyllama_cffi import no_such_name  # noqa: F401

