"""docs/ARCHITECTURE.md's layout rules, checked on the source.

- model/ and pipelines/ import only their own third-party packages: never orchestrator, ray or mlflow.
- Inside orchestrator/, imports go down the floors: cli on top; sweep and bench may use cluster;
  cluster uses train and run; train uses run and config; run uses config. Packages on one floor do
  not import each other, and module-level imports form no cycle.
- Only orchestrator/cluster talks to Kubernetes (imports the kubernetes client).
- Only orchestrator/run writes the run directory's state file, sdo_run.json.
"""
import ast
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
THIRD_PARTY = {
    # model/ imports torch, numpy, scipy only (timm: the optional Swin-T backbone, behind a clear error)
    "model": {"torch", "numpy", "scipy", "model", "timm"},
    # pipelines/ imports torch, webdataset, pycocotools, PIL/numpy (+ tqdm for progress bars)
    "pipelines": {"torch", "numpy", "webdataset", "pycocotools", "PIL", "tqdm", "pipelines", "simplejpeg", "turbojpeg",
                  "braceexpand",  # webdataset's own shard-pattern expander
                  "boto3", "botocore"},  # pipelines/remote.py: shards in S3 (the optional `s3` extra)
}
# orchestrator/ packages (or top-level modules) -> floor; an import may only go to a lower floor or
# stay inside its own package.
FLOORS = {"config": 0, "ops_build": 0, "run": 1, "train": 2, "cluster": 3, "inference": 3, "sweep": 4, "bench": 4,
          "cli": 5}
RUN_STATE_FILE = "sdo_run.json"
STATE_WRITERS = {"write_identity"}


def imported_roots(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(), filename=str(path))
    roots = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            roots.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            roots.add(node.module.split(".")[0])
    return roots


def module_name(path: Path, root: Path) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def source_files(root: Path, package: str) -> list[Path]:
    return sorted((root / package).rglob("*.py"))


def orchestrator_imports(path: Path, root: Path, *, module_level_only: bool) -> set[str]:
    """Modules of orchestrator/ that ``path`` imports (``from pkg import sub`` counts as pkg.sub when sub is a module)."""
    known = {module_name(p, root) for p in source_files(root, "orchestrator")}
    tree = ast.parse(path.read_text(), filename=str(path))
    nodes = tree.body if module_level_only else list(ast.walk(tree))
    found = set()
    for node in nodes:
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.split(".")[0] == "orchestrator")
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module and \
                node.module.split(".")[0] == "orchestrator":
            for alias in node.names:
                sub = f"{node.module}.{alias.name}"
                found.add(sub if sub in known else node.module)
    return found


def floor_violations(root: Path) -> list[str]:
    """'a -> b' for every import inside orchestrator/ that goes up a floor or sideways to another package."""
    bad = []
    for path in source_files(root, "orchestrator"):
        here = module_name(path, root)
        if here == "orchestrator":
            continue
        group = here.split(".")[1]
        for target in sorted(orchestrator_imports(path, root, module_level_only=False)):
            if target == "orchestrator":
                bad.append(f"{here} -> {target}")
                continue
            other = target.split(".")[1]
            if other == group:
                continue
            if group not in FLOORS or other not in FLOORS or FLOORS[other] >= FLOORS[group]:
                bad.append(f"{here} -> {target}")
    return bad


def import_cycles(root: Path) -> list[list[str]]:
    """Cycles of module-level imports among orchestrator/ modules (each as its list of modules)."""
    graph = {module_name(p, root): orchestrator_imports(p, root, module_level_only=True)
             for p in source_files(root, "orchestrator")}
    cycles, state = [], {}

    def visit(node: str, stack: list[str]) -> None:
        state[node] = "open"
        stack.append(node)
        for target in sorted(graph.get(node, ())):
            if state.get(target) == "open":
                cycles.append(stack[stack.index(target):] + [target])
            elif target not in state:
                visit(target, stack)
        stack.pop()
        state[node] = "done"

    for node in sorted(graph):
        if node not in state:
            visit(node, [])
    return cycles


def kubernetes_outside_cluster(root: Path) -> list[str]:
    paths = [p for package in ("model", "pipelines", "orchestrator") for p in source_files(root, package)]
    cluster = root / "orchestrator" / "cluster"
    return [str(p.relative_to(root)) for p in paths
            if "kubernetes" in imported_roots(p) and cluster not in p.parents]


def run_state_writers_outside_run(root: Path) -> list[str]:
    """Modules outside orchestrator/run that name sdo_run.json or call its writer."""
    run = root / "orchestrator" / "run"
    offenders = []
    for package in ("model", "pipelines", "orchestrator"):
        for path in source_files(root, package):
            if run in path.parents:
                continue
            tree = ast.parse(path.read_text(), filename=str(path))
            docstrings = {id(n.value) for n in ast.walk(tree) if isinstance(n, ast.Expr) and isinstance(n.value, ast.Constant)}
            for node in ast.walk(tree):
                if id(node) in docstrings:
                    continue
                names_file = isinstance(node, ast.Constant) and isinstance(node.value, str) and \
                    RUN_STATE_FILE in node.value
                calls_writer = isinstance(node, ast.Call) and \
                    getattr(node.func, "id", getattr(node.func, "attr", None)) in STATE_WRITERS
                if names_file or calls_writer:
                    offenders.append(f"{path.relative_to(root)}:{node.lineno}")
    return sorted(offenders)


@pytest.mark.parametrize("package", sorted(THIRD_PARTY))
def test_package_imports_follow_design(package):
    stdlib = set(sys.stdlib_module_names)
    offenders = {}
    for path in source_files(ROOT, package):
        bad = {root for root in imported_roots(path) if root not in stdlib and root not in THIRD_PARTY[package]}
        if bad:
            offenders[str(path.relative_to(ROOT))] = sorted(bad)
    assert not offenders, f"{package}/ imports outside ARCHITECTURE.md's rules: {offenders}"


def test_orchestrator_imports_go_down_the_floors():
    assert floor_violations(ROOT) == []


def test_orchestrator_has_no_import_cycle():
    assert import_cycles(ROOT) == []


def test_only_cluster_talks_to_kubernetes():
    assert kubernetes_outside_cluster(ROOT) == []


def test_only_run_writes_the_run_state():
    assert run_state_writers_outside_run(ROOT) == []


def test_orchestrator_is_grouped_by_concern():
    """ARCHITECTURE.md's folders, and no filename prefix standing in for a package."""
    top = {p.name for p in (ROOT / "orchestrator").iterdir() if not p.name.startswith("__")}
    assert {"config.py", "cli", "run", "train", "sweep", "cluster", "bench"} <= top
    prefixed = sorted(p.name for p in (ROOT / "orchestrator").rglob("*.py")
                      if p.name.split("_")[0] in {"k8s", "bench", "sweep", "kuberay"} and p.name != "__init__.py")
    assert prefixed == []


# ---------------------------------------------------------------- the checkers themselves


def test_the_checker_sees_a_forbidden_import(tmp_path):
    sample = tmp_path / "bad.py"
    sample.write_text("import ray\nfrom mlflow import log_metric\nfrom .sibling import x\n")
    assert imported_roots(sample) == {"ray", "mlflow"}


def _tree(root: Path, files: dict[str, str]) -> Path:
    for name, text in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return root


def test_the_checkers_see_each_kind_of_violation(tmp_path):
    root = _tree(tmp_path, {
        "model/__init__.py": "", "pipelines/__init__.py": "",
        "orchestrator/__init__.py": "", "orchestrator/config.py": "",
        "orchestrator/run/__init__.py": "", "orchestrator/run/directory.py": "STATE = 'sdo_run.json'\n",
        # train reaching up into cluster; run and train importing each other at module level
        "orchestrator/train/__init__.py": "",
        "orchestrator/train/worker.py": "from orchestrator.run import directory\n"
                                        "def f():\n    from orchestrator.cluster import local\n",
        "orchestrator/run/lifecycle.py": "import orchestrator.train.worker\n",
        "orchestrator/cluster/__init__.py": "", "orchestrator/cluster/local.py": "import kubernetes\n",
        # sweep and bench are peers; sweep talks to kubernetes and writes the run state itself
        "orchestrator/sweep/__init__.py": "",
        "orchestrator/sweep/tuner.py": "from orchestrator.bench import ops\nfrom kubernetes import client\n"
                                       "open('x/sdo_run.json', 'w')\nwrite_identity(1, 2)\n",
        "orchestrator/bench/__init__.py": "", "orchestrator/bench/ops.py": "",
    })
    assert floor_violations(root) == ["orchestrator.run.lifecycle -> orchestrator.train.worker",
                                      "orchestrator.sweep.tuner -> orchestrator.bench.ops",
                                      "orchestrator.train.worker -> orchestrator.cluster.local"]
    assert kubernetes_outside_cluster(root) == ["orchestrator/sweep/tuner.py"]
    assert run_state_writers_outside_run(root) == ["orchestrator/sweep/tuner.py:3", "orchestrator/sweep/tuner.py:4"]


def test_the_cycle_checker_finds_a_cycle(tmp_path):
    root = _tree(tmp_path, {
        "orchestrator/__init__.py": "",
        "orchestrator/run/__init__.py": "",
        "orchestrator/run/a.py": "from orchestrator.run import b\n",
        "orchestrator/run/b.py": "import orchestrator.run.a\n",
        "orchestrator/run/c.py": "def f():\n    import orchestrator.run.a\n",  # lazy: not a cycle at import time
    })
    assert import_cycles(root) == [["orchestrator.run.a", "orchestrator.run.b", "orchestrator.run.a"]]
