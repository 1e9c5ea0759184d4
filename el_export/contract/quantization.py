"""An int8 recipe and the manifest's record of one: data, validated, no graph code (export.quantize applies it).

A recipe says, per graph, how the activations entering each weight product are scaled ("row": one scale per row,
each token its own, as CTranslate2 does; "tensor": one scale for the whole batch, ONNX Runtime's dynamic
quantization) and which modules stay float32, each with the measurement that put it there. Weights are always
int8, symmetric, one scale per output channel. Built-in recipes are named (RECIPES); a JSON file with the same
fields is a user's own. The bundle's manifest records the recipe and what each graph actually got.
"""

import json
from dataclasses import dataclass
from fnmatch import fnmatchcase
from pathlib import Path

from el_export.errors import BundleError, ElExportError, InvalidArgumentError

METHOD = "int8"
WEIGHTS = "int8, symmetric, one scale per output channel"
GRANULARITIES = ("row", "tensor")
GRAPHS = ("encoder", "prefill", "decoder_step")
# The int8 encoder's extra outputs, which an int8 decoder step takes instead of encoder_hidden (export.quantize)
MEMORY_OUTPUTS = ["encoder_hidden_int8", "encoder_hidden_int8_t", "encoder_hidden_scale"]


@dataclass(frozen=True)
class Keep:
    """Modules left in float32: an fnmatch pattern over module names (`model.decoder.layers.*.fc2`) and why."""

    pattern: str
    why: str


@dataclass(frozen=True)
class Recipe:
    name: str
    activations: dict  # graph name -> "row" | "tensor"; a graph not named gets "row"
    float32: tuple[Keep, ...] = ()
    memory: bool = False  # EL's products over a memory held once per input (encoder output) in int8 too

    def granularity(self, graph: str) -> str:
        return self.activations.get(graph, "row")

    def kept(self, module: str) -> Keep | None:
        """The rule keeping `module` in float32, if any."""
        return next((k for k in self.float32 if fnmatchcase(module, k.pattern)), None)

    def to_json(self) -> dict:
        return {"name": self.name, "activations": dict(self.activations), "memory": self.memory,
                "float32": [{"pattern": k.pattern, "why": k.why} for k in self.float32]}  # fmt: skip

    @classmethod
    def from_json(cls, data, error: type[ElExportError] = InvalidArgumentError, where: str = "recipe") -> "Recipe":
        """Validate a recipe's fields; every problem is an `error` naming the field."""
        if not isinstance(data, dict) or not isinstance(data.get("name"), str) or not data["name"]:
            raise error(f"{where} needs a non-empty 'name'")
        unknown = set(data) - {"name", "activations", "memory", "float32"}
        if unknown:
            raise error(f"{where} has unknown fields {sorted(unknown)}; it takes name, activations, memory, float32")
        if not isinstance(data.get("memory", False), bool):
            raise error(f"{where} 'memory' must be true or false")
        activations = data.get("activations", {})
        if not isinstance(activations, dict) or not all(
            g in GRAPHS and a in GRANULARITIES for g, a in activations.items()
        ):
            raise error(f"{where} 'activations' must map graphs ({', '.join(GRAPHS)}) to one of "
                        f"{', '.join(GRANULARITIES)}, got {activations!r}")  # fmt: skip
        keeps = data.get("float32", [])
        if not isinstance(keeps, list) or not all(
            isinstance(k, dict) and set(k) == {"pattern", "why"} and all(isinstance(v, str) and v for v in k.values())
            for k in keeps
        ):
            raise error(f"{where} 'float32' must be a list of {{\"pattern\": ..., \"why\": ...}} with non-empty "
                        "strings")
        return cls(data["name"], dict(activations), tuple(Keep(k["pattern"], k["why"]) for k in keeps),
                   data.get("memory", False))


# Chosen by measurement (tools/int8_sensitivity.py; README "int8 on CPU"): no module group of Whisper tiny.en, left
# float32, brought transcripts back to HF's float32 ones reproducibly, on clips the goals are not measured on; so
# only what has no integer kernel stays float32.
DEFAULT = Recipe(
    "default",
    {"encoder": "row", "prefill": "row", "decoder_step": "row"},
    memory=True,
    float32=(Keep("model.encoder.conv*", "convolutions: ONNX Runtime's ConvInteger takes one activation scale per "
                  "tensor; 6% of Whisper's encoder FLOPs"),),
)
TENSOR = Recipe("tensor", dict.fromkeys(GRAPHS, "tensor"), DEFAULT.float32)
RECIPES = {r.name: r for r in (DEFAULT, TENSOR)}


LEGACY = {"method": METHOD, "recipe": {"name": "legacy", "activations": dict.fromkeys(GRAPHS, "tensor"),
                                      "float32": []},
          "weights": "int8, symmetric, one scale per tensor", "graphs": {}}  # fmt: skip


def load_recipe(spec: "str | Recipe | None") -> Recipe:
    """A built-in recipe by name (None: the default), a JSON file holding one, or a Recipe as it is.

    Raises:
        InvalidArgumentError: neither a built-in name nor a readable, valid recipe file.
    """
    if spec is None:
        return DEFAULT
    if isinstance(spec, Recipe):
        return spec
    if spec in RECIPES:
        return RECIPES[spec]
    path = Path(spec)
    if not path.is_file():
        raise InvalidArgumentError(f"--quantize-recipe {spec!r} is neither a built-in recipe "
                                   f"({', '.join(RECIPES)}) nor a file")  # fmt: skip
    if path.stat().st_size > 1 << 20:
        raise InvalidArgumentError(f"--quantize-recipe {spec}: over 1 MiB, not a recipe")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise InvalidArgumentError(f"--quantize-recipe {spec} is not JSON ({e}); see README 'int8'") from None
    return Recipe.from_json(data, where=f"--quantize-recipe {spec}")


def check_record(record) -> dict:
    """The manifest's `quantization` field: {} (float weights) or the record export.quantize writes.

    Raises:
        BundleError: naming the field that is missing or malformed.
    """
    if record in ("", None, {}):
        return {}
    if record == METHOD:  # bundles of el-export before recipes: ONNX Runtime's quantize_dynamic, per-tensor scales
        return LEGACY
    where = "manifest field 'quantization'"
    if not isinstance(record, dict) or record.get("method") != METHOD:
        raise BundleError(f"{where} is {str(record)[:80]!r}; expected an int8 record (method: {METHOD!r}) or "
                          "nothing; re-export the bundle with this el-export")  # fmt: skip
    Recipe.from_json(record.get("recipe"), BundleError, f"{where}.recipe")
    graphs = record.get("graphs")
    if not isinstance(graphs, dict) or not graphs or not set(graphs) <= set(GRAPHS):
        raise BundleError(f"{where}.graphs must map graph names to what each got")
    for name, got in graphs.items():
        ok = (
            isinstance(got, dict)
            and got.get("activations") in GRANULARITIES
            and isinstance(got.get("int8"), list)
            and all(isinstance(m, str) for m in got["int8"])
            and isinstance(got.get("float32"), dict)
            and all(isinstance(m, str) and isinstance(w, str) for m, w in got["float32"].items())
            and set(got) <= {"activations", "int8", "float32", "memory_products", "memory_outputs"}
            and (type(got.get("memory_products", 0)) is int and got.get("memory_products", 0) >= 0)
            and got.get("memory_outputs", MEMORY_OUTPUTS) == MEMORY_OUTPUTS
        )
        if not ok:
            raise BundleError(f"{where}.graphs[{name!r}] needs activations ({', '.join(GRANULARITIES)}), an int8 "
                              "list of module names, a float32 map of module name to why, and at most a count of "
                              "memory_products and the memory_outputs")  # fmt: skip
    return record


def recipe_of(record: dict) -> Recipe:
    """The recipe a checked manifest record was made with."""
    return Recipe.from_json(record["recipe"], BundleError)
