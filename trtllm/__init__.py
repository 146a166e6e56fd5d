"""trtllm: trace a PyTorch LLM, fuse it, lower it, and run it fast (see DESIGN.md §1)."""
