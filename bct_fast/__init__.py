"""bct_fast"""
