"""trtllm.frontend"""
