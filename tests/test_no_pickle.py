"""No pickle anywhere in refit: a socket or file that unpickles is a remote code execution hole
(docs/reliability.md). The scan reads the syntax tree, so prose that names pickle is fine."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

pytestmark = pytest.mark.unit

ROOT = Path(__file__).resolve().parent.parent / "refit"
# modules that deserialize code objects or arbitrary classes
BANNED_MODULES = {"pickle", "_pickle", "cPickle", "cloudpickle", "dill", "marshal", "shelve", "joblib", "copyreg"}
# calls that unpickle under the hood: pyzmq's *_pyobj / *_serialized, torch.load, numpy pickles
BANNED_CALLS = {"recv_pyobj", "send_pyobj", "recv_serialized", "send_serialized", "loads"}


def banned_uses(source: str, filename: str = "<src>") -> list[str]:
    """``file:line what`` for every import of a banned module and every banned call."""
    found = []
    for node in ast.walk(ast.parse(source, filename)):
        if isinstance(node, ast.Import):
            found += [f"{filename}:{node.lineno} import {a.name}" for a in node.names if a.name.split(".")[0] in BANNED_MODULES]
        elif isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] in BANNED_MODULES:
            found.append(f"{filename}:{node.lineno} from {node.module} import ...")
        elif isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute):
            attr, base = node.func.attr, node.func.value
            owner = base.id if isinstance(base, ast.Name) else ""
            if attr in BANNED_CALLS - {"loads"} or (attr == "loads" and owner in BANNED_MODULES):
                found.append(f"{filename}:{node.lineno} {owner or '...'}.{attr}()")
            elif attr == "load" and owner in ("torch", *BANNED_MODULES):
                found.append(f"{filename}:{node.lineno} {owner}.load()")
            elif any(k.arg == "allow_pickle" and not (isinstance(k.value, ast.Constant) and k.value.value is False) for k in node.keywords):
                found.append(f"{filename}:{node.lineno} allow_pickle")
    return found


def test_the_scan_catches_every_form() -> None:
    src = "\n".join(
        [
            "import pickle",
            "import marshal as m",
            "from cloudpickle import dumps",
            "import dill.settings",
            "x = pickle.loads(b'')",
            "sock.recv_pyobj()",
            "torch.load('f')",
            "np.load('f', allow_pickle=True)",
            "msgpack.loads(b'')",  # not a pickle: allowed
        ]
    )
    assert [f.split(" ", 1)[0] for f in banned_uses(src)] == [f"<src>:{i}" for i in (1, 2, 3, 4, 5, 6, 7, 8)], banned_uses(src)


def test_refit_never_imports_or_calls_pickle() -> None:
    files = sorted(ROOT.rglob("*.py"))
    assert len(files) > 20, f"found only {len(files)} modules under {ROOT}"
    found = [f for p in files for f in banned_uses(p.read_text(), str(p.relative_to(ROOT.parent)))]
    assert found == [], "pickle-like deserialization in refit (use msgpack through refit/wire.py):\n" + "\n".join(found)
