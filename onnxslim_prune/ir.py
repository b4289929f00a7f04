"""The read-and-export surface the passes use: `from .. import ir`, then `ir.const_value(...)`.

The implementations live in `graph/` (`io`: files, checks, external data, sizes; `normalize`: ModelProto to a
folded, named graph-surgeon graph; `shapes`: inference and export; `read`: constants, attributes), and
`graph.edit` is the only writer of nodes and tensors, so swapping the IR library (onnx-graphsurgeon today)
touches `graph/` alone. Life cycle of a model:

    proto = load_model(path)            # onnx.ModelProto, external data loaded, errors mapped
    graph = to_graph(proto)             # gs.Graph, Constant nodes and constant subgraphs folded
    shapes = static_shapes(proto, ...)  # name -> static shape, from strict inference on a skeleton
    ... passes read `graph` through the helpers below and edit it through `graph.edit` ...
    out = to_model(graph, like=proto)   # ModelProto, stale value_info dropped, shapes re-inferred
    save_model(out, path)               # atomic write, external data when needed
"""

from __future__ import annotations

from .atomic import Outputs, default_permissions
from .graph.io import (
    EXTERNAL_THRESHOLD,
    FILE_VIEW_BYTES,
    ExternalData,
    FLOAT_TYPES,
    PROTO_LIMIT,
    RawData,
    SIZE_MARGIN,
    check_model,
    check_writable_folder,
    count_parameters,
    exceeds_proto_limit,
    external_data_files,
    external_data_of,
    file_view,
    file_view_values,
    view_file,
    is_file_view,
    materialized,
    ScratchFile,
    input_had_external_data,
    load_model,
    opset_version,
    payload_bytes,
    raw_data_in_file,
    save_external,
    save_model,
    serialize,
    stage_model,
    serialized_size,
    tensor_bytes,
    uses_external_data,
    without_initializers,
)
from .graph.shapes import (
    Shape,
    check_inference,
    dynamic_non_batch_dims,
    export_fast,
    export_skeleton,
    export_weightless,
    fixed_input_shapes,
    infer_strict,
    is_static_dim,
    parse_input_shape,
    parse_input_shapes,
    share_identical_initializers,
    skeleton,
    static_batch,
    static_shapes,
    to_model,
)
from .graph.edit import working_copy
from .graph.filebacked import settle
from .graph.runtime import calibration_options, inference_session, takes_scratch_file
from .graph.normalize import (
    to_graph,
)
from .graph.read import (
    attr,
    const_value,
    copy_graph,
    has_input,
    input_const,
    node_by_name,
    tensor_dtype,
    to_array,
    token_mask_input,
    value_digest,
)

__all__ = [
    "FILE_VIEW_BYTES",
    "file_view",
    "file_view_values",
    "view_file",
    "is_file_view",
    "materialized",
    "ScratchFile",
    "export_weightless",
    "calibration_options",
    "inference_session",
    "takes_scratch_file",
    "token_mask_input",
    "EXTERNAL_THRESHOLD",
    "ExternalData",
    "FLOAT_TYPES",
    "PROTO_LIMIT",
    "RawData",
    "SIZE_MARGIN",
    "Shape",
    "attr",
    "check_inference",
    "check_model",
    "check_writable_folder",
    "const_value",
    "copy_graph",
    "count_parameters",
    "default_permissions",
    "dynamic_non_batch_dims",
    "exceeds_proto_limit",
    "export_fast",
    "export_skeleton",
    "external_data_files",
    "external_data_of",
    "fixed_input_shapes",
    "has_input",
    "infer_strict",
    "input_const",
    "input_had_external_data",
    "is_static_dim",
    "load_model",
    "node_by_name",
    "opset_version",
    "parse_input_shape",
    "parse_input_shapes",
    "payload_bytes",
    "raw_data_in_file",
    "save_external",
    "save_model",
    "stage_model",
    "Outputs",
    "serialize",
    "serialized_size",
    "share_identical_initializers",
    "skeleton",
    "static_batch",
    "static_shapes",
    "tensor_bytes",
    "tensor_dtype",
    "to_array",
    "to_graph",
    "settle",
    "to_model",
    "uses_external_data",
    "value_digest",
    "without_initializers",
    "working_copy",
]
