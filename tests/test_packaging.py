"""The package declares what it imports: a fresh `pip install .` runs every command."""

import ast
import importlib.metadata
import re
import sys
import tomllib
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def _name(requirement: str) -> str:
    """A distribution's normalised name (PEP 503) from a requirement string."""
    return re.sub(r"[-_.]+", "-", re.match(r"[A-Za-z0-9_.\-]+", requirement).group()).lower()


def _imports(tree: ast.Module) -> list[tuple[str, bool]]:
    """(top-level module, whether imported at the module's top level) of each absolute import in `tree`."""
    top_level = {id(node) for node in tree.body}
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            modules = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            modules = [node.module]
        else:
            continue
        out += [(m.split(".")[0], id(node) in top_level) for m in modules]
    return out


def test_every_third_party_import_is_a_declared_dependency():
    """jinja2 (chat templates) was imported but not declared: transformers renders templates with it but
    does not require it, so a fresh install failed at its first chat template. A module imported at a
    module's top level must be a dependency; one imported where it is used (tensorboard, when installed)
    may be an optional one."""
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    required = {_name(d) for d in project["dependencies"]}
    optional = {_name(d) for group in project["optional-dependencies"].values() for d in group}
    provided = importlib.metadata.packages_distributions()
    missing = {}
    for path in sorted((REPO / "copg_jax").rglob("*.py")):
        for top, at_top in _imports(ast.parse(path.read_text())):
            if top in sys.stdlib_module_names or top == "copg_jax":
                continue
            allowed = required if at_top else required | optional
            if not {_name(d) for d in provided.get(top, [])} & allowed:
                missing.setdefault(top, str(path.relative_to(REPO)))
    assert not missing, f"imported but not declared in pyproject.toml: {missing}"
