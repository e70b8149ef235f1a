"""The layout's rules, checked on the source: layers, no import cycles, typed contracts.

- Dependencies flow `scenarios -> parties -> (governance, federated, mpc)`;
  governance and federated may use mpc; nothing imports scenarios.
- No module imports itself through others (no import cycle), counting
  function-local imports: a cycle broken only at run time is still a cycle.
- Inside `parties/`, a capability uses the runtime and, of another capability, its
  contract (`api.py`), its client side and its node-local store modules: never a
  module that serves routes.
- Route paths are written once, in the `api.py` files.
- A capability's `api.py` and the insurer SDK load no web server and no database.
"""

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("mpc", "governance", "federated", "parties", "scenarios", "bench", "tests")
MAY_IMPORT = {
    "mpc": {"mpc"},
    "governance": {"governance", "mpc"},
    "federated": {"federated", "mpc"},
    "parties": {"parties", "governance", "federated", "mpc"},
    # The `cogov` command (scenarios.cli) also mounts the benchmarks' commands.
    "scenarios": {"scenarios", "bench", "parties", "governance", "federated", "mpc"},
    "bench": {"bench", "scenarios", "parties", "governance", "federated", "mpc"},
    "tests": set(PACKAGES),
}


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _project_modules() -> dict[str, Path]:
    found = {}
    for package in PACKAGES:
        for path in (ROOT / package).rglob("*.py"):
            if "claim_package" in path.parts or "results" in path.parts:
                continue  # algorithm packages and benchmark output are not project modules
            found[_module_name(path)] = path
    return found


MODULES = _project_modules()


def _is_type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _imports(module: str, path: Path) -> set[str]:
    """Project modules `module` imports anywhere in its body (type-checking blocks aside)."""
    tree = ast.parse(path.read_text(), str(path))
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found: set[str] = set()

    def visit(node: ast.AST) -> None:
        if isinstance(node, ast.If) and _is_type_checking(node):
            for child in node.orelse:
                visit(child)
            return
        if isinstance(node, ast.Import):
            for alias in node.names:
                found.add(alias.name)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, base] if base else anchor)
            for alias in node.names:
                candidate = f"{base}.{alias.name}"
                found.add(candidate if candidate in MODULES else base)
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(tree)
    return {name for name in found if name in MODULES and name != module}


GRAPH = {module: _imports(module, path) for module, path in MODULES.items()}


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    out: list[list[str]] = []
    counter = [0]

    def connect(node: str) -> None:
        index[node] = low[node] = counter[0]
        counter[0] += 1
        stack.append(node)
        on_stack.add(node)
        for nxt in sorted(graph[node]):
            if nxt not in index:
                connect(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                out.append(sorted(component))

    sys.setrecursionlimit(max(sys.getrecursionlimit(), 10 * len(graph)))
    for node in sorted(graph):
        if node not in index:
            connect(node)
    return out


def test_the_cycle_finder_finds_a_cycle() -> None:
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert _cycles({"a": {"b"}, "b": set()}) == []


def test_no_import_cycle_between_project_modules() -> None:
    assert _cycles(GRAPH) == []


def test_dependencies_flow_one_way() -> None:
    wrong = [
        f"{module} imports {target}"
        for module, targets in GRAPH.items()
        for target in targets
        if target.split(".")[0] not in MAY_IMPORT[module.split(".")[0]]
    ]
    assert wrong == []


def _capability(module: str) -> str | None:
    parts = module.split(".")
    if parts[0] != "parties" or len(parts) < 3 or parts[1] == "runtime":
        return None
    return parts[1]


def _serves_routes(module: str) -> bool:
    imported = GRAPH[module] | {
        alias.name for node in ast.walk(ast.parse(MODULES[module].read_text()))
        if isinstance(node, ast.Import | ast.ImportFrom)
        for alias in ([ast.alias(node.module or "")] if isinstance(node, ast.ImportFrom)
                      else node.names)
    }
    return any(name.split(".")[0] == "fastapi" or name == "parties.runtime.mount"
               for name in imported)


def test_serving_modules_are_recognised() -> None:
    assert _serves_routes("parties.admin.service")
    assert not _serves_routes("parties.admin.api")


def test_capabilities_never_import_each_others_services() -> None:
    wrong = [
        f"{module} imports {target}"
        for module, targets in GRAPH.items()
        if _capability(module) is not None
        for target in targets
        if _capability(target) not in (None, _capability(module)) and _serves_routes(target)
    ]
    assert wrong == []


def test_runtime_knows_no_capability() -> None:
    wrong = [
        f"{module} imports {target}"
        for module, targets in GRAPH.items()
        if module.startswith("parties.runtime")
        for target in targets
        if target.startswith("parties.") and not target.startswith("parties.runtime")
    ]
    assert wrong == []


def test_route_paths_are_written_only_in_api_modules() -> None:
    literal = "/" + "v1/"  # split so this file does not match itself
    wrong = []
    for path in sorted(ROOT.rglob("*.py")):
        if ".venv" in path.parts or path.name == "api.py":
            continue
        for number, line in enumerate(path.read_text().splitlines(), 1):
            for quote in ('"', "'"):
                if quote + literal in line:
                    wrong.append(f"{path.relative_to(ROOT)}:{number}: {line.strip()}")
    assert wrong == []


def _contract_modules() -> list[str]:
    apis = sorted(m for m in MODULES if m.startswith("parties.") and m.endswith(".api"))
    return [*apis, "parties.claims.client", "parties.domains.client"]


@pytest.mark.parametrize("module", _contract_modules())
def test_contracts_load_no_server_and_no_database(module: str) -> None:
    """In a fresh interpreter, as an insurer's integration would import it."""
    probe = (
        f"import sys, {module}\n"
        "heavy = ('fastapi', 'starlette', 'uvicorn', 'sqlite3', '_sqlite3')\n"
        "loaded = sorted(m for m in sys.modules if m.split('.')[0] in heavy"
        " or '.service' in m or m.startswith('parties.runtime.app'))\n"
        "print(','.join(loaded))\n"
    )
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True,
                          cwd=ROOT, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == ""
