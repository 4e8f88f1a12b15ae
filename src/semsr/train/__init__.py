"""semsr.train"""
