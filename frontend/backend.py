"""`torch.compile(module, backend="trtllm")`: the fusion passes on the graphs of any module.

    fast = torch.compile(module, backend="trtllm",
                         options={"patterns": [p], "dtype": "bf16", "cuda_graphs": False})

setup.py registers `trtllm_backend` under the `torch_dynamo_backends` entry point, so
`backend="trtllm"` works in a process that never imported trtllm. Every graph dynamo hands
over (one per piece of code between graph breaks) becomes:

    dynamo FX graph ─ AOTAutograd ─▶ aten forward graph ─ patterns, GENERIC_PASSES ─▶ [dtype] ─▶ runs

- AOTAutograd functionalizes the graph (in-place ops and buffer updates become outputs that its
  runtime wrapper writes back) and decomposes it with `aten_decompositions()`. When no gradient
  is needed (`torch.no_grad()`, or no input requires grad) it traces an inference graph, and
  keeps the composite ops of `KEPT_WHOLE` (linear, matmul, layer_norm, SDPA, ...) whole as the
  tracer does, so patterns match here what they match in `trtllm.compile`. When a gradient is
  needed it builds forward and backward graphs; autograd then decomposes those composites, and
  the passes run on the forward graph only.
- The passes are the registered and user patterns, then `trtllm.fusion.GENERIC_PASSES` (passes
  safe on any graph); not the LLM step passes (`gather_logits`, `insert_kv_cache`).
- The native lowering of an arbitrary graph is the aten graph module itself: ops no pass
  understands stay torch ops.

Options (`options={...}`; any other key is a `ConfigError`, raised when dynamo compiles the first
graph, so `torch.compile` callers see it as the `inner_exception` of dynamo's
`BackendCompilerFailed`):

- `patterns`: a list of `trtllm.fusion.Pattern`.
- `dtype`: None (as traced), "fp32", "fp16" or "bf16". The forward graph runs in that dtype:
  every floating input (user tensors, parameters, buffers: AOTAutograd passes them all as inputs,
  whether or not dynamo inlined the module) and floating constant is cast to it; every floating
  dtype the graph names (`.float()`, `.to(torch.float32)`, factory ops, reductions' `dtype=`) is
  replaced by it, since dynamo bakes the traced dtypes into the graph and a half-converted graph
  would mix dtypes; each floating output is cast back to the dtype eager produces, and mutated
  buffers and inputs are written back in their own dtype (holding values computed in `dtype`).
  So everything runs in `dtype`, including the float32 islands models keep on purpose (softmax
  and norm statistics, rotary angles from integer positions, which bf16 holds exactly only up
  to 256 and fp16 up to 2048). Parameters are cast on every call (the graph holds no state): a
  copy of the weights per call. For eager-faithful mixed precision cast the module first
  (`module.to(torch.bfloat16)`) and leave `dtype` unset; for LLMs use `trtllm.compile`. The
  backward graph, when there is one, keeps the traced dtypes.
- `cuda_graphs`: bool, default False. Accepted but not applied yet: graphs run as plain
  kernel launches on every device (on CPU there is nothing to capture anyway).
"""

from __future__ import annotations

import contextlib
import functools
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch._dynamo.backends.common import aot_autograd
from torch._functorch.aot_autograd import make_boxed_func
from torch._guards import detect_fake_mode
from torch.export.exported_program import (
    _override_composite_implicit_decomp,
    _split_decomp_table_to_cia_and_python_decomp,
)
from torch.fx import GraphModule, Node
from torch.fx.passes.fake_tensor_prop import FakeTensorProp

from trtllm import fusion
from trtllm.fusion import Pattern, pattern_passes, run_passes
from trtllm.fusion.graph import aten_decompositions
from trtllm.kernels.errors import ConfigError

from .config import DTYPES

log = logging.getLogger("trtllm")


@dataclass(frozen=True)
class BackendOptions:
    patterns: tuple[Pattern, ...] = ()  # user fusion patterns, run on every forward graph
    dtype: str | None = None  # "fp32", "fp16", "bf16": run forward graphs in it (None: as traced)
    cuda_graphs: bool = False  # accepted, not applied yet

    @classmethod
    def parse(cls, options: dict | None) -> BackendOptions:
        """Check the `options` dict of `torch.compile`; a `ConfigError` names the bad entry."""
        options = {} if options is None else options
        if not isinstance(options, dict):
            raise ConfigError(f"backend 'trtllm' takes options as a dict, got {type(options).__name__}")
        valid = ("patterns", "dtype", "cuda_graphs")
        unknown = sorted(set(options) - set(valid))
        if unknown:
            raise ConfigError(f"unknown option(s) {unknown} for backend 'trtllm'; valid options: {list(valid)}")
        patterns = options.get("patterns", ())
        if not isinstance(patterns, (list, tuple)):
            raise ConfigError(
                f"options['patterns'] must be a list of trtllm.fusion.Pattern, got {type(patterns).__name__}"
            )
        for index, pattern in enumerate(patterns):
            if not isinstance(pattern, Pattern):
                raise ConfigError(
                    f"options['patterns'][{index}] is {pattern!r} ({type(pattern).__name__}), "
                    "not a trtllm.fusion.Pattern"
                )
        dtype = options.get("dtype")
        if dtype is not None and dtype not in DTYPES:
            raise ConfigError(f"options['dtype'] is {dtype!r}; use None or one of {sorted(DTYPES)}")
        cuda_graphs = options.get("cuda_graphs", False)
        if not isinstance(cuda_graphs, bool):
            raise ConfigError(f"options['cuda_graphs'] must be True or False, got {cuda_graphs!r}")
        return cls(tuple(patterns), dtype, cuda_graphs)


def trtllm_backend(gm: GraphModule, example_inputs: Sequence[Any], options: dict | None = None,
                   mode: str | None = None) -> Callable[..., Any]:
    """The dynamo backend: `torch.compile(m, backend="trtllm", options=...)` calls it once per
    captured graph (`_TorchCompileWrapper` passes `options=` and `mode=` as keywords)."""
    if mode is not None:
        raise ConfigError(f"backend 'trtllm' has no mode {mode!r}; leave mode unset and use options")
    opts = BackendOptions.parse(options)
    compile_forward = functools.partial(_compile_forward, opts=opts)
    python_decomps, kept_whole = _decomposition_tables()
    needs_grad = torch.is_grad_enabled() and any(
        isinstance(t, torch.Tensor) and t.requires_grad for t in (*example_inputs, *gm.parameters())
    )
    # Keeping composites whole patches their autograd kernels (as torch.export does, restored on
    # exit), so only inference graphs can.
    keep_whole = contextlib.nullcontext() if needs_grad else _override_composite_implicit_decomp(kept_whole)
    with keep_whole:
        compiler = aot_autograd(fw_compiler=compile_forward, inference_compiler=compile_forward,
                                bw_compiler=_compile_backward, decompositions=python_decomps)
        return compiler(gm, example_inputs)


def _decomposition_tables() -> tuple[dict, dict]:
    """`aten_decompositions()` split as torch.export splits it: Python decompositions for
    AOTAutograd, and CompositeImplicit ops -> their decomposition or a keep-whole marker."""
    table = dict(aten_decompositions())  # the split deletes entries from the table it is given
    kept_whole, python_decomps = _split_decomp_table_to_cia_and_python_decomp(table)
    return python_decomps, kept_whole


def _compile_forward(gm: GraphModule, example_inputs: Sequence[Any], *, opts: BackendOptions) -> Callable[..., Any]:
    """The aten forward (or inference) graph: passes, then the dtype; returns it to run."""
    passes = [*pattern_passes(opts.patterns), *fusion.GENERIC_PASSES]
    reports = run_passes(gm, passes)
    if opts.dtype is not None:
        run_in_dtype(gm, DTYPES[opts.dtype], example_inputs)
    num_ops = sum(n.op == "call_function" for n in gm.graph.nodes)
    summary = ", ".join(f"{r.name}={r.rewrites}" for r in reports) or "no passes"
    log.info("torch.compile(backend='trtllm'): graph of %d ops, dtype=%s; rewrites: %s",
             num_ops, opts.dtype, summary)
    return make_boxed_func(gm)


def _compile_backward(gm: GraphModule, example_inputs: Sequence[Any]) -> Callable[..., Any]:
    """The backward graph runs as AOTAutograd made it."""
    return make_boxed_func(gm)


# -- dtype ------------------------------------------------------------------------------------


def _is_float(value: Any) -> bool:
    return isinstance(value, torch.Tensor) and value.is_floating_point()


def _retype(value: Any, dtype: torch.dtype) -> Any:
    """`value` with every floating dtype literal in it replaced by `dtype`."""
    return torch.fx.node.map_aggregate(
        value, lambda a: dtype if isinstance(a, torch.dtype) and a.is_floating_point else a
    )


def run_in_dtype(gm: GraphModule, dtype: torch.dtype, example_inputs: Sequence[Any]) -> None:
    """Make `gm` compute in `dtype` (in place): floating inputs and constants cast on entry,
    floating dtype literals replaced, floating outputs cast back to their traced dtype.

    Before:  y = linear(x, w, b)                                   # x, w, b, y: float32
    After:   y = _to_copy(linear(_to_copy(x, bf16), _to_copy(w, bf16), ...), float32)
    """
    graph = gm.graph
    output = graph.output_node()
    out_dtypes = [o.meta["val"].dtype if isinstance(o, Node) and _is_float(o.meta.get("val")) else None
                  for o in output.args[0]]
    body = next(n for n in graph.nodes if n.op != "placeholder")
    for node in list(graph.nodes):
        if node.op in ("placeholder", "get_attr") and _is_float(node.meta.get("val")):
            where = graph.inserting_before(body) if node.op == "placeholder" else graph.inserting_after(node)
            with where:
                cast = graph.call_function(torch.ops.aten._to_copy.default, (node,), {"dtype": dtype})
            # Inputs returned as they are stay the caller's tensors (AOTAutograd expects them).
            node.replace_all_uses_with(cast, delete_user_cb=lambda user, c=cast: user is not c and user.op != "output")
        elif node.op == "call_function":
            node.args, node.kwargs = _retype(node.args, dtype), _retype(node.kwargs, dtype)
            if _is_float(node.meta.get("val")) and _takes_dtype(node) and node.kwargs.get("dtype") is None:
                node.kwargs = {**node.kwargs, "dtype": dtype}  # factories default to float32
    outputs = list(output.args[0])
    for index, (value, out_dtype) in enumerate(zip(outputs, out_dtypes)):
        if out_dtype is not None and value.op not in ("placeholder", "get_attr"):
            with graph.inserting_before(output):
                outputs[index] = graph.call_function(
                    torch.ops.aten._to_copy.default, (value,), {"dtype": out_dtype})
    output.args = (type(output.args[0])(outputs),)
    graph.eliminate_dead_code()  # casts of inputs that are only returned
    graph.lint()
    gm.recompile()
    _propagate(gm, dtype, example_inputs)


def _takes_dtype(node: Node) -> bool:
    """`node` is an aten op with a keyword `dtype` argument (factories, reductions, copies)."""
    target = node.target
    return isinstance(target, torch._ops.OpOverload) and any(
        a.name == "dtype" and a.kwarg_only for a in target._schema.arguments
    )


def _propagate(gm: GraphModule, dtype: torch.dtype, example_inputs: Sequence[Any]) -> None:
    """Recompute every `meta["val"]`; an op that cannot run in `dtype` fails here, at compile time."""
    mode = detect_fake_mode(example_inputs)
    inputs = [n.meta["val"] for n in gm.graph.find_nodes(op="placeholder")]

    class _Prop(FakeTensorProp):
        def run_node(self, node: Node) -> Any:
            try:
                return super().run_node(node)
            except (RuntimeError, TypeError) as exc:
                raise ConfigError(
                    f"options['dtype']: node {node.name} ({node.target}) cannot run in {dtype}: {exc}; "
                    "leave dtype unset and cast the module itself instead"
                ) from exc

    _Prop(gm, mode).propagate_dont_convert_inputs(*inputs)
