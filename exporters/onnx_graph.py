"""The ONNX graph of a decoder with its KV cache: traced by torch.onnx, quantized MatMuls swapped for
MatMulNBits (winq.formats.onnx builds the nodes and their bytes).

How the graph is made: the model is traced by torch.onnx.export (TorchScript, opset 18: the tested
exporter for these models; dynamo needs onnxscript and batch >= 2) with every quantized Linear
swapped for a module that multiplies by its dequantized weight held as a named (in, out)
parameter `<module>.weight_t`; that MatMul is then replaced by a MatMulNBits node built from the
QuantizedWeight's codes, scales and zeros (never from onnxruntime's own quantizer). Nodes are
found by the initializer name, not by scope names; initializer de-duplication is off during the
trace, so every layer keeps its own. Embeddings, norms and a float lm_head stay float32 (a tied
lm_head reads the embedding through a Transpose: stored once).
"""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import torch
from torch import nn

from winq.formats import onnx as F
from winq.qweight import QuantizedWeight

from . import ExportError

OPSET = 18  # the TorchScript exporter's tested opset for these models
WEIGHT_SUFFIX = ".weight_t"  # name of the placeholder parameter of a quantized layer during the trace
WRAPPED = "lm"  # attribute of the trace wrapper that holds the model (initializer names start with "lm.")


class _ExportLinear(nn.Module):
    """x @ weight_t (+ bias): the traced stand-in of a quantized Linear, its weight a named (in, out) parameter."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None):
        super().__init__()
        self.weight_t = nn.Parameter(weight.detach().t().contiguous(), requires_grad=False)  # (in, out)
        self.bias = None if bias is None else nn.Parameter(bias.detach().clone(), requires_grad=False)

    def forward(self, x):
        y = torch.matmul(x, self.weight_t)
        return y if self.bias is None else y + self.bias


class _Decoder(nn.Module):
    """Flat tensors in and out: past_key_values.N.key/value -> a DynamicCache -> present.N.key/value."""

    def __init__(self, model, n_layers: int):
        super().__init__()
        setattr(self, WRAPPED, model)
        self.n_layers = n_layers

    def forward(self, input_ids, attention_mask, position_ids, *past):
        from transformers import DynamicCache

        model = getattr(self, WRAPPED)
        cache = DynamicCache(config=model.config)
        for i in range(self.n_layers):
            cache.update(past[2 * i], past[2 * i + 1], i)
        out = model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                    past_key_values=cache, use_cache=True)
        presents = []
        for layer in out.past_key_values.layers:
            presents += [layer.keys, layer.values]
        return (out.logits, *presents)


def trace_decoder(model, path: Path, quantized: dict[str, QuantizedWeight] | None = None) -> None:
    """torch.onnx.export the float decoder to `path` (float32, quantized layers as MatMul by `<name>.weight_t`).

    `quantized` layers are swapped (and swapped back afterwards) for _ExportLinear holding
    their dequantized weight; other modules are traced as they are. The model is not changed.
    """
    import warnings

    cfg = model.config
    n_layers = cfg.num_hidden_layers
    swapped = {}
    try:
        for name, qw in (quantized or {}).items():
            mod = model.get_submodule(name)
            parent_name, _, child = name.rpartition(".")
            parent = model.get_submodule(parent_name) if parent_name else model
            swapped[name] = (parent, child, mod)
            setattr(parent, child, _ExportLinear(qw.dequantize(), getattr(mod, "bias", None)))
        wrapper = _Decoder(model, n_layers).eval()
        B, T, P = 2, 3, 2  # traced shapes; every axis below is dynamic
        H, D = F.kv_shape(cfg)
        g = torch.Generator().manual_seed(0)
        ids = torch.randint(0, cfg.vocab_size, (B, T), generator=g)
        mask = torch.ones(B, P + T, dtype=torch.int64)
        pos = torch.arange(P, P + T)[None].expand(B, T).contiguous()
        past = [torch.zeros(B, H, P, D) for _ in range(2 * n_layers)]
        names_in, names_out = F.io_names(n_layers)
        dyn = {"input_ids": {0: "batch", 1: "seq"}, "attention_mask": {0: "batch", 1: "total"},
               "position_ids": {0: "batch", 1: "seq"}, "logits": {0: "batch", 1: "seq"}}
        dyn.update({n: {0: "batch", 2: "past"} for n in names_in[3:]})
        dyn.update({n: {0: "batch", 2: "total"} for n in names_out[1:]})
        with warnings.catch_warnings(), torch.no_grad():
            warnings.simplefilter("ignore")  # the TorchScript exporter's deprecation and tracer warnings
            torch.onnx.export(
                wrapper, (ids, mask, pos, *past), str(path), input_names=names_in, output_names=names_out,
                dynamic_axes=dyn, opset_version=OPSET, dynamo=False, do_constant_folding=True,
                keep_initializers_as_inputs=True,  # turns off initializer de-duplication: one initializer per layer
            )
    finally:
        for parent, child, mod in swapped.values():
            setattr(parent, child, mod)


def traced(model, work: Path, quantized: dict[str, QuantizedWeight] | None = None):
    """The traced graph (see trace_decoder), its parameters moved from graph inputs to plain
    initializers and tied copies undone; the trace's files go to the new folder `work`, removed after."""
    work.mkdir(parents=True)
    try:
        trace_decoder(model, work / F.MODEL_FILE, quantized)
        m = F.load_graph(work / F.MODEL_FILE, weights=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    inits = {i.name for i in m.graph.initializer}
    keep = [i for i in m.graph.input if i.name not in inits]
    del m.graph.input[:]
    m.graph.input.extend(keep)
    _untie_transposed(m)
    return m


def _untie_transposed(m) -> None:
    """A MatMul weight that is the transpose of another initializer (a tied lm_head: the tracer folds
    embedding.T into a new tensor) reads that initializer through a Transpose node instead: stored once.
    onnxruntime folds the Transpose when the session is created."""
    from onnx import helper, numpy_helper

    g = m.graph
    # quantized layers' placeholders are never tied copies (and are replaced later): leave them out
    by_name = {t.name: t for t in g.initializer if not t.name.endswith(WEIGHT_SUFFIX)}
    arrays = {}

    def arr(t):
        if t.name not in arrays:
            arrays[t.name] = numpy_helper.to_array(t)
        return arrays[t.name]

    for node in list(g.node):
        if node.op_type != "MatMul" or node.input[1] not in by_name:
            continue
        b = by_name[node.input[1]]
        if len(b.dims) != 2:
            continue
        for e in list(by_name.values()):
            if e.name != b.name and list(e.dims) == list(b.dims)[::-1] and e.data_type == b.data_type:
                if (arr(e).T == arr(b)).all():
                    out = f"{e.name}.T"
                    if out not in {o for n in g.node for o in n.output}:
                        g.node.insert(0, helper.make_node("Transpose", [e.name], [out], name=f"{e.name}/Transpose",
                                                          perm=[1, 0]))
                    node.input[1] = out
                    if not any(b.name in n.input for n in g.node):
                        g.initializer.remove(b)
                        del by_name[b.name]
                    break


def replace_matmuls(m, layers: dict[str, F.NBitsWeight], accuracy_level: int) -> None:
    """Replace the MatMul that reads `lm.<name>.weight_t` by MatMulNBits for every layer (in place)."""
    from onnx import helper

    g = m.graph
    wanted = {f"{WRAPPED}.{n}{WEIGHT_SUFFIX}": n for n in layers}
    users: dict[str, list[int]] = {}
    for idx, node in enumerate(g.node):
        for x in node.input:
            if x in wanted:
                users.setdefault(x, []).append(idx)
    for w, n in wanted.items():
        idx = users.get(w, [])
        if len(idx) != 1 or g.node[idx[0]].op_type != "MatMul" or list(g.node[idx[0]].input)[1:] != [w]:
            found = [g.node[i].op_type for i in idx]
            raise ExportError(f"{n}: expected one MatMul reading {w} in the traced graph, found {found or 'none'}")
    new_inits = []
    for w, n in wanted.items():
        i = users[w][0]
        old = g.node[i]
        node, inits = F.make_node(n, layers[n], old.input[0], old.output[0], accuracy_level)
        new_inits += inits
        g.node.remove(old)
        g.node.insert(i, node)
    keep = [t for t in g.initializer if t.name not in wanted]
    del g.initializer[:]
    g.initializer.extend(keep + new_inits)
    if not any(o.domain == F.MS_DOMAIN for o in m.opset_import):
        m.opset_import.append(helper.make_opsetid(F.MS_DOMAIN, 1))


def gather_quantized(m, embed: str, name: str, L: F.NBitsWeight) -> None:
    """Make the Gather that reads the float embedding initializer `embed` a GatherBlockQuantized over the
    bytes of the MatMulNBits weight `name` (its B reshaped to (N, K * bits / 8), its scales): the tied table
    is stored once. Needs K to fill whole blocks (no padding columns)."""
    from onnx import helper, numpy_helper

    g = m.graph
    if L.K % L.block_size:
        raise ExportError(f"{name}: K={L.K} is not a multiple of block_size={L.block_size}; cannot share its bytes")
    users = [n for n in g.node if embed in n.input]
    if len(users) != 1 or users[0].op_type != "Gather" or users[0].input[0] != embed:
        found = [n.op_type for n in users]
        raise ExportError(f"expected one Gather reading {embed} in the traced graph, found {found or 'none'}")
    old = users[0]
    shape = numpy_helper.from_array(np.array([L.N, L.K * L.bits // 8], dtype=np.int64), f"{name}.qweight_2d_shape")
    data = f"{name}.qweight_2d"
    inputs = [data, old.input[1], f"{name}.scales"] + ([f"{name}.qzeros"] if L.zero_points is not None else [])
    i = list(g.node).index(old)
    g.node.remove(old)
    g.node.insert(i, helper.make_node("GatherBlockQuantized", inputs, [old.output[0]],
                                      name=f"{embed}/GatherBlockQuantized", domain=F.MS_DOMAIN, gather_axis=0,
                                      quantize_axis=1, block_size=L.block_size, bits=L.bits))
    g.node.insert(0, helper.make_node("Reshape", [f"{name}.qweight", shape.name], [data], name=f"{name}/Reshape"))
    keep = [t for t in g.initializer if t.name != embed]
    del g.initializer[:]
    g.initializer.extend(keep + [shape])


def export_float(model, folder: Path, metadata: dict | None = None) -> None:
    """A plain float32 ONNX of `model` (QuantLinear layers as their dequantized weights) into folder."""
    from winq.prepare import quant_layers, quantized_weights

    folder = Path(folder)
    quant = quantized_weights(model) if quant_layers(model) else {}
    m = traced(model, folder / ".trace", quant)
    m.producer_name = "winq"
    if metadata is not None:
        F.set_metadata(m, metadata)
    F.save_model(m, folder)
