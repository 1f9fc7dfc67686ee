"""The dependency direction is the architecture: which fedsoda packages and modules each one
may import, and that only fedsoda.federated imports flwr.

Every import counts, also one deferred inside a function. A new package or top-level module
fails until it is added to ``ALLOWED`` with what it may import.
"""

import ast
import subprocess
import sys
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src" / "fedsoda"

# Each fedsoda package (or top-level module) -> the other ones it may import. Arrows point
# down: core libraries at the bottom, then the methods, the runtime, the tools, the CLI.
BELOW_METHODS = {"models", "data", "surgery", "align", "evaluate", "activation_cache",
                 "training", "accounting", "aggregation", "budgets", "schedule", "wire",
                 "wire_settings", "fidelity", "dp_settings", "phases", "progress_feed"}
ALLOWED: dict[str, set[str]] = {
    "__init__": set(),
    "models": set(),
    "data": set(),
    "progress_feed": set(),  # a server's progress as events, for a process that draws it
    "phases": {"progress_feed"},  # progress bars of the long phases: used from the bottom up
    "surgery": {"models", "data", "phases"},
    # align: task examples are batched as training batches them; gradient matching matches
    # the probe's losses
    "align": {"models", "data", "surgery", "phases", "training", "fidelity"},
    "evaluate": {"models", "data", "phases"},
    "activation_cache": {"models", "data", "surgery"},
    "training": {"models", "data", "surgery", "activation_cache"},
    "accounting": {"models", "data", "surgery", "training"},
    "fidelity": {"models", "data", "surgery", "training"},
    "aggregation": {"models", "surgery"},
    "budgets": {"models", "surgery", "accounting"},
    "schedule": set(),
    "wire_settings": set(),
    "dp_settings": set(),
    "wire": {"wire_settings"},
    "methods": BELOW_METHODS,
    "federated": BELOW_METHODS | {"methods"},
    # planner imports federated for RunConfig's defaults
    "planner": {"models", "surgery", "methods", "federated", "wire", "wire_settings"},
    "spread": set(),
    "clock_report": {"methods", "spread"},
    "comparison": {"methods", "clock_report", "spread"},
    "benchmark": {"models", "data", "surgery", "activation_cache", "training", "accounting"},
    "commands": BELOW_METHODS | {"methods", "federated", "planner", "comparison", "benchmark"},
    "cli": {"models", "data", "surgery", "align", "methods", "federated", "commands",
            "wire_settings"},
}
# Third-party runtimes only some places may import: flwr (and the Ray it starts) only in the
# runtime; Flower Datasets, a data library, only where clients' partitions are drawn.
RESTRICTED = {"flwr": ("federated",), "ray": ("federated",), "flwr_datasets": ("data/partition.py",)}


def unit_of(path: Path) -> str:
    """``models`` for ``src/fedsoda/models/x.py``, ``cli`` for ``src/fedsoda/cli.py``."""
    relative = path.relative_to(SRC)
    return relative.parts[0] if len(relative.parts) > 1 else relative.stem


def imported_names(source: str, package: str) -> list[str]:
    """Dotted names of everything ``source`` imports, anywhere in it (relative ones resolved
    against ``package``, the dotted name of the module's package)."""
    names = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            names += [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parent = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(parent + ([base] if base else []))
            # `from fedsoda import cli` imports the module fedsoda.cli.
            names += [f"{base}.{alias.name}" if base == "fedsoda" else base for alias in node.names]
    return names


def violations(relative: str, source: str) -> list[str]:
    """What the module at ``relative`` (under src/fedsoda) imports that the tables forbid."""
    path = SRC / relative
    unit = unit_of(path)
    package = ".".join(["fedsoda", *Path(relative).parts[:-1]])
    found = []
    for name in imported_names(source, package):
        parts = name.split(".")
        if parts[0] in RESTRICTED and not any(
                relative == place or relative.startswith(f"{place}/") for place in RESTRICTED[parts[0]]):
            found.append(f"{relative} imports {name}: only {', '.join(RESTRICTED[parts[0]])} may")
        if parts[0] != "fedsoda" or len(parts) == 1:
            continue
        target = parts[1]
        if target not in ALLOWED:
            found.append(f"{relative} imports {name}, which is not in ALLOWED "
                         "(tests/test_architecture.py); add it there")
        elif target != unit and target not in ALLOWED[unit]:
            found.append(f"{relative} imports {name}: {unit} may import only "
                         f"{', '.join(sorted(ALLOWED[unit])) or 'nothing of fedsoda'}")
    return found


def test_every_module_is_in_the_table():
    units = {unit_of(path) for path in SRC.rglob("*.py")}
    unknown = sorted(units - set(ALLOWED))
    assert not unknown, (f"fedsoda modules not in ALLOWED of tests/test_architecture.py: {unknown}; "
                         "add each with the fedsoda packages and modules it may import")


@pytest.mark.parametrize("unit", sorted(ALLOWED))
def test_imports_follow_the_table(unit):
    paths = [SRC / f"{unit}.py"] if (SRC / f"{unit}.py").is_file() else sorted((SRC / unit).rglob("*.py"))
    found = []
    for path in paths:
        found += violations(str(path.relative_to(SRC)), path.read_text())
    assert not found, "\n".join(found)


@pytest.mark.parametrize(("relative", "source", "expected"), [
    # The arrow issue 14 found pointing up: a method importing a CLI command.
    ("methods/server_models.py", "from fedsoda.commands.model_prep import prune",
     "methods may import only"),
    ("surgery/plan.py", "def f():\n    from fedsoda.align import oda", "surgery may import only"),
    ("models/loading.py", "from .. import federated", "models may import only"),
    ("align/oda.py", "import flwr", "only federated may"),
    ("data/task.py", "from flwr_datasets import partitioner", "only data/partition.py may"),
    ("methods/fedsoda.py", "from fedsoda.newthing import x", "not in ALLOWED"),
])
def test_the_check_catches_forbidden_imports(relative, source, expected):
    assert any(expected in line for line in violations(relative, source)), violations(relative, source)


def test_allowed_imports_pass_the_check():
    assert violations("federated/client_app.py", "import flwr\nfrom fedsoda.methods import ORDER") == []
    assert violations("data/partition.py", "from flwr_datasets.partitioner import IidPartitioner") == []
    assert violations("commands/run.py", "from fedsoda import planner") == []


def test_the_cli_loads_neither_torch_nor_flwr():
    # `fedsoda --help` and argument errors stay instant.
    code = ("import sys, fedsoda.cli; fedsoda.cli.parser(); "
            "print(sorted(m for m in ('torch', 'flwr', 'ray', 'transformers', 'datasets') "
            "if m in sys.modules))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"
