"""The project's layout: the modules README.md names, and its import graph, read from the code."""
import ast
import re

from conftest import ROOT

MODULES = sorted(p.stem for p in ROOT.glob("*.py"))


def project_imports(module: str) -> set[str]:
    """The project modules that `module` imports (any `import x` / `from x import ...`)."""
    tree = ast.parse((ROOT / f"{module}.py").read_text())
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module.split(".")[0])
    return names & set(MODULES)


def readme_graph() -> dict[str, set[str]]:
    """README.md's import graph: the `module -> a, b` lines of the block under "Import graph"."""
    text = (ROOT / "README.md").read_text()
    block = text[text.index("Import graph"):].split("```")[1]
    graph = {}
    for line in block.strip().splitlines():
        name, deps = (part.strip() for part in line.split("->"))
        graph[name] = {d for d in re.split(r"[,\s]+", deps) if d in MODULES}
    return graph


def test_the_import_graph_is_the_readmes_and_has_no_circle():
    actual = {m: project_imports(m) for m in MODULES}
    assert len(MODULES) <= 11, MODULES
    assert readme_graph() == actual
    for top in ("train", "eval", "bench"):                    # entry points: nothing imports them
        assert not [m for m, deps in actual.items() if top in deps], top
    visiting, done = set(), set()

    def visit(m, path):                                       # depth-first: a circle revisits
        assert m not in visiting, f"import circle: {' -> '.join(path + [m])}"
        if m not in done:
            visiting.add(m)
            for d in actual[m]:
                visit(d, path + [m])
            visiting.discard(m)
            done.add(m)
    for m in MODULES:
        visit(m, [])
