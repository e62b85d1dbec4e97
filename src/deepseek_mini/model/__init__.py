"""The network: MLA attention, MoE feed-forward, the decoder, its loss and its sizes."""
