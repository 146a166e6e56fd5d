"""Trace a causal LM to the canonical aten graph of DESIGN.md §3 with `torch.export`.

    input_ids [1, T], position_ids [1, T]  (T dynamic: all sequences of a step, packed)
      -> logits [1, T, V]

The model is traced with fake parameters of the target dtype on the target device, so tracing
neither copies nor casts the user's weights; `TracedModel.weights` maps every `get_attr`
target to the user's own tensor, which lowering prepares once.

torch.export's program is decomposed to the fusion passes' aten level node by node
(`fusion/decompose.py`: about 10 s less for 32 layers than `run_decompositions`, which
retraces the whole program and stays the fallback for graphs with mutations). A model whose
decoder layers repeat one another is traced with three of them and the third copied for the
rest (`layers.py`: a 32-layer trace in the time of a 3-layer one).

The graph module is torch.fx's lazy one: `recompile()` (after every rewrite of the tracer and
of each fusion pass) only marks it stale, and its code is generated when it is run or
printed. Nothing runs the traced module during a compile (lowering builds its own), and each
code generation of a 32-layer graph cost about 0.1 s.
"""

from __future__ import annotations

import contextlib
import inspect
import operator
import warnings
from dataclasses import dataclass

import torch
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.export import Dim
from torch.fx._lazy_graph_module import _LazyGraphModule
from torch.fx.experimental.symbolic_shapes import ShapeEnv
from torch.nn.utils import stateless

from trtllm.fusion.decompose import decompose
from trtllm.fusion.graph import aten_decompositions
from trtllm.kernels.errors import UnsupportedModelError
from trtllm.lowering.spec import ModelSpec

from . import hf, layers


class _CausalLM(torch.nn.Module):
    """`forward(input_ids, position_ids) -> logits`, whatever the model returns."""

    def __init__(self, model: torch.nn.Module, takes_position_ids: bool, is_hf: bool):
        super().__init__()
        self.model = model
        self.takes_position_ids = takes_position_ids
        self.is_hf = is_hf

    def forward(self, input_ids: torch.Tensor, position_ids: torch.Tensor) -> torch.Tensor:
        if self.is_hf:
            out = self.model(input_ids=input_ids, position_ids=position_ids, use_cache=False)
        elif self.takes_position_ids:  # a hand-written module: positional ids, positions by name
            out = self.model(input_ids, position_ids=position_ids)
        else:  # it numbers tokens itself (arange(S)): T of both inputs is one symbol
            torch._check(position_ids.shape[1] == input_ids.shape[1])
            out = self.model(input_ids)
        return out if isinstance(out, torch.Tensor) else out.logits


@dataclass(frozen=True)
class TracedModel:
    graph_module: torch.fx.GraphModule  # canonical graph; its parameters are fake
    weights: dict[str, torch.Tensor]  # get_attr target -> the user's own tensor (not a copy)
    spec: ModelSpec  # shapes the KV cache and the runtime need


def _fake_state(wrapper: torch.nn.Module, fake_mode: FakeTensorMode, dtype, device) -> dict:
    """Fake parameters (cast to `dtype`) and buffers (own dtype), tied tensors kept tied."""
    by_id: dict[int, torch.Tensor] = {}
    state: dict[str, torch.Tensor] = {}
    with fake_mode:
        for name, p in wrapper.named_parameters(remove_duplicate=False):
            if id(p) not in by_id:
                p_dtype = dtype if p.is_floating_point() else p.dtype
                fake = torch.empty(p.shape, dtype=p_dtype, device=device)
                by_id[id(p)] = torch.nn.Parameter(fake, requires_grad=False)
            state[name] = by_id[id(p)]
        for name, b in wrapper.named_buffers(remove_duplicate=False):
            if id(b) not in by_id:
                by_id[id(b)] = torch.empty(b.shape, dtype=b.dtype, device=device)
            state[name] = by_id[id(b)]
    return state


@contextlib.contextmanager
def _eval_mode(model: torch.nn.Module):
    was_training = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was_training)


def _takes_position_ids(model: torch.nn.Module) -> bool:
    try:
        return "position_ids" in inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        return False


def export(model: torch.nn.Module, dtype: torch.dtype, device: torch.device):
    """Run torch.export on the user's model; returns (graph_module, weights). Repeated decoder
    layers are traced three times and copied for the rest (`layers.py`)."""
    is_hf = hf.is_hf_model(model)
    wrapper = _CausalLM(model, _takes_position_ids(model), is_hf)
    graph_module = None
    repeated = layers.repeated_layers(model) if is_hf else None
    if repeated is not None:
        try:
            with layers.first_layers(model, repeated, layers.TRACED):
                graph_module = _export(wrapper, is_hf, dtype, device)
        except Exception:  # a model that reads all its layers (by config count): traced whole below
            graph_module = None
        if graph_module is not None and not layers.replicate(graph_module, f"model.{repeated}",
                                                             model.config.num_hidden_layers):
            graph_module = None
    if graph_module is None:
        graph_module = _export(wrapper, is_hf, dtype, device)
    real = dict(wrapper.named_parameters(remove_duplicate=False))
    real.update(wrapper.named_buffers(remove_duplicate=False))
    weights = {}
    for node in graph_module.graph.nodes:
        if node.op == "get_attr":
            weights[node.target] = _real_attr(graph_module, node.target, real)
    return graph_module, weights


def _export(wrapper: _CausalLM, is_hf: bool, dtype: torch.dtype, device: torch.device) -> torch.fx.GraphModule:
    """The wrapped model as a decomposed GraphModule with fake parameters."""
    fake_mode = FakeTensorMode(shape_env=ShapeEnv())
    fake_state = _fake_state(wrapper, fake_mode, dtype, device)
    with fake_mode:
        ids = torch.zeros((1, 8), dtype=torch.long, device=device)  # [1, T]
        pos = torch.zeros((1, 8), dtype=torch.long, device=device)  # [1, T]
    # any packed step, and any [B, S] of __call__; a hand-written module may bound S itself
    # (nanoGPT's `assert t <= block_size`), which a named Dim would refuse
    tokens = Dim("num_tokens", min=1) if is_hf else Dim.DYNAMIC
    dynamic = {"input_ids": {1: tokens}, "position_ids": {1: tokens}}
    with warnings.catch_warnings():
        # torch.export's own pytree code warns about its own deprecated LeafSpec use.
        warnings.filterwarnings("ignore", message=".*LeafSpec.*", category=FutureWarning)
        with _eval_mode(wrapper.model), hf.routed_attention(wrapper.model), torch.no_grad():
            with stateless._reparametrize_module(wrapper, fake_state, tie_weights=True):
                program = torch.export.export(wrapper, (ids, pos), dynamic_shapes=dynamic, strict=False)
        graph_module = _LazyGraphModule.from_graphmodule(program.module())
        if not decompose(graph_module):  # mutations (MoE routing) or higher-order ops: the full retrace
            graph_module = _LazyGraphModule.from_graphmodule(program.run_decompositions(aten_decompositions()).module())
    return graph_module


def _real_attr(graph_module: torch.fx.GraphModule, target: str, real: dict) -> torch.Tensor:
    """The user's tensor behind a get_attr, or a constant that tracing made (real, not fake)."""
    if target in real:
        return real[target]
    value = operator.attrgetter(target)(graph_module)
    if isinstance(value, torch.Tensor) and not isinstance(value, torch._subclasses.FakeTensor):
        return value
    raise UnsupportedModelError(
        f"the traced graph reads {target!r}, a tensor computed from the weights at trace time; "
        "trtllm needs it to be a parameter or buffer of the model"
    )

