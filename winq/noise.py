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
  mix(seed, k, c). The values therefore depend only on (seed, k), not on the thread count or
  on who fills them, and resuming a run needs only the draw counter k;
* on CPU, when torch leaves a core free, the fill runs beside the forward: the pre-hook starts
  a side thread that fills the chunks in order, and each layer waits only for the chunks that
  hold its own W and alpha noise (`ready(layer)`) before it quantizes. torch's normal_ is
  single-threaded per call and costs about 4 ns a value (0.43 s a draw of the default model's
  106M values, idle machine); beside the forward, which reads the first layer's noise within
  milliseconds, the draw no longer adds to the step. The values are the same as those of a fill
  before the forward (`draw()`: on GPU, with `background=False`, or when torch uses every core,
  where a side thread would compete with torch's own threads).

The noise is exactly Gaussian (torch's normal_), sigma is applied by the layer, and sigma = 0
(plain QAT, eval) draws nothing.
"""

from __future__ import annotations

import os
import threading
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

    background: True: the pre-hook starts each fill on a side thread and returns; a layer calls
    `ready(layer)` before it reads its noise. False: the pre-hook fills the whole buffer before the
    forward runs (in parallel chunks on the CPU threads; on GPU normal_ is asynchronous anyway).
    None (default): True on CPU while torch uses fewer threads than there are cores, so the side
    thread has a core of its own; else False (measured on 2 cores, forward + backward of the default
    model at 2 threads: 3.10 s filled before, 3.44 s beside, 2.64 s without noise).
    """

    def __init__(self, model: nn.Module, seed: int, layers: dict | None = None, background: bool | None = None):
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
            m.noise_chunks = -(-off // CHUNK)  # the chunks a layer waits for: 0 .. noise_chunks - 1
        self._chunks = [self.buffer[i : i + CHUNK] for i in range(0, total, CHUNK)]
        self._pool = None
        self.background = background
        self._cv = threading.Condition()
        self._filled = len(self._chunks)  # chunks of the current draw filled so far (all, before any draw)
        self._error: BaseException | None = None
        self._filler: threading.Thread | None = None
        self._hook = model.register_forward_pre_hook(self._pre_forward)

    def _pre_forward(self, module, args):
        if module.training and any(m.noise_sigma > 0 for m in self.layers.values()):
            self.start() if self._beside() else self.draw()

    def _beside(self) -> bool:
        if self.background is not None:
            return bool(self.background)
        return self.buffer.device.type == "cpu" and torch.get_num_threads() < (os.cpu_count() or 1)

    def _fill(self, k: int, c: int) -> None:
        g = torch.Generator(device=self.buffer.device).manual_seed(_mix(self.seed, k, c))
        self._chunks[c].normal_(generator=g)

    def draw(self) -> None:
        """Refill the buffer with fresh N(0, 1) values (draw number self.draws + 1) and return when it is full."""
        self.wait()
        self.draws += 1
        k = self.draws
        threads = torch.get_num_threads() if self.buffer.device.type == "cpu" else 1
        if threads > 1 and len(self._chunks) > 1:
            if self._pool is None or self._pool._max_workers != threads:
                self._pool = ThreadPoolExecutor(threads, thread_name_prefix="winq-noise")
            list(self._pool.map(lambda c: self._fill(k, c), range(len(self._chunks))))
        else:
            for c in range(len(self._chunks)):
                self._fill(k, c)

    def start(self) -> None:
        """Begin draw number self.draws + 1 on a side thread, chunk by chunk in order; `ready` waits for a layer's."""
        self.wait()  # the previous fill (normally long done: it ran beside the previous forward)
        self.draws += 1
        k, n = self.draws, len(self._chunks)
        with self._cv:
            self._filled, self._error = 0, None

        def run() -> None:
            try:
                for c in range(n):
                    self._fill(k, c)
                    with self._cv:
                        self._filled = c + 1
                        self._cv.notify_all()
            except BaseException as e:  # handed to the waiting forward
                with self._cv:
                    self._error, self._filled = e, n
                    self._cv.notify_all()

        self._filler = threading.Thread(target=run, name="winq-noise-fill", daemon=True)
        self._filler.start()

    def ready(self, layer: nn.Module) -> None:
        """Return once `layer`'s W and alpha noise of the current draw is in the buffer."""
        need = getattr(layer, "noise_chunks", len(self._chunks))
        if self._filled >= need and self._error is None:
            return
        with self._cv:
            self._cv.wait_for(lambda: self._filled >= need)
            if self._error is not None:
                raise RuntimeError(f"drawing the WinQ noise failed: {self._error}") from self._error

    def wait(self) -> None:
        """Return once the current draw is complete (no fill in flight)."""
        if self._filler is not None:
            self._filler.join()
            self._filler = None
            if self._error is not None:
                err, self._error = self._error, None
                raise RuntimeError(f"drawing the WinQ noise failed: {err}") from err

    def state_dict(self) -> dict[str, int]:
        return {"seed": self.seed, "draws": self.draws}

    def load_state_dict(self, st: dict) -> None:
        """Continue the stream of a saved run: the next draw is number st["draws"] + 1."""
        self.wait()
        self.seed = int(st["seed"])
        self.draws = int(st["draws"])

    def remove(self) -> None:
        """Detach from the model: the layers draw no more noise."""
        self.wait()
        self._hook.remove()
        for m in self.layers.values():
            m.noise = None
            m.eps_w = m.eps_a = None
        if self._pool is not None:
            self._pool.shutdown()
            self._pool = None
