"""Services meet only at their public contracts: no service package imports another.

What two services share lives in ``common`` (the protos, models, settings); anything else
one service needs from another goes through that service's gRPC API or the broker.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
SERVICES = ("api_gateway", "ingestion_service", "billing_service", "analytics_service")


def foreign_imports(path: Path, own: str) -> list[str]:
    """``file:line: module`` for each absolute import of a service package other than ``own``."""
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            modules = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            modules = [node.module]
        else:
            continue  # relative imports stay inside their own package
        for module in modules:
            package = module.split(".")[0]
            if package in SERVICES and package != own:
                found.append(f"{path.relative_to(REPO)}:{node.lineno}: {module}")
    return found


@pytest.mark.parametrize("service", SERVICES)
def test_service_imports_no_other_service(service: str) -> None:
    modules = sorted((REPO / service).rglob("*.py"))
    assert modules, f"{service} has no modules: is the repository layout the expected one?"
    offending = [line for path in modules for line in foreign_imports(path, service)]
    assert not offending, (
        f"{service} imports another service's code; use that service's gRPC API (or move "
        "what both need into common/):\n" + "\n".join(offending)
    )


# The reconciliation checks billing's bills against a computation of its own: importing
# billing's code would repeat billing's mistakes instead of finding them.
INDEPENDENT_OF_BILLING = ("scripts/reconcile.py", "scripts/bill_check.py")


@pytest.mark.parametrize("module", INDEPENDENT_OF_BILLING)
def test_the_reconciliation_does_not_import_billing(module: str) -> None:
    offending = [
        line
        for line in foreign_imports(REPO / module, own="")
        if line.split(": ")[-1].split(".")[0] == "billing_service"
    ]
    assert not offending, (
        f"{module} imports billing's code; work the bills out independently:\n"
        + "\n".join(offending)
    )
