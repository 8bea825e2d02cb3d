"""Code that runs inside vLLM's worker (``worker_extension_cls``), imported by vLLM, never by workbench.

``workbench_reload_blob`` receives the trainer's state dict as one safetensors blob (bytes travel
through vLLM's msgpack RPC between processes, tensors do not) and loads it in place with the
worker's own ``reload_weights`` (which handles fused q/k/v and gate/up projections, tied
embeddings and the CPU backend's repacked linear layers). It imports nothing from vLLM.
"""

from __future__ import annotations


class WorkbenchWorkerExtension:
    """Mixed into vLLM's worker class; methods are reached with ``llm.collective_rpc(name, ...)``."""

    def workbench_reload_blob(self, blob: bytes) -> int:
        from safetensors.torch import load

        weights = load(bytes(blob))
        self.reload_weights(weights_iterator=list(weights.items()))  # type: ignore[attr-defined]
        return len(weights)
