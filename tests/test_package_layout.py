"""The package's shape: no import cycle between its modules.

Imports inside a module's ``__getattr__`` (PEP 562 deprecated aliases, resolved on
first use) and under ``if TYPE_CHECKING:`` (annotations only) do not count; every
other import does, also one inside a function.
"""
import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / 'expand_mm'


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix('').parts)
    return '.'.join(parts[:-1] if parts[-1] == '__init__' else parts)


def _imports(tree: ast.Module) -> list[ast.ImportFrom | ast.Import]:
    """Every import of ``tree`` outside ``def __getattr__`` and ``if TYPE_CHECKING:``."""
    found, skip = [], set()
    for node in ast.walk(tree):
        if (isinstance(node, ast.FunctionDef) and node.name == '__getattr__') or (
                isinstance(node, ast.If) and getattr(node.test, 'id', None) == 'TYPE_CHECKING'):
            skip.update(id(n) for n in ast.walk(node))
    for node in ast.walk(tree):
        if isinstance(node, (ast.Import, ast.ImportFrom)) and id(node) not in skip:
            found.append(node)
    return found


def import_graph() -> dict[str, set[str]]:
    """Module -> the package modules it imports (parent packages left out)."""
    modules = {_module_name(p): p for p in PACKAGE.rglob('*.py')}
    graph = {name: set() for name in modules}
    for name, path in modules.items():
        base = name.split('.') if path.name == '__init__.py' else name.split('.')[:-1]
        for node in _imports(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            else:
                prefix = '.'.join(base[:len(base) - node.level + 1] + (
                    [node.module] if node.module else [])) if node.level else node.module or ''
                targets = [f'{prefix}.{alias.name}' if f'{prefix}.{alias.name}' in modules
                           else prefix for alias in node.names]
            graph[name].update(t for t in targets if t in modules and t != name
                               and not name.startswith(t + '.'))
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle of ``graph`` as a list of modules, or None."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        path.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_find_cycle_finds_a_cycle():
    assert find_cycle({'a': {'b'}, 'b': {'c'}, 'c': {'a'}}) == ['a', 'b', 'c', 'a']
    assert find_cycle({'a': {'b'}, 'b': set()}) is None


def test_the_package_has_no_import_cycle():
    graph = import_graph()
    assert 'expand_mm.models.deployable' in graph['expand_mm.models.wrappers']
    assert find_cycle(graph) is None, ' -> '.join(find_cycle(graph))
