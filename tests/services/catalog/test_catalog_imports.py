"""The catalog's modules import one way: families, byo <- tools <- model_repo.

A module lower in the order imports nothing above it, not even inside a function, so the
catalog (and a versioned catalog on top of it) can be loaded from any end without a
circle.
"""

import ast
import subprocess
import sys
from pathlib import Path

import mosmedai

PACKAGE = Path(mosmedai.__file__).parent
#: Each module, and the catalog modules it must never import.
ORDER = {"byo": {"tools", "model_repo"}, "tools": {"model_repo"}, "model_repo": set()}
CATALOG_MODULES = set(ORDER)
#: Where each lives (catalog/ holds the tools; serving/ the Triton model repository built from them).
HOMES = {"byo": "catalog", "tools": "catalog", "model_repo": "serving"}


def imported_catalog_modules(module: str) -> set[str]:
    """The catalog modules a module's source imports anywhere (top level or in a function)."""
    tree = ast.parse((PACKAGE / HOMES[module] / f"{module}.py").read_text())
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module:
            names = [node.module] + [f"{node.module}.{alias.name}" for alias in node.names]
        else:
            continue
        for name in names:
            parts = name.split(".")
            if parts[0] == "mosmedai" and len(parts) > 2 and parts[2] in CATALOG_MODULES \
                    and HOMES[parts[2]] == parts[1]:
                found.add(parts[2])
    return found - {module}


def test_catalog_modules_import_one_way():
    wrong = {module: sorted(imported_catalog_modules(module) & forbidden)
             for module, forbidden in ORDER.items() if imported_catalog_modules(module) & forbidden}
    assert not wrong, f"imports against the order families, byo <- tools <- model_repo: {wrong}"
    # the order is used, not only allowed: each module builds on the one below
    assert imported_catalog_modules("tools") == {"byo"}
    assert imported_catalog_modules("model_repo") == {"byo", "tools"}


def test_each_module_loads_without_the_ones_above_it():
    code = ("import sys, importlib; homes = dict(h.split(':') for h in sys.argv[2:]); "
            "importlib.import_module(f'mosmedai.{homes[sys.argv[1]]}.{sys.argv[1]}'); "
            "print(' '.join(sorted(m for m in homes if f'mosmedai.{homes[m]}.{m}' in sys.modules)))")
    homes = [f"{module}:{home}" for module, home in HOMES.items()]
    loaded = {module: subprocess.run([sys.executable, "-c", code, module, *homes], capture_output=True, text=True,
                                     timeout=120, check=True).stdout.split()
              for module in ORDER}
    assert loaded == {"byo": ["byo"], "tools": ["byo", "tools"], "model_repo": ["byo", "model_repo", "tools"]}
