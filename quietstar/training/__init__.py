"""The training recipes (``pretrain`` for Quiet-STaR, ``coconut``) and the DeepSpeed engine, checkpoints and logs they share."""
