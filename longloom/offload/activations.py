"""Host offload of checkpointed layers: a reused pinned pool, side streams, prefetch one layer ahead.

Paper: "MEMO: Fine-grained Tensor Management For Ultra-long Context LLM Training" (Zhao et al., 2024),
the system behind "Efficiently Training 7B LLM with 1 Million Sequence Length on 8 GPUs". Idea: with
activation checkpointing a layer keeps only its input [B, S, hidden] between forward and backward; at
long sequence lengths even that no longer fits for every layer, so copy it to host memory while the
layer computes and bring it back one layer ahead of backward. Recomputing the layer in backward is
dominated by causal attention, so MEMO also swaps the attention output of a share of the tokens and
recomputes attention for the other tokens only (attention/tokenwise.py).

`share` (offload.activations) is that share of the tokens: 1.0 (true) swaps every token's attention
output and backward recomputes no attention at all; 0.5 swaps half of them and leaves a quarter of the
attention recomputation (the kept tokens are the last, most expensive ones). The layer input always goes
to the host. Swapped bytes per layer: the input plus `share` of the attention output and lse; they take
PCIe time and pinned host memory, which is what a share below 1 saves. Token-wise recomputation works
without SP, under Ulysses, TokenRing and both; linear-attention layers swap their input and are
recomputed in full (their cost is linear in tokens, like the projections).
The last layer keeps its input on the device and is recomputed in full, as under plain checkpointing:
its backward comes first, with nothing to hide a host->device copy behind. `device_layers` (chosen by
the run plan, training/plan.py, when the host cannot pin every layer input but the GPU has room) keeps
the inputs of the first layers of each forward on the device too; their attention outputs are kept as
in any other layer.

`device_share` (offload.device_activations) spends GPU memory where host memory runs out: the attention
output and lse of that share of the tokens stay on the device (a copy of the kept slice, no transfer,
no recomputation), on top of `share` swapped to the host. Both together are the kept tokens, the last
`share + device_share` of them (attention/tokenwise.py); the last of those, `share` of all tokens, go
to the host and the ones before them stay on the device (`kept_token_counts`). At share + device_share = 1
backward recomputes no attention. With a device share the last layer keeps all its kept tokens on the
device (a host copy would buy nothing there, as for its input), so it is not recomputed in full either.

How it plugs in: `ActivationOffloader.checkpoint` is a drop-in `checkpoint_fn` for the model. It runs
torch.utils.checkpoint (non-reentrant: recomputation in backward, collectives of SP attention re-run in
the same order on every rank, ZeRO hooks untouched) inside `saved_tensors_hooks`, and calls the layer
with `attention_outputs=` this layer's `LayerActivations` (None for the last layer without a device
share). Non-reentrant checkpoint saves the layer's inputs as saved tensors *outside* its own hook, so
our hook sees exactly the inputs; it swaps the layer input `hidden` and passes everything else (cos /
sin tables shared by all layers) through. Unpacking
happens at the start of the layer's recomputation in backward; the previous layer's tensors start
coming back then, or for a token-wise layer once its attention backward starts (after the MLP
backward, where a layer's backward holds the most memory).

Streams (CUDA): device->host copies run on an offload stream that first waits for the compute stream.
A copy keeps its device source alive until the *next* layer's forward has been issued; then the compute
stream waits on the copy's event (long done by then) and the reference is dropped, so the memory goes
back to the allocator at once on the compute stream. (`record_stream` would be correct too, but the
allocator only notices the end of the copy at a later allocation: the memory stays counted, and reused
late, which is what this module exists to avoid.) Host->device copies run on a prefetch stream; the
compute stream waits on their event, and a host buffer goes back to the pool tagged with that event so
the next step's device->host copy into it waits until it has been read. The device tensor a copy lands in
is allocated on the compute stream, which frees it, and the copy first waits for the compute stream: its
memory is reused in program order however far the host runs ahead of the GPU (`_prefetch`). On CPU the
same code runs with plain (unpinned) buffers and no streams.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint as torch_checkpoint

from longloom.attention.tokenwise import AttentionOutputs
from longloom.offload.host_pool import HostBuffer, PinnedHostPool


def kept_token_counts(total_tokens: int, share: float, device_share: float) -> tuple[int, int]:
    """(tokens whose attention output is kept, of which swapped to the host) of `total_tokens` queries.

    The kept tokens are the last round((share + device_share) x total); the host takes its share of
    them (all of them without a device share, as before it existed), the device the rest. Computed from
    the kept count alone, so that the keeper splits the kept tail it is handed the same way; the memory
    estimate (offload/memory.py) counts with this function too.
    """
    kept = min(total_tokens, round((share + device_share) * total_tokens))
    return kept, _swapped_of_kept(kept, share, device_share)


def _swapped_of_kept(kept: int, share: float, device_share: float) -> int:
    return kept if device_share == 0.0 else round(kept * share / (share + device_share))


class HostCopy:
    """A device tensor's bytes in a pool buffer, and (in backward) on their way back to the device.

    Returns its buffer to the pool when garbage collected (the autograd graph drops it after the layer's
    backward, or when a graph is abandoned without backward), so the pool never leaks buffers.
    """

    def __init__(self, tensor: torch.Tensor, pool: PinnedHostPool):
        self.shape, self.dtype = tensor.shape, tensor.dtype
        self.nbytes = tensor.numel() * tensor.element_size()
        self.buffer = pool.acquire(self.nbytes)
        self.prefetch = Prefetch()
        weakref.finalize(self, _return_buffer, pool, self.buffer, self.prefetch)
        self.host = self.buffer.view(tensor.shape, tensor.dtype)
        self.offloaded: torch.cuda.Event | None = None
        self.device_source: torch.Tensor | None = None  # the device tensor, until its copy is known done


class Prefetch:
    """The device tensor a HostCopy is coming back into, and the event of that copy (None: not under way)."""

    def __init__(self):
        self.tensor: torch.Tensor | None = None
        self.event: torch.cuda.Event | None = None


def _return_buffer(pool: PinnedHostPool, buffer: HostBuffer, prefetch: Prefetch) -> None:
    """A HostCopy's end: its buffer back to the pool; a prefetch never loaded (a backward that stopped
    half way) is freed only after the compute stream waits for its copy, which still writes into it."""
    if prefetch.tensor is not None and prefetch.event is not None:
        try:
            torch.cuda.current_stream(prefetch.tensor.device).wait_event(prefetch.event)
        except RuntimeError:  # at interpreter exit CUDA may be gone: nothing runs on the device anymore
            pass
    prefetch.tensor = None
    pool.release(buffer)


# What a layer keeps: a HostCopy, or the device tensor itself (the last layer, device-kept tokens).
Stored = HostCopy | torch.Tensor


class LayerActivations(AttentionOutputs):
    """What one checkpointed layer keeps for backward: its input and its attention outputs' kept tokens."""

    def __init__(self, offloader: ActivationOffloader, previous: LayerActivations | None, on_device: bool):
        self.offloader = offloader
        self.on_device = on_device
        self.input: Stored | None = None
        # Per attention call, the kept tail's (out, lse) pieces in token order: on the device, then swapped.
        self.attention: list[list[tuple[Stored, Stored]]] = []
        self.replaying = False
        self._next_attention = 0
        # A weak link: the previous layer's tensors must not outlive its own backward because of us.
        self.previous = weakref.ref(previous) if previous is not None else None

    def run(self, layer: nn.Module | Callable, *inputs: torch.Tensor) -> torch.Tensor:
        """The layer's forward: records on the first call, replays on the recomputation in backward."""
        self._next_attention = 0
        if not self.offloader.token_wise:
            output = layer(*inputs)
        else:
            # The last layer keeps nothing of its attention (it would stay on the device all along)
            # unless GPU memory was given to attention outputs (device_share).
            keeps_attention = not self.on_device or self.offloader.device_share > 0
            output = layer(*inputs, attention_outputs=self if keeps_attention else None)
        self.replaying = True
        return output

    # -- AttentionOutputs: called by attention/tokenwise.py inside the layer -----------------

    def kept_tokens(self, total_tokens: int) -> int:
        return kept_token_counts(total_tokens, self.offloader.share, self.offloader.device_share)[0]

    def keep(self, out_tail: torch.Tensor, lse_tail: torch.Tensor) -> None:
        offloader = self.offloader
        kept = out_tail.size(1)
        swapped = 0 if self.on_device else _swapped_of_kept(kept, offloader.share, offloader.device_share)
        on_device = kept - swapped
        pieces = []
        if on_device > 0 or self.on_device:
            # A copy of the slice: a view would hold the whole attention output on the device.
            pieces.append(
                (
                    offloader._keep_on_device(out_tail[:, :on_device]),
                    offloader._keep_on_device(lse_tail[:, :, :on_device]),
                )
            )
        if swapped > 0 or not pieces:  # (an empty tail, when no token is kept, goes the usual way)
            store = offloader._store
            pieces.append(
                (
                    store(out_tail[:, on_device:], on_device=False),
                    store(lse_tail[:, :, on_device:].contiguous(), on_device=False),
                )
            )
        self.attention.append(pieces)

    def restore(self) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        pieces = self.attention[self._next_attention]
        self._next_attention += 1
        load = self.offloader._load
        return [load(out) for out, _ in pieces], [load(lse) for _, lse in pieces]

    def attention_backward_started(self) -> None:
        self.offloader._prefetch_layer(self.previous_layer())

    def previous_layer(self) -> LayerActivations | None:
        return self.previous() if self.previous is not None else None

    def stored(self) -> list[Stored]:
        tensors = [self.input] if self.input is not None else []
        return tensors + [tensor for pieces in self.attention for pair in pieces for tensor in pair]


class ActivationOffloader:
    """`checkpoint_fn` for the model that moves each checkpointed layer's input and kept attention
    outputs to host memory; `share` is the share of tokens whose attention output is swapped (0, 1],
    `device_share` the share whose attention output stays in GPU memory [0, 1 - share]."""

    def __init__(
        self,
        share: float,
        device: torch.device,
        token_wise: bool = True,
        device_share: float = 0.0,
        device_layers: int = 0,
        layer_kinds: list[str] | None = None,
    ):
        """token_wise: call layers with `attention_outputs=` (attention/tokenwise.py); False for layers
        that do not take it (they then swap their input and recompute in full).
        device_layers: the first layers of each forward whose input stays in GPU memory rather than
        going to the host (the run plan's answer when the host cannot pin every layer input; their
        attention outputs are kept as in every other layer).
        layer_kinds: the kind of each checkpointed layer in forward order (model.layer_kinds(): "S"
        softmax, "L" linear); with it the first step page-locks the next layer's host buffers while a
        layer computes (the sizes a layer of that kind asked for), without it each layer's in turn."""
        if not 0.0 < share <= 1.0:
            raise ValueError(
                f"activation offload share {share} must be in (0, 1]: set offload.activations to true, "
                "false or a share of tokens in (0, 1]"
            )
        if not 0.0 <= device_share <= 1.0 - share + 1e-9:
            raise ValueError(
                f"offload.device_activations={device_share} must be a share in [0, 1] that adds up with "
                f"offload.activations={share} to at most 1 (together they are the tokens whose attention "
                "output is kept): lower one of them"
            )
        if device_layers < 0:
            raise ValueError(f"device_layers must be >= 0, got {device_layers}")
        self.share = float(share)
        self.device_share = float(device_share)
        self.device_layers = device_layers
        self.layer_kinds = list(layer_kinds) if layer_kinds is not None else None
        self._sizes_by_kind: dict[str, list[int]] = {}  # bytes a layer of each kind stored on the host
        self._layer_index = 0  # of the next checkpointed layer in this forward
        self.token_wise = token_wise
        self.device = torch.device(device)
        self.cuda = self.device.type == "cuda"
        self.pool = PinnedHostPool(pin=self.cuda, device=self.device if self.cuda else None)
        self.offload_stream = torch.cuda.Stream(self.device) if self.cuda else None
        self.prefetch_stream = torch.cuda.Stream(self.device) if self.cuda else None
        self._last_layer: weakref.ref[LayerActivations] | None = None
        self._copies_in_flight: list[HostCopy] = []  # copies still holding their device source
        self.swapped_bytes = 0  # bytes sent to the host by the last completed forward (for logs/benchmarks)
        self.device_kept_bytes = 0  # attention outputs kept in GPU memory by the last completed forward
        self._forward_bytes = 0
        self._forward_device_bytes = 0

    def side_streams(self) -> dict[str, torch.cuda.Stream | None]:
        """This offloader's streams by name (None on CPU), for the first step's GPU memory line."""
        return {"activation offload": self.offload_stream, "activation prefetch": self.prefetch_stream}

    def checkpoint(self, layer: nn.Module | Callable, *inputs: torch.Tensor, is_last_layer: bool = False):
        """Like torch.utils.checkpoint(layer, *inputs), with the layer's saved tensors on the host.

        The layer is called as `layer(*inputs, attention_outputs=LayerActivations)`.
        """
        # Only the identity of the layer input, never a reference: autograd keeps the pack hook alive as
        # long as the saved tensor, and a closure over `hidden` would pin it on the device.
        hidden_id = id(inputs[0])
        previous = self._last_layer() if self._last_layer is not None else None
        record = LayerActivations(self, previous, on_device=is_last_layer)
        input_on_device = is_last_layer or self._layer_index < self.device_layers
        index = self._layer_index
        self._layer_index = 0 if is_last_layer else self._layer_index + 1

        def pack(tensor: torch.Tensor):
            if id(tensor) != hidden_id:
                return tensor  # cos / sin: shared by every layer, small, and still alive anyway
            record.input = self._store(tensor, on_device=input_on_device)
            return record

        with torch.autograd.graph.saved_tensors_hooks(pack, self._unpack):
            output = torch_checkpoint(record.run, layer, *inputs, use_reentrant=False)
        # This layer's compute is queued behind the earlier copies: let go of their device sources.
        self._release_copied(keep=[] if is_last_layer else record.stored())
        if not is_last_layer:
            self._read_ahead(index, record)
        # The chain of layers ends at the last one: the next forward starts a new one.
        self._last_layer = weakref.ref(record) if not is_last_layer else None
        if is_last_layer:
            self.swapped_bytes, self._forward_bytes = self._forward_bytes, 0
            self.device_kept_bytes, self._forward_device_bytes = self._forward_device_bytes, 0
        return output

    # -- forward: device -> host -------------------------------------------------------------------

    def _read_ahead(self, index: int, record: LayerActivations) -> None:
        """While the pool grows (first step), page-lock the next layer's buffers on the pool's thread.

        The next layer asks for what the last layer of its kind stored (a softmax layer's input and kept
        attention outputs, a linear layer's input); a kind not seen yet, or the last layer (nothing goes to
        the host), gets nothing ahead. Layers of one kind store the same sizes, so every buffer made ahead
        is then asked for; one that is not (shapes that change between layers of a kind) stays in the pool
        for later requests that fit it."""
        if self.layer_kinds is None or index + 1 >= len(self.layer_kinds):
            return
        copies = [stored for stored in record.stored() if isinstance(stored, HostCopy)]
        if not copies:  # a forward without autograd (evaluation) stores nothing: keep what training stored
            return
        self._sizes_by_kind[self.layer_kinds[index]] = [copy.nbytes for copy in copies]
        grew = any(copy.buffer.handed_out == 1 for copy in copies)
        following = self.layer_kinds[index + 1]
        if grew and index + 1 < len(self.layer_kinds) - 1 and following in self._sizes_by_kind:
            self.pool.expect(self._sizes_by_kind[following])

    def _store(self, tensor: torch.Tensor, on_device: bool) -> Stored:
        if on_device:
            return tensor
        copy = HostCopy(tensor, self.pool)
        self._forward_bytes += copy.nbytes
        if self.cuda:
            stream = self.offload_stream
            stream.wait_stream(torch.cuda.current_stream(self.device))  # the tensor is written on compute
            if copy.buffer.last_read is not None:
                stream.wait_event(copy.buffer.last_read)  # last step's host->device read of this buffer
            with torch.cuda.stream(stream):
                copy.host.copy_(tensor, non_blocking=True)
                copy.offloaded = torch.cuda.Event()
                copy.offloaded.record(stream)
            copy.device_source = tensor
            self._copies_in_flight.append(copy)
        else:
            copy.host.copy_(tensor)
        return copy

    def _keep_on_device(self, tensor: torch.Tensor) -> torch.Tensor:
        kept = tensor.clone(memory_format=torch.contiguous_format)
        self._forward_device_bytes += kept.numel() * kept.element_size()
        return kept

    def _release_copied(self, keep: list[Stored]) -> None:
        """Drops the device sources of copies not in `keep`, after the compute stream waits on them."""
        still_copying = []
        current = torch.cuda.current_stream(self.device) if self.cuda else None
        for copy in self._copies_in_flight:
            if any(copy is kept for kept in keep):
                still_copying.append(copy)
                continue
            current.wait_event(copy.offloaded)  # frees below are ordered after the copy that reads them
            copy.device_source = None
        self._copies_in_flight = still_copying

    # -- backward: host -> device ------------------------------------------------------------------

    def _prefetch(self, stored: Stored) -> None:
        """Starts bringing `stored` back (prefetch stream on CUDA); a no-op when already under way."""
        if not isinstance(stored, HostCopy) or stored.prefetch.tensor is not None:
            return
        if self.cuda:
            compute, stream = torch.cuda.current_stream(self.device), self.prefetch_stream
            # Allocated on the compute stream, which uses and frees it: its block comes back for the
            # compute stream's next request in program order. From the prefetch stream's own pool it came
            # back only once the GPU had passed the free (record_stream), and the host runs layers ahead
            # of the GPU in backward: each prefetch then took a new block (tests/gpu/test_offload_cuda.py
            # holds the GPU back and checks the prefetch stream reserves nothing). The same effect on
            # ZeRO-3's gather stream is bounded in training/run_ahead.py.
            restored = torch.empty(stored.shape, dtype=stored.dtype, device=self.device)
            # The block may still be read by compute work queued before now: the copy waits for it. That
            # also starts the copy when the GPU reaches this layer's backward, one layer ahead, not sooner.
            stream.wait_stream(compute)
            stream.wait_event(stored.offloaded)
            with torch.cuda.stream(stream):
                restored.copy_(stored.host, non_blocking=True)
                event = torch.cuda.Event()
                event.record(stream)
            stored.prefetch.event = event
            stored.buffer.last_read = event
        else:
            restored = stored.host.clone()
        stored.prefetch.tensor = restored

    def _load(self, stored: Stored) -> torch.Tensor:
        """The device tensor of `stored`, for use on the compute stream now."""
        if not isinstance(stored, HostCopy):
            return stored
        self._prefetch(stored)  # normally done one layer earlier; synchronous fallback otherwise
        if self.cuda:
            torch.cuda.current_stream(self.device).wait_event(stored.prefetch.event)
        restored, stored.prefetch.tensor = stored.prefetch.tensor, None
        return restored

    def _prefetch_layer(self, record: LayerActivations | None) -> None:
        for stored in record.stored() if record is not None else []:
            self._prefetch(stored)

    def _unpack(self, packed):
        if not isinstance(packed, LayerActivations):
            return packed
        record = packed
        # This layer's recomputation starts now; its kept attention outputs are needed in a moment.
        for stored in record.stored():
            if stored is not record.input:
                self._prefetch(stored)
        # The layer below is next: bring its tensors back meanwhile. A token-wise layer waits for its
        # attention backward (`attention_backward_started`), past the MLP backward where the layer's
        # memory peaks; the copy still has the whole attention backward to hide behind.
        if not record.attention:
            self._prefetch_layer(record.previous_layer())
        return self._load(record.input)
