"""The docs and the code's shape: links that resolve, the deployment page's recipe as the
test runs it, and the layers of the architecture page (imports point down, no circles)."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

from tests.conftest import ROOT

PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)")
PACKAGES = ("flower_app", "strategies", "clients")


def relative_links(page: Path) -> list[str]:
    """The page's Markdown link targets that are paths (no URL, no bare anchor)."""
    text = re.sub(r"```.*?```", "", page.read_text(), flags=re.S)  # code blocks hold no links
    targets = [m.group(1).split("#", 1)[0] for m in LINK.finditer(text)]
    return [t for t in targets if t and not re.match(r"[a-z][a-z0-9+.-]*:", t)]


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_relative_link_points_at_a_file_that_exists(page):
    missing = [t for t in relative_links(page) if not (page.parent / t).exists()]
    assert missing == [], f"{page.relative_to(ROOT)} links to missing files: {missing}"


def test_the_link_finder_sees_paths_and_skips_urls_and_anchors(tmp_path):
    page = tmp_path / "page.md"
    page.write_text(
        '[a](docs/a.md#x) [b](https://flower.ai) [c](#top) [d](../x.png "t")\n'
        "```bash\n[e](not/a/link.md)\n```\n"
    )
    assert relative_links(page) == ["docs/a.md", "../x.png"]


def test_the_deployment_page_shows_the_recipe_that_the_test_runs():
    """tests/e2e/test_deployment.py runs scripts/deployment_loopback.sh; the page shows it."""
    text = (ROOT / "docs" / "deployment.md").read_text()
    after = text[text.index("<!-- deployment recipe -->") :]
    start = after.index("```bash\n") + len("```bash\n")
    block = after[start : after.index("```", start)]
    assert block == (ROOT / "scripts" / "deployment_loopback.sh").read_text()


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def first_party_imports(path: Path, modules: set[str]) -> set[str]:
    """Every first-party module that ``path`` imports, at module level or in a function."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [f"{node.module}.{alias.name}" for alias in node.names] + [node.module]
        else:
            continue
        found |= {n for n in names if n in modules}
    return found


def import_graph() -> dict[str, set[str]]:
    paths = [p for package in PACKAGES for p in (ROOT / package).rglob("*.py")]
    modules = {module_name(p) for p in paths}
    graph = {module_name(p): first_party_imports(p, modules) for p in paths}
    # a module's own package (``flower_app`` for ``flower_app.config``) is no dependency
    return {m: {d for d in ds if d != m and not m.startswith(f"{d}.")} for m, ds in graph.items()}


def test_strategies_and_clients_import_nothing_of_the_app_nor_each_other():
    for module, deps in import_graph().items():
        top = module.split(".")[0]
        if top == "strategies":
            assert not {d for d in deps if d.split(".")[0] in ("flower_app", "clients")}, module
        if top == "clients":
            assert not {d for d in deps if d.split(".")[0] in ("flower_app", "strategies")}, module


def test_strategies_the_round_loop_and_the_client_handlers_import_nothing_of_the_transport():
    """Strategies, the round loop and the reply checks see ArrayRecords and tensors: how
    weights travel is the run's Grid's business (``strategies/transport/grid.py``) and, on a
    node, a ClientApp mod's (``strategies/transport/node.py``): the ClientApp's module names
    only that mod, where it builds the app, and no handler names it."""
    for module, deps in import_graph().items():
        if module.startswith("strategies.") and not module.startswith("strategies.transport"):
            assert not {d for d in deps if d.startswith("strategies.transport")}, module
    path = ROOT / "flower_app" / "client_app.py"
    tree = ast.parse(path.read_text())
    all_imports = [n for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)]
    assert [n.module for n in all_imports if "transport" in (n.module or "")] == [
        "strategies.transport.node"
    ]
    handlers = [n for n in ast.walk(tree) if isinstance(n, ast.FunctionDef)]
    for handler in handlers:
        names = {n.id for n in ast.walk(handler) if isinstance(n, ast.Name)}
        assert "node_transport" not in names, handler.name


def import_circle(graph: dict[str, set[str]]) -> list[str]:
    """One circle of ``graph`` as a path (first module repeated at the end), or []."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done

    def visit(module: str, path: list[str]) -> list[str]:
        state[module] = 1
        for dep in sorted(graph.get(module, ())):
            if state.get(dep) == 1:
                return [*path[path.index(dep) :], dep]
            if dep not in state and (circle := visit(dep, [*path, dep])):
                return circle
        state[module] = 2
        return []

    for module in sorted(graph):
        if module not in state and (circle := visit(module, [module])):
            return circle
    return []


def test_the_circle_finder_finds_a_circle_through_three_modules():
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert import_circle(graph) == ["a", "b", "c", "a"]
    assert import_circle({"a": {"b"}, "b": set(), "c": {"a", "b"}}) == []


def test_no_two_modules_import_each_other_directly_or_through_others():
    assert import_circle(import_graph()) == []


def test_flower_app_keeps_only_the_apps_and_the_schema_at_its_root():
    root = {p.name for p in (ROOT / "flower_app").glob("*.py")}
    assert root == {"__init__.py", "client_app.py", "server_app.py", "config.py"}


def test_the_configuration_page_names_every_run_config_key():
    from flower_app.config import RunConfig

    text = (ROOT / "docs" / "configuration.md").read_text()
    keys = RunConfig.keys()  # a classmethod: the kebab-case keys
    assert [k for k in keys if f"`{k}`" not in text] == []
