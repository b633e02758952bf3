"""The merge engine: checkpoints, placement, materializing candidates, streamed merges and writing."""
