"""Evaluation of frozen encoders: label propagation (DAVIS, JHMDB, VIP), k-NN and linear probes."""
