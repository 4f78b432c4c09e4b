# SPDX-License-Identifier: Apache-2.0
"""The repository's shape: a licence line on every source file, no references to documents the
repository does not ship, and imports that go one way (cli -> workflows -> denoisers, metrics,
samplers -> ops -> _backend)."""
import ast
import re
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "python" / "diffrepro"

# Layer of every module of the package: a module may import modules of its own layer or below.
LAYERS = {
    0: {"__init__", "errors", "_engine", "_split", "_validate", "reference"},
    1: {"_backend", "_blas_engine", "_gpu_dispatch", "ops", "_estimate"},
    2: {"data", "noise", "schedules", "plots", "sscd"},
    3: {"samplers", "denoisers", "metrics", "distill", "flow", "pruning"},
    4: {"generation", "sweeps", "inverse", "distributed", "benchmarks", "gpu_bench", "selftest"},
    5: {"cli", "__main__"},
}
LAYER_OF = {name: layer for layer, names in LAYERS.items() for name in names}


def _tracked(*patterns: str) -> list[Path]:
    out = subprocess.run(["git", "ls-files", *patterns], cwd=ROOT, capture_output=True, text=True)
    if out.returncode != 0:
        pytest.skip("not a git checkout")
    return [ROOT / line for line in out.stdout.splitlines() if (ROOT / line).is_file()]


def _top_module(path: Path) -> str:
    rel = path.relative_to(PACKAGE)
    return rel.parts[0].removesuffix(".py")


def test_every_source_file_carries_the_licence_line():
    sources = _tracked("*.py", "*.cpp", "*.h", "*.cuh", "*.cu", "*.sh", "*.toml", "CMakeLists.txt", "Makefile",
                       ".ci/run")
    missing = [str(p.relative_to(ROOT)) for p in sources
               if "SPDX-License-Identifier: Apache-2.0" not in "".join(p.read_text().splitlines(True)[:3])]
    assert not missing, f"files without an SPDX line in their first 3 lines: {missing}"


def test_no_references_to_unshipped_documents():
    pattern = re.compile(r"\b(SPEC|STYLE)(\.md)? ?§")
    hits = [f"{p.relative_to(ROOT)}:{i}" for p in _tracked("*.py", "*.cpp", "*.h", "*.cuh", "*.cu", "*.md")
            for i, line in enumerate(p.read_text().splitlines(), 1) if pattern.search(line)]
    assert not hits, f"cite papers and equations instead: {hits}"


def test_imports_go_one_way():
    wrong, unknown = [], set()
    for path in sorted(PACKAGE.rglob("*.py")):
        own = _top_module(path)
        if own not in LAYER_OF:
            unknown.add(own)
            continue
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.level > 0:
                depth_ok = node.level == 1 and path.parent == PACKAGE or node.level == 2 and path.parent != PACKAGE
                if not depth_ok:
                    continue  # an import inside a sub-package (e.g. cli/_common from cli/score)
                targets = [node.module.split(".")[0]] if node.module else [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("diffrepro."):
                targets = [node.module.split(".")[1]]
            else:
                continue
            for target in targets:
                if target in LAYER_OF and LAYER_OF[target] > LAYER_OF[own]:
                    wrong.append(f"{path.relative_to(PACKAGE)} imports {target}")
    assert not unknown, f"assign these modules a layer in LAYERS: {sorted(unknown)}"
    assert not wrong, f"imports against the layering: {wrong}"
