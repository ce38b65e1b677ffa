"""The package's layers, enforced: imports only go down, integrations never import each other, and the core never
imports a training framework (so a plain PyTorch loop does not need ignite or Lightning).

Layers, bottom to top: ``errors``/``_version`` (0), ``pipeline/`` (1), ``core/`` and ``options`` (2), the
integrations ``ignite/``, ``lightning/``, ``sharded/`` (3), and ``cli``/``__init__``/``__main__`` (4). Every import
statement counts, including those inside functions.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import async_ckpt

PACKAGE = Path(async_ckpt.__file__).parent
INTEGRATIONS = {"ignite", "lightning", "sharded"}
FRAMEWORKS = {"ignite", "lightning", "pytorch_lightning", "monai"}


def unit_of(module: str) -> str:
    """The layer unit of ``async_ckpt.<...>``: the subpackage, or the top-level module name."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def layer_of(unit: str) -> int:
    if unit in {"errors", "_version"}:
        return 0
    if unit == "pipeline":
        return 1
    if unit in {"core", "options"}:
        return 2
    if unit in INTEGRATIONS:
        return 3
    return 4  # cli, __init__, __main__


def module_name(path: Path) -> str:
    rel = path.relative_to(PACKAGE.parent).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts = parts[:-1] if len(parts) > 1 else parts
    return ".".join(parts)


def imports(path: Path) -> set[str]:
    """Every module named by an import statement of ``path`` (relative imports resolved)."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = module_name(path).split(".")
                base = base[: len(base) - node.level + (1 if path.name == "__init__.py" else 0)]
                names.add(".".join(base + ([node.module] if node.module else [])))
            elif node.module:
                names.add(node.module)
    return names


def modules() -> list[Path]:
    return sorted(PACKAGE.rglob("*.py"))


def test_the_package_has_the_layer_folders() -> None:
    for folder in ("pipeline", "core", "ignite", "lightning", "sharded"):
        assert (PACKAGE / folder / "__init__.py").is_file(), folder


def test_imports_only_go_down_and_integrations_never_import_each_other() -> None:
    wrong: list[str] = []
    for path in modules():
        unit = unit_of(module_name(path))
        for name in imports(path):
            if not name.startswith("async_ckpt.") and name != "async_ckpt":
                continue
            target = unit_of(name)
            if target == unit:
                continue
            if layer_of(target) > layer_of(unit) or (layer_of(target) == layer_of(unit) == 3):
                wrong.append(f"{module_name(path)} imports {name}")
    assert not wrong, "imports against the layers:\n" + "\n".join(wrong)


def test_pipeline_and_core_import_no_training_framework() -> None:
    wrong = [
        f"{module_name(path)} imports {name}"
        for path in modules()
        if layer_of(unit_of(module_name(path))) <= 2
        for name in imports(path)
        if name.split(".")[0] in FRAMEWORKS
    ]
    assert not wrong, "\n".join(wrong)


def test_checker_sees_a_violation() -> None:
    """The import scan is not vacuous: it finds the integrations' imports of the core and of ignite."""
    saver = PACKAGE / "ignite" / "saver.py"
    found = imports(saver)
    assert any(name.startswith("async_ckpt.core") for name in found)
    assert any(name.split(".")[0] == "ignite" for name in found)


def test_importing_the_checkpointer_does_not_import_ignite_or_lightning() -> None:
    """A plain PyTorch loop that uses ``from async_ckpt import Checkpointer`` loads no training framework."""
    code = (
        "import sys\n"
        "from async_ckpt import Checkpointer, latest_checkpoint\n"
        "print(sorted(m for m in ('ignite', 'lightning', 'monai') if m in sys.modules))\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    assert done.stdout.strip() == "[]", done.stdout + done.stderr


def test_the_saver_is_still_a_top_level_name() -> None:
    from async_ckpt import AsyncCheckpointSaver
    from async_ckpt.ignite.saver import AsyncCheckpointSaver as defined

    assert AsyncCheckpointSaver is defined


def test_no_class_is_over_500_lines() -> None:
    """Each class stays small enough to read in one sitting (docstrings included)."""
    big = [
        f"{module_name(path)}.{node.name}: {node.end_lineno - node.lineno + 1} lines"
        for path in modules()
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8")))
        if isinstance(node, ast.ClassDef) and node.end_lineno is not None and node.end_lineno - node.lineno + 1 > 500
    ]
    assert not big, "\n".join(big)
