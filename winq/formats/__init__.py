"""winq.formats: each file format's bytes, both ways, below the exporters and the runtime.

    containers  the one rule that stores a grid's codes in wider fields (q' = m q + a, z' = m z + a,
                s' = s / m) and its exactness check
    gguf        GGUF block types (a registry, one class per ggml type: can_hold, encode, decode),
                the type choice, llama.cpp's q/k row order, reading a file's tensors back
    gptq        GPTQ pack / unpack of one layer, the grid mapping, reading a GPTQ folder
    onnx        MatMulNBits pack / unpack / nodes, reading them back, onnxruntime sessions and the
                KV-cache decode loop of a decoder export
    manifest    winq-export.json: build, write, read, check
    headers     tensor names, dtypes and sizes from safetensors headers

Import rules (docs/ARCHITECTURE.md): this package imports only the rest of `winq` (the core);
winq.exporters and winq.runtime import it and never each other. Optional packages (onnx,
onnxruntime) are imported inside the functions that need them, through winq.errors.require.
"""
