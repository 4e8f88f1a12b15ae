"""semsr.priors"""
