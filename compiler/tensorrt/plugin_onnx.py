"""The ONNX graph TensorRT's parser reads in plugin mode: ``ultramem`` nodes as AOT plugins.

The parser picks a plugin for a node that carries ``plugin_namespace`` and ``aot`` and whose
op has no function body, so ``plugin_onnx`` prepares such a copy: the function bodies go,
each node gets its attributes in the order the plugin is registered with
(``plugins/trt_plugin.py: attribute_order``, defaults spelled out), one ``has_<input>`` flag
per optional input, ``plugin_namespace``, ``plugin_version`` and ``aot``; an absent optional
input gets a one-element stand-in (its kernel, specialised on the flag, never reads it) so
that every plugin of an op has the same inputs.
"""

from __future__ import annotations

import copy

import numpy as np
import onnx
from onnx import helper, numpy_helper

from ...kernels import DOMAIN, DOMAIN_VERSION, op_spec
from ...plugins.trt_plugin import PLUGIN_NAMESPACE, attribute_order
from ..onnx.domain import base_op, node_arguments


def plugin_onnx(model: onnx.ModelProto) -> tuple[onnx.ModelProto, int]:
    """A copy whose ``ultramem`` nodes the parser maps to our AOT plugins; and their count."""
    out = copy.deepcopy(model)
    del out.functions[:]
    count = 0
    for node in out.graph.node:
        if node.domain != DOMAIN:
            continue
        count += 1
        op = op_spec(base_op(node) or node.op_type)
        arguments = node_arguments(node)
        node.op_type, node.overload = op.onnx_name, ""  # the plugin's name, not the variant's
        inputs = list(node.input) + [""] * (len(op.inputs) - len(node.input))
        for i, t in enumerate(op.inputs):
            if t.optional and not inputs[i]:
                stand_in = f"{node.name or node.output[0]}__no_{t.name}"
                out.graph.initializer.append(
                    numpy_helper.from_array(np.zeros((1, 1), dtype=np.int64), stand_in)
                )
                inputs[i] = stand_in
        del node.input[:]
        node.input.extend(inputs)
        flags = {k: int(v) for k, v in arguments.items() if k.startswith("has_")}
        del node.attribute[:]
        node.attribute.extend(
            [
                *(
                    helper.make_attribute(name, flags.get(name, arguments.get(name)))
                    for name in attribute_order(op)
                ),
                helper.make_attribute("plugin_namespace", PLUGIN_NAMESPACE),
                helper.make_attribute("plugin_version", str(DOMAIN_VERSION)),
                helper.make_attribute("aot", 1),
            ]
        )
    return out, count
