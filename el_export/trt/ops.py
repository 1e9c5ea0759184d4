"""What TensorRT's ONNX parser accepts, as data: the operator table the lint checks every graph against.

Transcribed from onnx-tensorrt's `docs/operators.md` for TensorRT 10.15 (the parser's own support
matrix; TensorRT 11 builds on the same parser). Every operator marked "Y" there is listed with the
data types of its main input; the restrictions that can be checked on a graph are the attribute,
constant-input and output rules below. Operators marked "N" (Unique, Compress, the Sequence* and
String* families, ...) are simply absent. Update SOURCE with the table.
"""

SOURCE = {
    "document": "onnx/onnx-tensorrt docs/operators.md",
    "tensorrt": "10.15",
    "opsets": (9, 24),  # "TensorRT 10.15 supports operators in the inclusive range of opset 9 to opset 24"
}

_F = ("float32", "float16", "bfloat16")
_FI = (*_F, "int32", "int64")
_FIB = (*_FI, "bool")
_F16 = ("float32", "float16")  # no bfloat16 kernels

# op -> data types of its first input (the operand the table's "Supported Types" column describes).
OPERATORS: dict[str, tuple[str, ...]] = {
    **dict.fromkeys(("And", "Not", "Or", "Xor"), ("bool",)),
    **dict.fromkeys(("BlackmanWindow", "DeformConv", "GridSample", "HammingWindow", "HannWindow"), _F16),
    **dict.fromkeys(("Mish", "NonMaxSuppression", "NonZero", "RoiAlign"), _F16),
    "STFT": ("float32",),
    **dict.fromkeys(
        (
            "Acos", "Acosh", "Asin", "Asinh", "Atan", "Atanh", "AveragePool", "BatchNormalization", "Ceil", "Celu",
            "Clip", "Conv", "ConvTranspose", "Cos", "Cosh", "CumSum", "Dropout", "Einsum", "Elu", "Erf", "Exp",
            "Floor", "Gemm", "GlobalAveragePool", "GlobalLpPool", "GlobalMaxPool", "GroupNormalization", "GRU",
            "HardSigmoid", "HardSwish", "Hardmax", "ImageScaler", "InstanceNormalization", "IsInf",
            "LayerNormalization", "LeakyRelu", "Log", "LogSoftmax", "LRN", "LSTM", "LpNormalization", "LpPool",
            "MatMul", "MaxPool", "MeanVarianceNormalization", "ParametricSoftplus", "PRelu", "QuantizeLinear",
            "RandomNormal", "RandomNormalLike", "RandomUniform", "RandomUniformLike", "Reciprocal", "Resize",
            "RMSNormalization", "RNN", "RotaryEmbedding", "Round", "ScaledTanh", "Scan", "Selu", "Sigmoid", "Sin",
            "Sinh", "Softmax", "Softplus", "Softsign", "Sqrt", "Tan", "Tanh", "ThresholdedRelu", "Upsample",
        ),
        _F,
    ),
    **dict.fromkeys(
        (
            "Abs", "Add", "ArgMax", "ArgMin", "DepthToSpace", "Div", "Equal", "Greater", "GreaterOrEqual", "IsNaN",
            "Less", "LessOrEqual", "Max", "Min", "Mod", "Mul", "Neg", "Pad", "Pow", "Range", "ReduceL1", "ReduceL2",
            "ReduceLogSum", "ReduceLogSumExp", "ReduceMax", "ReduceMean", "ReduceMin", "ReduceProd", "ReduceSum",
            "ReduceSumSquare", "Relu", "Scatter", "ScatterElements", "ScatterND", "Shrink", "Sign", "SpaceToDepth",
            "Sub", "Sum", "TopK",
        ),
        _FI,
    ),
    **dict.fromkeys(
        (
            "Concat", "Expand", "EyeLike", "Flatten", "Gather", "GatherElements", "GatherND", "Identity", "If", "Loop",
            "OneHot", "Reshape", "ReverseSequence", "Shape", "Size", "Slice", "Split", "Squeeze", "Tile", "Transpose",
            "Trilu", "Unsqueeze", "Where",
        ),
        _FIB,
    ),
    "Attention": (*_F, "int8", "float8e4m3fn"),
    "Cast": (*_FIB, "uint8"),
    "CastLike": (*_FIB, "uint8"),
    "Constant": (*_FIB, "float8e4m3fn", "float4e2m1", "int4"),
    "ConstantOfShape": (*_FIB, "float8e4m3fn", "float4e2m1", "int4"),
    "DequantizeLinear": ("int8", "float8e4m3fn", "float4e2m1", "int4"),
    "Gelu": (*_FI, "int8"),
    "Mean": (*_FI, "float8e4m3fn"),
    "TensorScatter": (*_F, "int32"),
}  # fmt: skip

# Attribute restrictions: op -> {attribute: allowed values}. An absent attribute takes its ONNX
# default, which is allowed in every case below. ALL_ONES: a list of ones; ABSENT: must not be set.
ALL_ONES, ABSENT = "all ones", "absent"
ATTRIBUTES: dict[str, dict[str, object]] = {
    "AveragePool": {"dilations": ALL_ONES},
    "MaxPool": {"dilations": ALL_ONES},
    "LpPool": {"dilations": ALL_ONES},
    "Constant": {"sparse_value": ABSENT, "value_string": ABSENT, "value_strings": ABSENT},
    "LSTM": {"input_forget": (0,), "layout": (0,)},
    "TopK": {"sorted": (1,)},
    "ScatterND": {"reduction": ("none",)},
    "TensorScatter": {"axis": (-2,)},
    "Attention": {"qk_matmul_output_mode": ABSENT, "softcap": ABSENT},
    "Resize": {
        "mode": ("nearest", "linear"),
        "coordinate_transformation_mode": (
            "half_pixel", "pytorch_half_pixel", "tf_half_pixel_for_nn", "asymmetric", "align_corners",
        ),
        "nearest_mode": ("floor", "ceil", "round_prefer_floor", "round_prefer_ceil"),
        "keep_aspect_ratio_policy": ("stretch",),
        "antialias": (0,),
    },
}  # fmt: skip

_AXES = dict.fromkeys(
    (
        "ReduceL1", "ReduceL2", "ReduceLogSum", "ReduceLogSumExp", "ReduceMax", "ReduceMean", "ReduceMin",
        "ReduceProd", "ReduceSum", "ReduceSumSquare", "Squeeze", "Unsqueeze", "CumSum", "OneHot",
    ),
    (1,),
)  # fmt: skip
# op -> input indices that must be build-time constants (an initializer or a Constant node's output).
CONSTANT_INPUTS: dict[str, tuple[int, ...]] = {**_AXES, "Dropout": (2,), "STFT": (1, 2)}

# op -> how many of its outputs / inputs TensorRT implements (the rest must be left empty).
MAX_OUTPUTS = {"LayerNormalization": 1, "MaxPool": 1, "Attention": 1}
MAX_INPUTS = {"Attention": 4}  # past_key, past_value and nonpad_kv_seqlen are unsupported

# Data types of tensors anywhere in a graph. int64 is native since TensorRT 10 (earlier versions
# cast it down to int32, clamping); float64 is "limited": cast down to float32 with clamping, so a
# graph that holds it does not compute what ONNX Runtime computes. The quantized types exist only
# between QuantizeLinear / DequantizeLinear, which our graphs do not use; uint8 only as graph IO.
DTYPES = ("float32", "float16", "bfloat16", "int32", "int64", "bool")
IO_ONLY_DTYPES = ("uint8",)

# Our own rules, stricter than the parser's: graphs are straight-line (DESIGN.md section 3).
CONTROL_FLOW = ("If", "Loop", "Scan")

# op -> indices of 1-D inputs whose length fixes the output's rank or the op's parameter count:
# TensorRT needs that length at build time (a shape-tensor input whose values are dynamic is fine).
STATIC_LENGTH_INPUTS = {
    "Reshape": (1,),
    "Expand": (1,),
    "ConstantOfShape": (0,),
    "Tile": (1,),
    "Slice": (1, 2, 3, 4),
    "Pad": (1,),
    "Resize": (2, 3),
}
