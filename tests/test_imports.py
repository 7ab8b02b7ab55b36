"""The package has no import cycle: every module's imports (top-level, inside functions, and for type hints) form a DAG."""

import ast
from pathlib import Path

import gradientspace

PACKAGE = Path(gradientspace.__file__).parent


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports_of(path: Path, modules: set[str]) -> set[str]:
    """The package modules `path` imports anywhere in its text, `from . import x` resolved to the module x where it is one."""
    name = module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                source = ".".join(base + ([node.module] if node.module else []))
            else:
                source = node.module or ""
            for alias in node.names:
                target = f"{source}.{alias.name}"
                found.add(target if target in modules else source)
        elif isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
    return {m for m in found if m in modules and m != name}


def import_graph() -> dict[str, set[str]]:
    paths = {module_name(p): p for p in PACKAGE.rglob("*.py")}
    modules = set(paths)
    # a package's __init__ re-exports its modules for users; it is not one of their dependencies
    return {
        name: imports_of(path, modules) - {"gradientspace"} for name, path in paths.items() if name != "gradientspace"
    }


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, str] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = "open"
        stack.append(node)
        for child in sorted(graph.get(node, ())):
            if state.get(child) == "open":
                return stack[stack.index(child) :] + [child]
            if child not in state and (cycle := visit(child)):
                return cycle
        state[node] = "done"
        stack.pop()
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_the_checker_finds_a_cycle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_no_module_of_the_package_imports_itself_back():
    graph = import_graph()
    assert len(graph) > 20  # every module was read
    assert find_cycle(graph) is None, " → ".join(find_cycle(graph))


# The layers, bottom first (DEVELOPERS.md, Layout): a module imports only from its own layer or below.
LAYERS = [
    ["config", "data", "distributed", "runs"],
    ["gradients"],
    ["models"],
    ["runner"],
    ["clustering"],
    ["experts"],
    ["routing"],
    ["evaluation", "serving"],
    ["preflight", "commands", "export", "selection", "cli"],
]
# each import that runs back up, with why it stands
ALLOWED_UPWARD = {
    # the gradient pass writes the random projections the asked strategies' partitions will read
    ("gradientspace.clustering.stages", "gradientspace.experts.strategies"),
}


def layer(module: str) -> int:
    part = module.split(".")[1]
    return next(i for i, names in enumerate(LAYERS) if part in names)


def test_the_folders_are_the_layers():
    graph = import_graph()
    placed = {module: layer(module) for module in graph}  # every module lies in a layer (a new folder must be placed)
    upward = {(a, b) for a, targets in graph.items() for b in targets if placed[b] > placed[a]}
    assert upward == ALLOWED_UPWARD, sorted(upward - ALLOWED_UPWARD)
    assert len(ALLOWED_UPWARD) <= 2


def test_a_light_module_does_not_import_the_whole_package():
    """The public API is imported on first use: a process that needs only the config (or a launcher's child that needs one
    module) does not pay seconds for transformers and peft; the names still resolve, and the registries the config
    reads (strategies, metrics) are there without them: their names are the choices and defaults `load_config` checks."""
    import subprocess
    import sys

    probe = (
        "import sys; from gradientspace import load_config; config = load_config(None, {}); "
        "print(sorted({'transformers', 'peft'} & set(sys.modules)), config.experts.strategies, config.evaluate.metrics)"
    )
    printed = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True).stdout
    assert printed == "[] ['routed', 'single', 'random-clusters'] ['exact_match', 'rouge_l']\n", printed
    assert gradientspace.run_all.__module__ == "gradientspace.commands"
    assert set(gradientspace.__all__) <= set(dir(gradientspace))
