"""vLLM names outside vLLM's public API live in one module: every name
``refit/adapters/vllm_private.py`` imports is still where its table says in the installed vLLM
(else the failure names each one that moved), the table lists each of them, and no other refit
module imports a vLLM name that is neither in its module's ``__all__`` nor documented API."""

from __future__ import annotations

import ast
import importlib
from pathlib import Path

import pytest

pytestmark = pytest.mark.unit

vllm = pytest.importorskip("vllm", reason="vLLM is not installed (pip install 'refit[vllm]'): no vLLM names to check")

REFIT = Path(__file__).resolve().parents[1] / "refit"
PRIVATE = REFIT / "adapters" / "vllm_private.py"
# Modules whose names vLLM documents as user API although the module has no ``__all__`` (or
# leaves them out of it): the custom weight-transfer engine's base classes and request types,
# https://docs.vllm.ai/en/v0.32.0/training/weight_transfer/base/
DOCUMENTED_MODULES = {"vllm.distributed.weight_transfer.base"}


def vllm_imports(path: Path) -> list[tuple[int, str, str]]:
    """``(line, module, name)`` of every absolute import of a vLLM name in ``path``."""
    out = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module and node.module.split(".")[0] == "vllm":
            out += [(node.lineno, node.module, alias.name) for alias in node.names]
        elif isinstance(node, ast.Import):
            out += [(node.lineno, alias.name, "") for alias in node.names if alias.name.split(".")[0] == "vllm"]
    return out


def checked_against() -> str:
    """``CHECKED_AGAINST`` of vllm_private.py, read without importing it (an import fails
    at the first name that moved; this test names every one)."""
    for node in ast.parse(PRIVATE.read_text()).body:
        if isinstance(node, ast.Assign) and any(isinstance(t, ast.Name) and t.id == "CHECKED_AGAINST" for t in node.targets):
            assert isinstance(node.value, ast.Constant) and isinstance(node.value.value, str)
            return node.value.value
    raise AssertionError("refit/adapters/vllm_private.py defines no CHECKED_AGAINST")


def test_each_wrapped_private_name_imports_from_the_installed_vllm() -> None:
    wrapped = vllm_imports(PRIVATE)
    assert len(wrapped) >= 10
    moved = []
    for line, module, name in wrapped:
        try:
            found = importlib.import_module(module)
        except ImportError as exc:
            moved.append(f"  {module}.{name} (vllm_private.py:{line}): the module is gone: {exc}")
            continue
        if not hasattr(found, name):
            moved.append(f"  {module}.{name} (vllm_private.py:{line}): {module} no longer has {name}")
    assert not moved, (
        f"private vLLM names that refit wraps in refit/adapters/vllm_private.py (checked against vllm {checked_against()}) "
        f"moved in the installed vllm {vllm.__version__}:\n"
        + "\n".join(moved)
        + "\nfind where each lives now and update the import and the table there"
    )
    from refit.adapters import vllm_private

    assert all(getattr(vllm_private, n) is not None for n in vllm_private.__all__)


def test_the_table_names_each_wrapped_name_and_where_it_lives() -> None:
    doc = ast.get_docstring(ast.parse(PRIVATE.read_text())) or ""
    rows = [line for line in doc.splitlines() if line.startswith("| `")]
    missing = [f"{module}.{name}" for _, module, name in vllm_imports(PRIVATE) if not any(f"`{name}`" in r and f"`{module}`" in r for r in rows)]
    assert not missing, f"refit/adapters/vllm_private.py imports these without a row in its docstring table: {missing}"
    assert f"vllm {checked_against()}" in doc


def test_no_other_refit_module_imports_a_private_vllm_name() -> None:
    private = []
    for path in sorted(REFIT.rglob("*.py")):
        if path == PRIVATE:
            continue
        for line, module, name in vllm_imports(path):
            where = f"{path.relative_to(REFIT.parent)}:{line}"
            if module in DOCUMENTED_MODULES or (not name and module == "vllm"):
                continue
            if not name:
                private.append(f"{where}: import {module} (import the names from their public module)")
                continue
            public = getattr(importlib.import_module(module), "__all__", ())
            if name not in public:
                private.append(f"{where}: {module}.{name} is not in {module}.__all__")
    assert not private, "vLLM names outside its public API, to be imported through refit/adapters/vllm_private.py:\n" + "\n".join(private)
