"""WinQ's training noise: one buffer for every quantized layer, drawn once per training forward.

WinQ adds N(0, sigma^2) to each latent weight W and to each learned scale alpha in every
training forward (ARCHITECTURE §4.2). Drawing that noise per layer and keeping it for the
backward costs time and memory: 106M Gaussian values per forward on the default model, and
autograd kept `W + noise` (4 bytes per weight) alive until the backward. Here:

* one flat float32 buffer holds the standard-normal draws (epsilon) of every layer's W and
  alpha; each QuantLinear gets views into it (`eps_w` (out, in), `eps_a` (out, G));
* a forward pre-hook on the model refills the buffer at the start of every training-mode
  forward ("fresh each forward", as the reference draws it); the fused quantizer's backward
  reads the same views instead of saving a copy, so the noise costs one buffer, not a copy
  per step;
* the buffer is filled in fixed chunks, chunk c of draw k from its own generator seeded with
  mix(seed, k, c). The values therefore depend only on (seed, k), not on the thread count,
  the chunks are filled in parallel on CPU (torch's normal_ is single-threaded per call), and
  resuming a run needs only the draw counter k.

The noise is exactly Gaussian (torch's normal_), sigma is applied by the layer, and sigma = 0
(plain QAT, eval) draws nothing.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import torch
from torch import nn

CHUNK = 1 << 22  # values per chunk: 4M floats, 16 MB (fixed: the values must not depend on threads)
_MASK = (1 << 63) - 1


def _mix(*xs: int) -> int:
    """splitmix64 over the arguments: a well-spread 63-bit seed for one chunk of one draw."""
    h = 0x9E3779B97F4A7C15
    for x in xs:
        h = (h ^ (x & 0xFFFFFFFFFFFFFFFF)) * 0xBF58476D1CE4E5B9 & 0xFFFFFFFFFFFFFFFF
        h = (h ^ (h >> 27)) * 0x94D049BB133111EB & 0xFFFFFFFFFFFFFFFF
        h ^= h >> 31
    return h & _MASK


class NoiseSource:
    """Standard-normal draws for the quantized layers of `model`, refilled once per training forward.

    Installs itself on every QuantLinear of the model (`layer.noise = self`, `layer.eps_w`,
    `layer.eps_a`) and as a forward pre-hook on the model. `draws` counts the fills so far;
    `state_dict()` / `load_state_dict()` carry it across a checkpoint.
    """

    def __init__(self, model: nn.Module, seed: int, layers: dict | None = None):
        from .prepare import quant_layers

        self.layers = layers if layers is not None else quant_layers(model)
        self.seed = int(seed)
        self.draws = 0
        self.model = model
        dev = next(iter(self.layers.values())).weight.device if self.layers else torch.device("cpu")
        sizes = [(m.weight.numel(), m.alpha.numel()) for m in self.layers.values()]
        total = sum(a + b for a, b in sizes)
        self.buffer = torch.zeros(total, dtype=torch.float32, device=dev)
        off = 0
        for m, (nw, na) in zip(self.layers.values(), sizes):
            m.eps_w = self.buffer[off : off + nw].view(m.weight.shape)
            m.eps_a = self.buffer[off + nw : off + nw + na].view(m.alpha.shape)
            m.noise = self
            off += nw + na
        self._chunks = [self.buffer[i : i + CHUNK] for i in range(0, total, CHUNK)]
        self._pool = None
        self._hook = model.register_forward_pre_hook(self._pre_forward)

    def _pre_forward(self, module, args):
        if module.training and any(m.noise_sigma > 0 for m in self.layers.values()):
            self.draw()

    def draw(self) -> None:
        """Refill the buffer with fresh N(0, 1) values (draw number self.draws + 1)."""
        self.draws += 1
        k = self.draws
        dev = self.buffer.device

        def fill(c: int) -> None:
            g = torch.Generator(device=dev).manual_seed(_mix(self.seed, k, c))
            self._chunks[c].normal_(generator=g)

        threads = torch.get_num_threads() if dev.type == "cpu" else 1
        if threads > 1 and len(self._chunks) > 1:
            if self._pool is None or self._pool._max_workers != threads:
                self._pool = ThreadPoolExecutor(threads, thread_name_prefix="winq-noise")
            list(self._pool.map(fill, range(len(self._chunks))))
        else:
            for c in range(len(self._chunks)):
                fill(c)

    def state_dict(self) -> dict[str, int]:
        return {"seed": self.seed, "draws": self.draws}

    def load_state_dict(self, st: dict) -> None:
        """Continue the stream of a saved run: the next draw is number st["draws"] + 1."""
        self.seed = int(st["seed"])
        self.draws = int(st["draws"])

    def remove(self) -> None:
        """Detach from the model: the layers draw no more noise."""
        self._hook.remove()
        for m in self.layers.values():
            m.noise = None
            m.eps_w = m.eps_a = None
        if self._pool is not None:
            self._pool.shutdown()
            self._pool = None
