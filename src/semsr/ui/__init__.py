"""semsr.ui"""
