"""Probe what a TensorRT Python package allows for plugins; prints a JSON verdict.

Run as ``python -m ultramem.plugins.probe_trt_plugins [--package tensorrt_rtx]``. Each check
runs in a subprocess of its own, because TensorRT-RTX 1.7 aborts the whole process
("terminate called without an active exception") once the ONNX parser has created a
Python-defined IPluginV3 (docs/platforms.md); the verdict records how far each got.

Checks:
- ``plugin_module``: does ``<package>.plugin`` (the quickly-deployable-plugin API) import;
- ``v3_register``: can a Python ``IPluginCreatorV3One`` be registered and found again;
- ``v3_onnx_build``: does the ONNX parser map a custom-domain node to that creator and
  does ``build_serialized_network`` finish (needs ``onnx``; no GPU needed to build);
- ``v3_network_build``: the same plugin added with ``add_plugin_v3``, no parser;
- ``quick_aot``: can an ahead-of-time quickly-deployable plugin be defined
  (``<package>.plugin.aot_impl`` and ``IPluginV3QuickAOTBuild`` both present).

``plugin_mode`` is true when a plugin engine can be built: the ONNX build passed, or an
AOT quick plugin is available.
"""

from __future__ import annotations

import argparse
import importlib
import json
import subprocess
import sys
from typing import Any

CHECKS = ("plugin_module", "v3_register", "v3_onnx_build", "v3_network_build", "quick_aot")
PLUGIN = "UltramemProbeIdentity"


def _mark(what: str) -> None:
    """Progress the parent reads even when the process then aborts."""
    print(f"MARK {what}", flush=True)


def _plugin_classes(trt: Any) -> tuple[type, type]:
    """An identity IPluginV3 (never enqueued here) and its creator."""

    class Identity(trt.IPluginV3, trt.IPluginV3OneCore, trt.IPluginV3OneBuild,
                   trt.IPluginV3OneRuntime):  # fmt: skip
        def __init__(self) -> None:
            trt.IPluginV3.__init__(self)
            trt.IPluginV3OneCore.__init__(self)
            trt.IPluginV3OneBuild.__init__(self)
            trt.IPluginV3OneRuntime.__init__(self)
            self.num_outputs = 1
            self.plugin_namespace = ""
            self.plugin_name = PLUGIN
            self.plugin_version = "1"

        def get_capability_interface(self, _type: Any) -> Any:
            _mark("get_capability_interface")
            return self

        def get_output_data_types(self, input_types: list[Any]) -> list[Any]:
            return [input_types[0]]

        def get_output_shapes(self, inputs: list[Any], _shapes: list[Any], _b: Any) -> list[Any]:
            _mark("get_output_shapes")
            return [inputs[0]]

        def supports_format_combination(self, pos: int, in_out: list[Any], _n: int) -> bool:
            desc = in_out[pos].desc
            return bool(desc.type == trt.float32 and desc.format == trt.TensorFormat.LINEAR)

        def configure_plugin(self, _inp: list[Any], _out: list[Any]) -> None:
            _mark("configure_plugin")

        def on_shape_change(self, _inp: list[Any], _out: list[Any]) -> None:
            return None

        def get_fields_to_serialize(self) -> Any:
            return trt.PluginFieldCollection([])

        def enqueue(self, *_args: Any) -> None:
            raise RuntimeError("the probe never runs an engine")

        def attach_to_context(self, _context: Any) -> Any:
            return self.clone()

        def set_tactic(self, _tactic: int) -> None:
            return None

        def clone(self) -> Any:
            return Identity()

    class Creator(trt.IPluginCreatorV3One):
        def __init__(self) -> None:
            trt.IPluginCreatorV3One.__init__(self)
            self.name = PLUGIN
            self.plugin_namespace = ""
            self.plugin_version = "1"
            self.field_names = trt.PluginFieldCollection([])

        def create_plugin(self, _name: str, _fc: Any, _phase: Any) -> Any:
            _mark("create_plugin")
            return Identity()

    return Identity, Creator


def _register(trt: Any) -> Any:
    _, creator_cls = _plugin_classes(trt)
    creator = creator_cls()
    registry = trt.get_plugin_registry()
    registry.register_creator(creator, "")
    if registry.get_creator(PLUGIN, "1", "") is None:
        raise RuntimeError("registered, but get_creator does not find it")
    _mark("registered")
    return creator


def _build(trt: Any, network: Any, builder: Any) -> str:
    profile = builder.create_optimization_profile()
    profile.set_shape("x", (1, 4), (8, 4), (64, 4))
    config = builder.create_builder_config()
    config.add_optimization_profile(profile)
    _mark("build_serialized_network")
    engine = builder.build_serialized_network(network, config)
    if engine is None:
        raise RuntimeError("build_serialized_network returned None")
    return f"engine of {engine.nbytes} bytes"


def _onnx_model() -> bytes:
    import onnx
    from onnx import TensorProto, helper

    node = helper.make_node(PLUGIN, ["x"], ["y"], domain="ultramem")
    graph = helper.make_graph(
        [node],
        "probe",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["T", 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["T", 4])],
    )
    opsets = [helper.make_opsetid("", 20), helper.make_opsetid("ultramem", 1)]
    return onnx.shape_inference.infer_shapes(
        helper.make_model(graph, opset_imports=opsets)
    ).SerializeToString()


def run_check(name: str, package: str) -> str:
    """One check in this process; returns a detail string or raises."""
    trt = importlib.import_module(package)
    if name == "plugin_module":
        importlib.import_module(f"{package}.plugin")
        return f"{package}.plugin imports"
    if name == "quick_aot":
        missing = [c for c in ("IPluginV3QuickAOTBuild",) if not hasattr(trt, c)]
        try:
            if not hasattr(importlib.import_module(f"{package}.plugin"), "aot_impl"):
                missing.append(f"{package}.plugin.aot_impl")
        except ImportError as e:
            missing.append(f"{package}.plugin.aot_impl ({package}.plugin: {e})")
        if missing:
            raise RuntimeError(f"no {'; no '.join(missing)}")
        return "aot_impl and IPluginV3QuickAOTBuild present"
    creator = _register(trt)
    if name == "v3_register":
        return "IPluginCreatorV3One registered and found"
    builder = trt.Builder(trt.Logger(trt.Logger.WARNING))
    if name == "v3_network_build":
        network = builder.create_network(0)
        if not hasattr(network, "add_plugin_v3"):
            raise RuntimeError("INetworkDefinition has no add_plugin_v3: no plugin layer API")
        x = network.add_input("x", trt.float32, (-1, 4))
        layer = network.add_plugin_v3([x], [], creator.create_plugin(PLUGIN, None, None))
        network.mark_output(layer.get_output(0))
        return _build(trt, network, builder)
    network = builder.create_network(0)
    parser = trt.OnnxParser(network, trt.Logger(trt.Logger.WARNING))
    if not parser.parse(_onnx_model()):
        errors = [str(parser.get_error(i)) for i in range(parser.num_errors)]
        raise RuntimeError(f"parse failed: {errors}")
    _mark("parsed")
    return _build(trt, network, builder)


def probe(package: str, timeout: float = 120.0) -> dict[str, Any]:
    """Every check in its own subprocess; the verdict as a dict."""
    verdict: dict[str, Any] = {"package": package}
    try:
        verdict["version"] = importlib.import_module(package).__version__
    except Exception as e:
        verdict.update(plugin_mode=False, reason=f"{package} does not import: {e!r}")
        return verdict
    for name in CHECKS:
        cmd = [sys.executable, "-m", "ultramem.plugins.probe_trt_plugins", "--check", name]
        try:
            done = subprocess.run(
                [*cmd, "--package", package], capture_output=True, text=True, timeout=timeout
            )
        except subprocess.TimeoutExpired:
            verdict[name] = {"ok": False, "outcome": "timeout", "detail": f"> {timeout} s"}
            continue
        lines = done.stdout.splitlines()
        reached = [line[5:] for line in lines if line.startswith("MARK ")]
        results = [line[7:] for line in lines if line.startswith("RESULT ")]
        if done.returncode == 0 and results:
            verdict[name] = {"ok": True, "outcome": "passed", "detail": results[-1]}
        elif results:  # the check raised: it reported why
            verdict[name] = {"ok": False, "outcome": "failed", "detail": results[-1]}
        else:
            tail = (done.stderr.strip().splitlines() or ["(no output)"])[-1]
            verdict[name] = {
                "ok": False,
                "outcome": "crashed",
                "returncode": done.returncode,
                "detail": tail,
            }
        verdict[name]["reached"] = reached
    onnx_ok = verdict["v3_onnx_build"]["ok"]
    verdict["plugin_mode"] = bool(onnx_ok or verdict["quick_aot"]["ok"])
    verdict["reason"] = _reason(verdict)
    return verdict


def _reason(v: dict[str, Any]) -> str:
    if v["plugin_mode"]:
        how = "Python IPluginV3 through the ONNX parser" if v["v3_onnx_build"]["ok"] else "AOT"
        return f"{v['package']} {v['version']} builds plugin engines ({how})"
    b = v["v3_onnx_build"]
    return (
        f"{v['package']} {v['version']} cannot build a plugin engine: a Python IPluginV3 "
        f"through the ONNX parser {b['outcome']} ({b.get('detail', '')}; reached "
        f"{', '.join(b['reached']) or 'nothing'}); {v['package']}.plugin: "
        f"{v['plugin_module']['detail']}; AOT quick plugins: {v['quick_aot']['detail']}. "
        "Use lookup mode 'native', or the full `tensorrt` package (>= 10.7) for plugins"
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--package", default="tensorrt_rtx")
    parser.add_argument("--check", choices=CHECKS)
    parser.add_argument("--timeout", type=float, default=120.0)
    args = parser.parse_args(argv)
    if args.check is None:
        print(json.dumps(probe(args.package, args.timeout), indent=1))
        return 0
    try:
        print(f"RESULT {run_check(args.check, args.package)}", flush=True)
    except Exception as e:
        print(f"RESULT {type(e).__name__}: {e}", flush=True)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
