"""`Engine`: a fused graph plus prepared weights, run one step at a time (DESIGN.md §3, §6).

On disk an engine is a folder:
    engine.json          format version, `ModelSpec`, target, dtype, device, the graph as JSON
                         (lowering/serialize.py), which weight names share storage, every
                         weight's shape and dtype, and the refit plan (lowering/refit.py)
    weights.safetensors  every weight once, by its graph name (`save(weights=False)`: only
                         those a refit does not rebuild; a later `refit` binds the others)
    refit_constants.safetensors  module tensors without a state_dict key that refit reads (if any)
Loading reads JSON and safetensors only; it never unpickles.
"""

from __future__ import annotations

import json
import operator
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch.fx import Graph, GraphModule
from tqdm.auto import tqdm

from trtllm.fusion.kv_cache_fp8 import kv_cache_dtype
from trtllm.kernels.errors import LoweringError, TrtllmError

from .refit import RefitPlan, refit, weight_manifest, weights_from_manifest
from .registry import Registry, default_registry
from .serialize import graph_from_json, graph_to_json
from .spec import ModelSpec

FORMAT_VERSION = 1
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


class Engine:
    """Runs the step graph: `engine(input_ids=..., position_ids=..., ...) -> logits [N, V]`."""

    def __init__(self, graph: Graph, weights: dict[str, torch.Tensor], spec: ModelSpec, *,
                 target: str = "native", registry: Registry | None = None, refit_plan: RefitPlan | None = None,
                 weights_bound: bool = True):
        self.graph = graph  # the fused graph, ops by canonical name (what `save` writes)
        self.weights = weights  # get_attr target -> prepared tensor
        self.spec = spec
        self.target = target
        self.refit_plan = refit_plan  # how `refit` rebuilds the weights from a state_dict (None: it cannot)
        self.weights_bound = weights_bound  # False: loaded without its weights, until a refit binds them
        self.input_names = [n.target for n in graph.nodes if n.op == "placeholder"]
        self.device, self.dtype = _device_and_dtype(weights)
        self.kv_cache_dtype = kv_cache_dtype(graph, self.dtype)  # float8_e4m3fn where the attention reads kv_scales
        # node name -> name of the implementation that runs it (trtllm ops only)
        self.implementations: dict[str, str] = {}
        self._module = _executable(graph, weights, target, registry or default_registry(), self.device,
                                   self.implementations)

    @torch.inference_mode()
    def __call__(self, **inputs: torch.Tensor) -> torch.Tensor:
        missing = set(self.input_names) - set(inputs)
        if missing:
            raise LoweringError(f"engine step is missing inputs {sorted(missing)}")
        # the logits [1, N, V]; a pipeline stage's send follows them (fusion/pipeline_split.py)
        logits = self._module(*(inputs[name] for name in self.input_names))[0]
        return logits[0]  # [N, V]

    def describe_implementations(self) -> str:
        """One line per op: how many nodes run it under each implementation."""
        counts: dict[tuple[str, str], int] = {}
        for node in self.graph.nodes:
            if node.name in self.implementations:
                key = (node.target.name(), self.implementations[node.name])
                counts[key] = counts.get(key, 0) + 1
        lines = [f"implementations on {self.device}:"]
        lines += [f"  {op}: {impl} x {n}" for (op, impl), n in sorted(counts.items())]
        return "\n".join(lines)

    def refit(self, state_dict) -> None:
        """Bind a module's new weights (same keys, shapes, dtypes) in place; see lowering/refit.py."""
        if self.refit_plan is None:
            raise TrtllmError("this engine has no refit plan (saved by an older trtllm, or a weight could not be "
                              "traced back to the module at build: see the build's warning); rebuild it with trtllm.compile")
        refit(self.refit_plan, self.weights, state_dict)
        self.weights_bound = True

    def save(self, path: str | Path, weights: bool = True) -> None:
        """Write the engine folder; `weights=False` leaves out what a `refit` rebuilds."""
        path = Path(path)
        if not weights and self.refit_plan is None:
            raise TrtllmError("save(weights=False) needs an engine with a refit plan, or nothing could bind its weights")
        path.mkdir(parents=True, exist_ok=True)
        unique, aliases = _dedup(self.weights)
        left_out = set() if weights else set(self.refit_plan.outputs)
        save_file({k: v.contiguous() for k, v in unique.items() if k not in left_out},
                  str(path / "weights.safetensors"))
        meta = {
            "format_version": FORMAT_VERSION, "spec": self.spec.to_json(), "target": self.target,
            "dtype": str(self.dtype).removeprefix("torch."), "device": str(self.device),
            "weight_aliases": aliases, "graph": graph_to_json(self.graph),
            "weights_saved": weights, "weight_manifest": weight_manifest(unique),
        }
        if self.refit_plan is not None:
            meta["refit"] = self.refit_plan.to_json()
            if self.refit_plan.constants:
                save_file({k: v.contiguous() for k, v in self.refit_plan.constants.items()},
                          str(path / "refit_constants.safetensors"))
        (path / "engine.json").write_text(json.dumps(meta))

    @classmethod
    def load(cls, path: str | Path, device: str | torch.device | None = None) -> Engine:
        path = Path(path)
        meta_path = path / "engine.json"
        if not meta_path.is_file():
            raise TrtllmError(f"{path} is not a trtllm engine folder (no engine.json)")
        meta = json.loads(meta_path.read_text())
        if meta.get("format_version") != FORMAT_VERSION:
            raise TrtllmError(f"{path}: engine format {meta.get('format_version')}, this trtllm reads {FORMAT_VERSION}")
        saved_device = torch.device(meta["device"])
        if device is not None and torch.device(device) != saved_device:
            raise TrtllmError(f"{path} was built for {saved_device}; rebuild it for {device}")
        weights = load_file(str(path / "weights.safetensors"), device=str(saved_device))
        weights = weights_from_manifest(weights, meta.get("weight_manifest", {}), saved_device)  # zeros if left out
        for name, source in meta["weight_aliases"].items():
            weights[name] = weights[source]
        graph = graph_from_json(meta["graph"])
        plan = None
        if "refit" in meta:
            constants_path = path / "refit_constants.safetensors"
            constants = load_file(str(constants_path), device=str(saved_device)) if constants_path.is_file() else {}
            plan = RefitPlan.from_json(meta["refit"], constants)
        return cls(graph, weights, ModelSpec.from_json(meta["spec"]), target=meta["target"], refit_plan=plan,
                   weights_bound=meta.get("weights_saved", True))


def prepare_weights(gm: GraphModule, weights: dict[str, torch.Tensor], device: torch.device) -> dict:
    """Each get_attr target's tensor in the dtype the graph was traced for, on `device`.

    Tensors tied in the model stay one tensor. A tensor already right is used as it is.
    """
    done: dict[int, torch.Tensor] = {}
    prepared = {}
    for name, tensor in tqdm(weights.items(), desc="preparing weights", leave=False, disable=len(weights) < 64):
        traced = operator.attrgetter(name)(gm)
        if id(tensor) not in done:
            done[id(tensor)] = tensor.detach().to(device=device, dtype=traced.dtype)
        prepared[name] = done[id(tensor)]
    return prepared


def _device_and_dtype(weights: dict[str, torch.Tensor]) -> tuple[torch.device, torch.dtype]:
    """The weights' device and the compute dtype: that of the largest 16- or 32-bit float weight
    (quantized weights aside: fp8 ones are floats too; their float32 scales are far smaller
    than the embeddings, which stay in the compute dtype)."""
    floats = [w for w in weights.values() if w.dtype in DTYPES.values()]
    if not floats:
        raise LoweringError("engine has no 16- or 32-bit floating-point weights")
    big = max(floats, key=lambda w: w.numel())
    return big.device, big.dtype


def _executable(graph: Graph, weights: dict, target: str, registry: Registry,
                device: torch.device, chosen: dict[str, str]) -> GraphModule:
    """A GraphModule over a copy of `graph` with each trtllm op replaced by its chosen impl,
    whose name goes into `chosen` under the node's name."""
    exec_graph = Graph()
    out = exec_graph.graph_copy(graph, {})
    exec_graph.output(out)
    for node in exec_graph.nodes:
        if node.op != "call_function":
            continue
        if getattr(node.target, "namespace", None) == "trtllm":
            impl = registry.choose(node, target, device.type)
        else:  # an aten op with a faster implementation where it fits (aten.linear on a GPU)
            impl = registry.find(node, target, device.type)
            if impl is None:
                continue
        node.target = impl.callable_for(node, weights)
        chosen[node.name] = impl.name
    return GraphModule(weights_module(weights), exec_graph)


def weights_module(weights: dict[str, torch.Tensor]) -> torch.nn.Module:
    """A module holding each weight as a buffer at its dotted get_attr target, the root of a
    GraphModule over a graph that reads them."""
    root = torch.nn.Module()
    for name, tensor in weights.items():
        owner = root
        *parents, leaf = name.split(".")
        for part in parents:
            if not hasattr(owner, part):
                owner.add_module(part, torch.nn.Module())
            owner = getattr(owner, part)
        owner.register_buffer(leaf, tensor, persistent=False)
    return root


def _dedup(weights: dict[str, torch.Tensor]) -> tuple[dict, dict]:
    """Split tensors that share storage into one stored copy and name aliases."""
    seen: dict[tuple, str] = {}
    unique, aliases = {}, {}
    for name, tensor in weights.items():
        key = (tensor.untyped_storage().data_ptr(), tensor.storage_offset(), tuple(tensor.shape), tensor.dtype)
        if key in seen:
            aliases[name] = seen[key]
        else:
            seen[key] = name
            unique[name] = tensor
    return unique, aliases
