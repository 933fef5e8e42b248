"""The rules the package's tree keeps (docs/architecture.md): no import cycles, a pure planner, stages
that import no torch, small modules, `__init__.py` files that only say what their folder is (but where a
public import needs them), and an echo job that runs without torch in a fresh interpreter.

Imports are read from the source with `ast`: those inside functions count, those under TYPE_CHECKING
do not (they are never executed).
"""

import ast
import pickle
import subprocess
import sys
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from helpers.config import REPO
from helpers.data import write_prompts

PACKAGE = REPO / "lmbatch"
NO_TORCH = ("lmbatch.input", "lmbatch.prepare", "lmbatch.replica", "lmbatch.output", "lmbatch.report",
            "lmbatch.engine.echo", "lmbatch.engine.types", "lmbatch.engine.batching", "lmbatch.engine.requests")
"""Modules (and folders) whose imports must not load torch: the CPU stages, and the echo engine's path."""
PUBLIC_PACKAGES = ("lmbatch", "lmbatch.config", "lmbatch.models")
"""The packages whose `__init__.py` hands names on (a public import needs them)."""
MOST_LINES = 450
"""About 400 lines: a module longer than this does more than one job."""


def module_name(path: Path) -> str:
    parts = path.relative_to(REPO).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def imports(name: str, lazy: bool = True) -> set[str]:
    """Every module `name` imports (lmbatch's by their module, others by their top-level name); with
    `lazy`, those inside functions too. TYPE_CHECKING imports are left out."""
    path = MODULES[name]
    tree = ast.parse(path.read_text())
    skipped = {id(n) for node in ast.walk(tree)
               if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.dump(node.test)
               for n in ast.walk(node)}
    if not lazy:
        skipped |= {id(n) for node in ast.walk(tree) if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))
                    for n in ast.walk(node)}
    found = set()
    for node in ast.walk(tree):
        if id(node) in skipped:
            continue
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                package = name if path.name == "__init__.py" else name.rpartition(".")[0]
                base = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1] + [base]).strip(".")
            found |= {f"{base}.{a.name}" if f"{base}.{a.name}" in MODULES else base for a in node.names}
    return {_owner(t) for t in found}


def _owner(target: str) -> str:
    """The module of ours an imported name lives in, or the top-level name of a third-party module."""
    if not target.startswith("lmbatch"):
        return target.split(".")[0]
    while target not in MODULES:
        target = target.rpartition(".")[0]
    return target


def ours(name: str, lazy: bool = True) -> set[str]:
    return {t for t in imports(name, lazy) if t.startswith("lmbatch.") and t != name}


def reachable(name: str, lazy: bool = True) -> set[str]:
    """Every module `name` imports, directly or through others of ours (packages' __init__ included)."""
    seen, todo = set(), [name]
    while todo:
        current = todo.pop()
        for target in ours(current, lazy) | _parents(current):
            if target not in seen and target != name:
                seen.add(target)
                todo.append(target)
    return seen


def _parents(name: str) -> set[str]:
    parts = name.split(".")
    return {".".join(parts[:i]) for i in range(2, len(parts))}


def test_no_module_imports_itself_back_through_others():
    cycles = sorted(name for name in MODULES if name in reachable(name))
    assert not cycles, f"modules on an import cycle: {cycles}"


def test_the_folders_import_one_way():
    """Folders (the stages, and the top-level modules) form layers: no folder imports another that imports
    it back, directly or through others (docs/architecture.md gives the order)."""
    def folder(name: str) -> str:
        return name.split(".")[1] if "." in name else name
    graph: dict[str, set[str]] = {}
    for name in MODULES:
        graph.setdefault(folder(name), set()).update(folder(t) for t in ours(name) if folder(t) != folder(name))

    def below(start: str) -> set[str]:
        seen, todo = set(), [start]
        while todo:
            for nxt in graph.get(todo.pop(), ()):
                if nxt not in seen:
                    seen.add(nxt)
                    todo.append(nxt)
        return seen
    assert not {f for f in graph if f in below(f)}


def test_the_planner_imports_nothing_of_ours_nor_ray_nor_torch():
    assert imports("lmbatch.engine.batching") <= {"__future__", "typing", "collections", "itertools", "math"}


@pytest.mark.parametrize("name", [n for n in MODULES if n.startswith(NO_TORCH)])
def test_the_cpu_stages_import_no_torch(name):
    """Importing such a module loads no torch, nor transformers, through any module it imports; a function
    may import them for engine=hf (the replica loads the hf engine by name), which the echo job below checks."""
    loaded = {name, *reachable(name, lazy=False)}
    assert not {m for m in loaded if {"torch", "transformers"} & imports(m, lazy=False)}, name


def test_modules_stay_small():
    long = {name: n for name, p in MODULES.items() if (n := len(p.read_text().splitlines())) > MOST_LINES}
    assert not long, f"modules over {MOST_LINES} lines: {long}"


def test_init_files_say_what_their_folder_is_and_hand_on_names_only_where_needed():
    for name, path in MODULES.items():
        if path.name != "__init__.py":
            continue
        tree = ast.parse(path.read_text())
        assert ast.get_docstring(tree), f"{path} has no docstring"
        if name not in PUBLIC_PACKAGES:
            assert len(tree.body) == 1, f"{path} holds more than its docstring"


def test_no_module_is_named_like_a_standard_library_module_the_package_uses():
    """A reader who meets `io.read(...)` should not have to look up which io (the package once had one)."""
    used = {t for name in MODULES for t in imports(name)} & sys.stdlib_module_names
    clashes = {name for name in MODULES if name.rpartition(".")[2] in used}
    assert not clashes, clashes


def test_an_echo_job_runs_its_stages_without_torch(tmp_path, tiny_llama):
    """Input, prepare, replica and output with engine=echo, in a fresh interpreter: torch is never imported.
    The plan (which reads the model's config through transformers) is made here and handed over."""
    from lmbatch.config import InputConfig, JobConfig, ModelConfig, OutputConfig
    from lmbatch.plan.job import plan_job

    source = write_prompts(tmp_path / "in.parquet", ["one prompt", "and another, longer one"])
    job = JobConfig(input=InputConfig(path=str(source)), output=OutputConfig(path=str(tmp_path / "out")),
                    model=ModelConfig(path=tiny_llama), engine="echo")
    plan = plan_job(job)
    plan.begin_output()
    handed = tmp_path / "plan.pickle"
    handed.write_bytes(pickle.dumps((plan.job, plan.output.uri, plan.settings, plan.fingerprint, plan.chunks[0])))
    script = f"""
import pickle, sys
from lmbatch.prepare.chunk import prepare_chunk
from lmbatch.replica.actor import Replica
job, uri, settings, fingerprint, chunk = pickle.loads(open({str(handed)!r}, "rb").read())
summary = Replica(job, uri, list(settings.passthrough_columns), fingerprint)(prepare_chunk(chunk, settings))
print(summary.num_rows, "torch" in sys.modules, "transformers.modeling_utils" in sys.modules)
"""
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.split()[-3:] == ["1", "False", "False"]
    part = plan.output.part_files()[plan.chunks[0].id][0]
    assert pq.read_table(part)["id"].to_pylist() == [0]  # two chunks of a row each, for the two replicas
