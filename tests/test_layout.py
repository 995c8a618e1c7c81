"""The library's arrows point one way: every module imports, the model (the bottom of the house) imports no
generation, weights, processing, training or serving code, evaluation does not import training, and nothing
in qwen2vl/ imports the recipes or the examples beside it. Read from the source (every import statement, those inside
functions too), so a lazy import cannot hide a circle."""

import ast
import importlib
import pkgutil
from pathlib import Path

import pytest

import qwen2vl

PACKAGE = Path(qwen2vl.__file__).parent
MODULES = sorted(
    m.name for m in pkgutil.walk_packages([str(PACKAGE)], prefix="qwen2vl.") if m.name != "qwen2vl.__main__"
)


def imports_of(module: str) -> set[str]:
    """The modules ``module`` imports, absolute, at any depth of its source."""
    path = PACKAGE.joinpath(*module.split(".")[1:])
    is_package = path.is_dir()
    source = (path / "__init__.py") if is_package else path.with_suffix(".py")
    package = module if is_package else module.rsplit(".", 1)[0]
    found = set()
    for node in ast.walk(ast.parse(source.read_text(), str(source))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module
            found.add(target)
            found.update(f"{target}.{alias.name}" for alias in node.names)  # `from . import weights`
    return found


def test_every_module_imports():
    assert len(MODULES) > 30
    for name in MODULES:
        importlib.import_module(name)


@pytest.mark.parametrize("module", [m for m in MODULES if m.startswith("qwen2vl.model")])
def test_the_model_imports_nothing_above_it(module):
    above = ("qwen2vl.generate", "qwen2vl.weights", "qwen2vl.processing", "qwen2vl.train", "qwen2vl.serve",
             "qwen2vl.pretrained", "qwen2vl.assistant")  # fmt: skip
    bad = sorted(i for i in imports_of(module) if i.startswith(above))
    assert not bad, f"{module} imports {bad}"


def test_evaluation_does_not_import_training():
    for module in (m for m in MODULES if m.startswith("qwen2vl.eval")):
        bad = sorted(i for i in imports_of(module) if i.startswith("qwen2vl.train"))
        assert not bad, f"{module} imports {bad}"


def test_nothing_in_the_library_imports_the_recipes_or_the_examples():
    for module in MODULES:
        bad = sorted(i for i in imports_of(module) if i.split(".")[0] in ("recipes", "examples"))
        assert not bad, f"{module} imports {bad}"
