"""ttt.data"""
