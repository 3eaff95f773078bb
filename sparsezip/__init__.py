"""Visual token compression methods: fixed-shape PyTorch modules and loop-based references."""
