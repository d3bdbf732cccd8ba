"""The sidecar and the read side never import the flusher (they share PostgreSQL helpers through core).

A static scan of every import statement (module level and inside functions), so a lazy import that
a test run happens not to execute is caught too; test_lazy_imports checks the running app.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
from support import REPO

FORBIDDEN = "analytics_pipeline.flusher"


def imported_modules(path: Path) -> set[str]:
    """Every absolute module name that ``path`` imports, relative imports resolved against its package."""
    package = {"sidecar": "analytics_pipeline.sidecar", "reads": "analytics_pipeline.reads"}[path.parent.name]
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                base = ".".join([*parts, base] if base else parts)
            names.update(f"{base}.{alias.name}" for alias in node.names)
            names.add(base)
    return names


@pytest.mark.parametrize("folder", ["sidecar", "reads"])
def test_no_module_imports_the_flusher(folder: str) -> None:
    files = sorted((Path(REPO) / folder).glob("*.py"))
    assert files
    offenders = {str(path.relative_to(REPO)): sorted(name for name in imported_modules(path)
                                                      if name == FORBIDDEN or name.startswith(FORBIDDEN + "."))
                 for path in files}
    assert {path: names for path, names in offenders.items() if names} == {}
