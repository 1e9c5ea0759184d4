"""TensorRT: what its ONNX parser accepts (checked without it), optimization profiles, and engine builds.

`ops` and `lint` need only `onnx`; `profiles` needs nothing; `build` imports TensorRT and Polygraphy
when it runs and says what to install when they are missing. The runtime backend is
`el_export.runtime.tensorrt`.
"""
