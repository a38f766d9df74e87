"""The single-controller RL loop and what it needs: batch records, metrics, checkpoints, logging."""
