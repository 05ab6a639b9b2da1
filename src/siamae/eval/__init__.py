"""Evaluation of frozen encoders: label propagation (DAVIS, JHMDB, VIP), k-NN and linear probes,
and the frozen linear segmentation probe with its command (``segmentation/``; its scores,
shared with the fine-tuning task, are :mod:`siamae.segmentation_scores`, below both rooms)."""
