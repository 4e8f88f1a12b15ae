"""semsr.eval"""
