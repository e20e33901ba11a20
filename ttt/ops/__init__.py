"""ttt.ops"""
