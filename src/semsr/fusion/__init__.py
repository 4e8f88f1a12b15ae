"""semsr.fusion"""
