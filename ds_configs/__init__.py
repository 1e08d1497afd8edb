"""DeepSpeed JSON configs (ZeRO-2, ZeRO-3, ZeRO-3 offload), shipped with the package."""
