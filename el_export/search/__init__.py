"""Backend-agnostic search with HF `generate` semantics, written once against the `StepDecoder` protocol."""

from el_export.search.decoder import StepDecoder
from el_export.search.options import GenerationOptions, resolve_options
from el_export.search.search import SearchOutput, concat_outputs, generate_ids

__all__ = ["GenerationOptions", "SearchOutput", "StepDecoder", "concat_outputs", "generate_ids", "resolve_options"]
