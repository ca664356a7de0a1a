"""DESIGN.md's import rules, checked on the source: model/ and pipelines/ never reach into the orchestrator."""
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
                  "braceexpand"},  # webdataset's own shard-pattern expander
}


def imported_roots(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(), filename=str(path))
    roots = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            roots.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            roots.add(node.module.split(".")[0])
    return roots


@pytest.mark.parametrize("package", sorted(THIRD_PARTY))
def test_package_imports_follow_design(package):
    stdlib = set(sys.stdlib_module_names)
    offenders = {}
    for path in sorted((ROOT / package).rglob("*.py")):
        bad = {root for root in imported_roots(path) if root not in stdlib and root not in THIRD_PARTY[package]}
        if bad:
            offenders[str(path.relative_to(ROOT))] = sorted(bad)
    assert not offenders, f"{package}/ imports outside DESIGN.md's rules: {offenders}"


def test_the_checker_sees_a_forbidden_import(tmp_path):
    sample = tmp_path / "bad.py"
    sample.write_text("import ray\nfrom mlflow import log_metric\nfrom .sibling import x\n")
    assert imported_roots(sample) == {"ray", "mlflow"}
