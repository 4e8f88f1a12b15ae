"""semsr.models"""
