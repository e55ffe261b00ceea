"""The import graph is the architecture (ARCHITECTURE.md): read from every module's source, it has
no cycle, imports of our own modules sit at the top of the file, the root's library imports no
folder (except checkpoint.py, whose open_model reads pretrained/), and nothing imports a script."""

import ast
import os

from helpers import ROOT

FOLDERS = ("pretrained", "training", "benchmarks", "data")
SCRIPTS = {"train", "sample", "export", "bench", "data.prepare", "data.chat_prompts", "data.self_distill",
           "benchmarks.gpu_check"}
ROOT_LIBRARY = {"model", "diffusion_head", "orthrus", "consensus", "sampling", "decoding", "errors", "tokenizer", "cli",
                "checkpoint", "tree_and_fused"}


def our_modules() -> dict:
    """module name -> path, for every .py file of the root and of the folders (tests excluded)."""
    found = {name[:-3]: os.path.join(ROOT, name) for name in os.listdir(ROOT) if name.endswith(".py")}
    for folder in FOLDERS:
        for name in os.listdir(os.path.join(ROOT, folder)):
            if name.endswith(".py"):
                module = folder if name == "__init__.py" else f"{folder}.{name[:-3]}"
                found[module] = os.path.join(ROOT, folder, name)
    return found


def imports(path: str, modules: dict):
    """(our modules imported at the top of the file, our modules imported anywhere deeper)."""
    tree = ast.parse(open(path, encoding="utf-8").read())
    top_level = {id(node) for node in tree.body}
    top, nested = set(), set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0:
            # `from pkg import sub` imports pkg.sub when that is a module, else a name of pkg
            names = [f"{node.module}.{a.name}" if f"{node.module}.{a.name}" in modules else node.module
                     for a in node.names]
        else:
            continue
        ours = {n for n in names if n in modules}
        (top if id(node) in top_level else nested).update(ours)
    return top, nested


def graph():
    modules = our_modules()
    edges, nested = {}, {}
    for name, path in modules.items():
        edges[name], nested[name] = imports(path, modules)
    return modules, edges, nested


def find_cycle(edges: dict):
    state, stack = {}, []

    def visit(node):
        state[node] = "open"
        stack.append(node)
        for nxt in sorted(edges.get(node, ())):
            if state.get(nxt) == "open":
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state:
                cycle = visit(nxt)
                if cycle:
                    return cycle
        stack.pop()
        state[node] = "done"
        return None

    for node in sorted(edges):
        if node not in state:
            cycle = visit(node)
            if cycle:
                return cycle
    return None


def test_the_layout_is_what_this_test_knows():
    modules, _, _ = graph()
    assert ROOT_LIBRARY | {"train", "sample", "export", "bench"} == {m for m in modules if "." not in m} - set(FOLDERS)
    assert SCRIPTS <= set(modules)


def test_no_import_cycle():
    _, edges, _ = graph()
    assert find_cycle(edges) is None, " -> ".join(find_cycle(edges))


def test_our_modules_are_imported_at_the_top():
    _, _, nested = graph()
    hidden = {name: sorted(deps) for name, deps in nested.items() if deps}
    assert not hidden, f"imports of our own modules inside functions: {hidden}"


def test_arrows_point_down():
    _, edges, _ = graph()
    for name, deps in edges.items():
        assert not deps & SCRIPTS, f"{name} imports the script(s) {sorted(deps & SCRIPTS)}"
        if name in ROOT_LIBRARY:
            allowed = ROOT_LIBRARY | ({"pretrained"} if name == "checkpoint" else set())
            upward = {d for d in deps if d.split(".")[0] not in allowed}
            assert not upward, f"root library module {name} imports {sorted(upward)}"
    assert edges["model"] <= {"errors"}, "the base model knows nothing of the head, the decoders or the files"
    assert not edges["consensus"], "the verifier imports no model, head or sampler"


def test_the_checker_sees_a_cycle_and_a_hidden_import(tmp_path):
    """The checks above can fail: a two-module cycle is found, and so is an import in a function."""
    assert find_cycle({"a": {"b"}, "b": {"a"}}) == ["a", "b", "a"]
    (tmp_path / "m.py").write_text("import os\n\n\ndef f():\n    import model\n")
    top, nested = imports(str(tmp_path / "m.py"), {"model": ""})
    assert top == set() and nested == {"model"}
