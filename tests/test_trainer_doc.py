"""docs/trainer.md's examples, run in order in one namespace (as a reader would paste them)."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest

pytestmark = pytest.mark.unit

DOC = Path(__file__).resolve().parent.parent / "docs" / "trainer.md"


def test_trainer_doc_examples_run() -> None:
    blocks = re.findall(r"```python\n(.*?)```", DOC.read_text(), flags=re.S)
    assert len(blocks) == 5
    namespace: dict[str, Any] = {}
    for i, block in enumerate(blocks):
        exec(compile(block, f"{DOC}:block{i}", "exec"), namespace)
    assert namespace["report"].tensors == len(namespace["source"])
