"""vLLM worker extension: in-place weight reload for RL weight sync.

vLLM mixes this class into its worker (``worker_extension_cls``), so ``self`` is the worker and
``LLM.collective_rpc("protege_reload", args=(payload,))`` calls into it. Tensors travel as
safetensors bytes because collective_rpc arguments are serialised when the engine runs in
its own process; bytes are the one format every transport handles without pickling torch.
"""

from __future__ import annotations

import torch


class WeightReloadExtension:
    def protege_reload(self, payload: bytes) -> int:
        from safetensors.torch import load

        weights = load(payload)
        # Layerwise reload re-runs each layer's post-load processing (CPU vLLM repacks linear
        # layers after loading, so writing into parameters directly would be silently ignored).
        self.reload_weights(weights_iterator=iter(weights.items()), is_checkpoint_format=True)
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
