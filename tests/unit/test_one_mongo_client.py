"""motor (end of support May 2027) is imported by one module only, so that moving to
PyMongo's async client is a one-file change."""

from __future__ import annotations

import ast
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
PACKAGES = ("common", "api_gateway", "ingestion_service", "billing_service", "analytics_service")


def _imports_motor(path: Path) -> bool:
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import) and any(
            a.name.split(".")[0] == "motor" for a in node.names
        ):
            return True
        if isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] == "motor":
            return True
    return False


def test_only_common_mongo_imports_motor() -> None:
    modules = [path for package in PACKAGES for path in (REPO / package).rglob("*.py")]
    importers = {str(path.relative_to(REPO)) for path in modules if _imports_motor(path)}
    assert importers == {"common/mongo.py"}
