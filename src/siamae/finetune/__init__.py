"""Downstream training on the pre-training engine: each task is a Method in its own file.

classification.py (today's ``siamae finetune``); heads.py and layer_decay.py are shared by the
tasks; checkpoints.py reads a fine-tuned run back and exports it; command.py is what the CLI
adds to a recipe. A new task (e.g. segmentation) is one file here plus one line in
``siamae.registry``.
"""
