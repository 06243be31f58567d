"""LearnerSpec → DeepSpeed config dict. Pure, so it is unit-testable without DeepSpeed."""

from __future__ import annotations


def build_ds_config(
    *, zero_stage: int, micro_batch: int, grad_accum: int, world_size: int, grad_clip: float, bf16: bool
) -> dict:
    zero: dict = {"stage": zero_stage}
    if zero_stage >= 2:
        # Bucketed reduce-scatter; overlap buys nothing on gloo and makes CPU runs less predictable.
        zero.update(overlap_comm=False, contiguous_gradients=True, reduce_bucket_size=5e7)
    if zero_stage == 3:
        # Weight export and HF saves gather full parameters themselves (GatheredParameters).
        zero.update(stage3_param_persistence_threshold=0, stage3_gather_16bit_weights_on_model_save=True)
    return {
        "train_micro_batch_size_per_gpu": micro_batch,
        "gradient_accumulation_steps": grad_accum,
        "train_batch_size": micro_batch * grad_accum * world_size,
        "gradient_clipping": grad_clip,
        "zero_optimization": zero,
        "bf16": {"enabled": bool(bf16)},
        # We pass torch.optim.AdamW as the client optimizer: DeepSpeedCPUAdam/FusedAdam JIT-build
        # for ~85 s each on a fresh machine (docs/platform.md) and buy nothing at this scale.
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 1 << 30,
        "wall_clock_breakdown": False,
    }
