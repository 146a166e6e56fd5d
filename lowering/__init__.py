"""trtllm.lowering"""
