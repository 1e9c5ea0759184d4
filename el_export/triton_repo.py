"""`el_export.triton_repo`: what model repositories written by earlier versions import (`TritonPythonModel`); the
home is `el_export.serving.triton_repo`."""

from el_export.serving.triton_repo import TritonPythonModel, shipped_server, write_repository

__all__ = ["TritonPythonModel", "shipped_server", "write_repository"]
