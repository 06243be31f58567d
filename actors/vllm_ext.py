"""vLLM worker extension: in-place weight reload for RL weight sync.

vLLM mixes this class into its worker (``worker_extension_cls``), so ``self`` is the worker and
``LLM.collective_rpc("protege_reload_tensors", args=(named_tensors,))`` calls into it. With the
engine in this process (CPU: VLLM_ENABLE_V1_MULTIPROCESSING=0) the arguments are passed as they
are, so the tensors the weight sync hands over (views into the object store's buffers) reach the
loader without a copy; an engine core in its own process gets them through vLLM's msgpack encoder.
``protege_reload`` takes safetensors bytes instead (serve/'s reload from a folder).
"""

from __future__ import annotations

import torch


class WeightReloadExtension:
    def protege_reload(self, payload: bytes) -> int:
        from safetensors.torch import load

        return self.protege_reload_tensors(list(load(payload).items()))

    def protege_reload_tensors(self, weights: list[tuple[str, torch.Tensor]]) -> int:
        # Layerwise reload re-runs each layer's post-load processing (CPU vLLM repacks linear
        # layers after loading, so writing into parameters directly would be silently ignored).
        # Its weight loaders copy each tensor into the parameter (casting to the engine's dtype):
        # the tensors are read, never written.
        self.reload_weights(weights_iterator=iter(weights), is_checkpoint_format=True)
        _retie_lm_head(self.model_runner.get_model())
        return len(weights)


def _retie_lm_head(model: torch.nn.Module) -> None:
    """Tied embeddings: the lm_head keeps a packed copy of the *old* embedding after a reload.

    Point it back at the embedding parameter and rebuild its packed GEMM from the new values.
    Untied models are left alone.
    """
    config = getattr(model, "config", None)
    lm_head = getattr(model, "lm_head", None)
    inner = getattr(model, "model", None)
    if lm_head is None or inner is None or not getattr(config, "tie_word_embeddings", False):
        return
    emb = getattr(inner, "embed_tokens", None)
    if emb is None:
        return
    if lm_head is not emb and lm_head.weight is not emb.weight:
        lm_head.weight = emb.weight
    quant = getattr(lm_head, "quant_method", None)
    if quant is not None and hasattr(quant, "process_weights_after_loading"):
        quant.process_weights_after_loading(lm_head)
