"""The instance-mask branch of Co-DINO-Inst (RefineMask-style head, mask IoU head, boundary-aware loss)."""
