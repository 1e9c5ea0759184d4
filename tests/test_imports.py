"""The runtime needs only the bundle: no transformers, onnx, onnxscript or polygraphy at run time."""

import subprocess
import sys
import textwrap

BLOCKED = ("transformers", "onnx", "onnxscript", "polygraphy", "tensorrt")

RUNTIME_MODULES = (
    "el_export", "el_export.cli", "el_export.generator", "el_export.runtime.onnxruntime", "el_export.runtime.decoder",
    "el_export.search", "el_export.bundle", "el_export.cache", "el_export.tokenizer", "el_export.errors",
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
