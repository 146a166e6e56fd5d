"""trtllm.runtime"""
