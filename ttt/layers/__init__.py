"""ttt.layers"""
