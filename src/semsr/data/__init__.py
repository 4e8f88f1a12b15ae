"""semsr.data"""
