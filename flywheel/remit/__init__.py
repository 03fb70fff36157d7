"""ReMiT mid-training: per-token weights from a reference model, and the objectives that use them."""
