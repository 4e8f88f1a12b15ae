"""semsr.pipeline"""
