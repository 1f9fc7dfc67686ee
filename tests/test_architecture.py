"""The dependency direction is the architecture: only fedsoda.federated may import flwr."""

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src" / "fedsoda"


@pytest.mark.parametrize("package", ["models", "surgery", "align", "data", "evaluate"])
def test_core_packages_never_import_flwr(package):
    for path in (SRC / package).rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            names = []
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module:
                names = [node.module]
            for name in names:
                top = name.split(".")[0]
                assert top != "flwr" and not name.startswith("fedsoda.federated"), f"{path}: {name}"
