"""The layout is real: the runtime needs only the bundle (no transformers, onnx, onnxscript or polygraphy), and
each layer imports only what sits beneath it (docs/design.md, "Layers")."""

import ast
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

PACKAGE = Path(__file__).parents[1] / "el_export"

BLOCKED = ("transformers", "onnx", "onnxscript", "polygraphy", "tensorrt")

RUNTIME_MODULES = (
    "el_export", "el_export.cli", "el_export.runtime.generator", "el_export.runtime.onnxruntime",
    "el_export.runtime.decoder", "el_export.runtime.tokenizer", "el_export.runtime.stream", "el_export.search",
    "el_export.contract.files", "el_export.contract.cache", "el_export.errors", "el_export.serving.batching",
)  # fmt: skip


def _run_without_export_dependencies(code: str) -> subprocess.CompletedProcess:
    blocker = textwrap.dedent(
        f"""
        import sys
        class Block:
            def find_spec(self, name, path=None, target=None):
                if name.split(".")[0] in {BLOCKED!r}:
                    raise ImportError(f"blocked in this test: {{name}}")
        sys.meta_path.insert(0, Block())
        """
    )
    return subprocess.run([sys.executable, "-c", blocker + code], capture_output=True, text=True, timeout=120)


def test_runtime_modules_import_without_export_dependencies():
    result = _run_without_export_dependencies("\n".join(f"import {m}" for m in RUNTIME_MODULES))
    assert result.returncode == 0, result.stderr


def test_generate_from_a_bundle_without_transformers(bundles):
    bundle = bundles("bart", "el")
    code = (
        f"import el_export\ngenerator = el_export.load({str(bundle)!r})\n"
        "print(generator.generate(input_ids=[[5, 6, 7, 2]], num_beams=2, max_new_tokens=4).sequences.tolist())"
    )
    result = _run_without_export_dependencies(code)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("[[2, ")


def _imports(path: Path) -> set[str]:
    """Every el_export module a file imports, at any depth (function-level imports included)."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names |= {node.module} | {f"{node.module}.{a.name}" for a in node.names}
    return {n for n in names if n.split(".")[0] == "el_export"}


def _modules(folder: str) -> list[Path]:
    return sorted((PACKAGE / folder).rglob("*.py"))


def _under(name: str, *packages: str) -> bool:
    return any(name == p or name.startswith(p + ".") for p in packages)


# (folder, what it must never import, the files exempt and why)
RULES = [
    ("contract", None, {}),  # only errors and contract itself: checked below
    (
        "runtime",
        ("el_export.export", "el_export.model", "el_export.families", "el_export.evaluation"),
        {"torch.py": "the PyTorch backend builds modules from a checkpoint: the stated exception"},
    ),
    ("search", ("el_export.export", "el_export.model", "el_export.families", "el_export.runtime"), {}),
    ("model", ("el_export.export", "el_export.runtime", "el_export.families", "el_export.serving"), {}),
    ("trt", ("el_export.families", "el_export.model", "el_export.export"), {}),
    ("serving", ("el_export.export", "el_export.model", "el_export.families"), {}),
]


@pytest.mark.parametrize(("folder", "forbidden", "exempt"), RULES, ids=[r[0] for r in RULES])
def test_each_layer_imports_only_what_sits_beneath_it(folder, forbidden, exempt):
    broken = []
    for path in _modules(folder):
        if path.name in exempt:
            continue
        for name in _imports(path):
            if forbidden is None:
                bad = not _under(name, "el_export.errors", "el_export.contract")
            else:
                bad = _under(name, *forbidden)
            if bad:
                broken.append(f"{path.relative_to(PACKAGE.parent)} imports {name}")
    assert not broken, "\n".join(broken)


def test_the_rules_see_a_forbidden_import(tmp_path):
    """The checker itself: a function-level import of a forbidden module is found."""
    path = tmp_path / "m.py"
    path.write_text("def f():\n    from el_export.model.models import MODES\n")
    assert "el_export.model.models" in _imports(path)


def test_reading_a_manifest_loads_neither_models_nor_torch():
    code = (
        "import sys, el_export.contract.files, el_export.contract.axes, el_export.contract.cache\n"
        "loaded = [m for m in sys.modules if m.split('.')[0] == 'torch' or m.startswith(('el_export.model', "
        "'el_export.export', 'el_export.runtime'))]\n"
        "assert not loaded, loaded"
    )
    _python_ok(code)


def test_documented_imports_keep_working():
    """What the README and repositories written by earlier versions import, through the new homes."""
    code = (
        "from el_export import load\n"
        "from el_export.export import export_model\n"
        "from el_export.runtime.torch import load_torch\n"
        "from el_export.serve import ServeConfig, start, wait\n"
        "from el_export.triton_repo import TritonPythonModel, shipped_server\n"
        "import el_export.serving.triton_repo as home\n"
        "assert TritonPythonModel is home.TritonPythonModel\n"
    )
    _python_ok(code)


def _python_ok(code: str) -> None:
    """`code` runs in a fresh interpreter without an error."""
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
